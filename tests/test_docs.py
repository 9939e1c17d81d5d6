"""The documentation that cannot drift: every settings key described and in the generated reference, a
`config show` that reads back as the same settings, a README a newcomer can read whose test command is CI's."""

from __future__ import annotations

import importlib.util
import re
import typing
from pathlib import Path

from pydantic import BaseModel

from conftest import run_cli
from geoagent.config import Settings, load_config

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def _hook():
    """docs/hooks/config_reference.py, the MkDocs hook that writes the configuration reference page."""
    spec = importlib.util.spec_from_file_location("config_reference_hook", REPO / "docs" / "hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _fields(model: type[BaseModel], path: str = ""):
    """(dotted path, field) for every settings field, nested models included (walked here, not by the hook)."""
    for name, field in model.model_fields.items():
        yield f"{path}{name}", field
        for nested in _models(field.annotation):
            yield from _fields(nested, f"{path}{name}.")


def _models(annotation) -> set[type[BaseModel]]:
    """The models inside an annotation: Model, Model | None, dict[str, Model], list[Model]."""
    found = {annotation} if isinstance(annotation, type) and issubclass(annotation, BaseModel) else set()
    for arg in typing.get_args(annotation):
        found |= _models(arg)
    return found


def test_every_settings_field_has_a_description():
    """The configuration reference is generated from the descriptions: a key without one is undocumented."""
    missing = [path for path, field in _fields(Settings) if not (field.description or "").strip()]
    assert missing == [], f"settings fields without description=: {missing}"


def test_the_generated_reference_lists_every_key_with_its_default_and_description():
    """The hook's page has a row for every leaf key of every table, with the key's description in it."""
    page = _hook().render()
    for path, field in _fields(Settings):
        if not _models(field.annotation):
            name = path.rsplit(".", 1)[-1]
            rows = [line for line in page.splitlines() if line.startswith(f"| `{name}` |")]
            assert any(" ".join(field.description.split()).replace("|", "\\|") in row for row in rows), path  # type: ignore[union-attr]
    assert "| `max_concurrency` | integer (>= 1, <= 1024) | `4` |" in page
    assert "## `[backends.NAME]`" in page and "## `[agent]`" in page


def test_config_show_toml_reads_back_as_the_same_settings(tmp_path):
    """`config show` (TOML by default) prints a file that, saved and loaded, gives exactly the settings shown:
    strings needing escapes, a profile name that needs quoting, paths, unset keys, literals and numbers."""
    source = tmp_path / "mine.toml"
    source.write_text(
        '[backends."my.server"]\nkind = "openai"\nmodel = "qwen \\"vl\\" \\\\ 7b\\tnew"\nbase_url = "http://127.0.0.1:9/v1"\n'
        'api_key_env = "MY_KEY"\ntemperature = 0.7\nprice_per_1k_prompt_tokens = 0.25\n'
        '[backends.local]\nmodel = "llava:13b"\n'
        '[tasks]\ndefault = "local"\npairwise = "my.server"\n'
        '[cache]\ndir = "a cache/with space é"\nenabled = false\n'
        '[retrieval]\nindex = "/data/index"\ntop_k = 7\ndevice = "cpu"\ngazetteer_prompt = "a photo of {place}\\n({country})"\n'
        '[agent]\nposition_debias = true\nnear_duplicate_similarity = "off"\ntop_k = 5\nsubmap_weight = 0.1\n'
        '[ranker]\nadapter = "/models/adapter"\n'
    )
    expected = load_config(source)
    shown = run_cli("config", "show", "--config", str(source), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert '[backends."my.server"]' in shown.stdout and "# context_tokens is unset" in shown.stdout
    saved = tmp_path / "saved.toml"
    saved.write_text(shown.stdout)
    assert load_config(saved).model_dump() == expected.model_dump()


def test_config_show_defaults_read_back_with_base_url_unset(tmp_path):
    """With no file, the printed defaults load back to the defaults: the backend's default URL is shown as a
    comment, so the loaded profile still follows the backend's default rather than pinning it."""
    shown = run_cli("config", "show", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert '# base_url = "http://127.0.0.1:11434"' in shown.stdout
    saved = tmp_path / "geoagent.toml"
    saved.write_text(shown.stdout)
    assert load_config(saved).model_dump() == Settings().model_dump()
    assert load_config(saved).backends["local"].base_url is None


def test_config_show_refuses_an_unknown_format(tmp_path):
    """A format other than toml or json is a usage error naming the flag, exit 2."""
    proc = run_cli("config", "show", "--format", "yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "--format: 'yaml' is not one of toml, json" in proc.stderr


def test_the_readme_stays_short_and_its_links_exist():
    """A newcomer's README: at most 250 lines; every relative link and image points at a file in the repository."""
    assert len(README.splitlines()) <= 250
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    assert local, "the README links into docs/"
    assert [t for t in local if not (REPO / t).exists()] == []


def test_the_readme_test_command_is_what_ci_runs():
    """CI's readme-tests step runs the README's install and test commands: a plain install, then the [test] extra
    (checked not to change a version), then pytest."""
    ci = (REPO / ".ci" / "run").read_text()
    step = re.search(r"readme_tests\(\) \{\n(.*?)\n\}", ci, re.S).group(1)  # type: ignore[union-attr]
    for command in ("pip install -e .", ".ci/check-extras.sh .venv test", "python -m pytest"):
        assert command in step
    for command in (".venv/bin/pip install -e .", ".venv/bin/pip install -e '.[test]'", ".venv/bin/python -m pytest"):
        assert command in README
    assert "check-extras.sh" in ci and "mkdocs build --strict" in ci


def test_mkdocs_nav_names_only_pages_that_exist():
    """mkdocs --strict fails on a nav entry without its file: caught here too, before CI's docs step."""
    text = (REPO / "mkdocs.yml").read_text()
    live = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    pages = re.findall(r":\s*([\w./-]+\.md)\s*$", live, re.M)
    assert pages and [p for p in pages if not (REPO / "docs" / p).is_file()] == []
    assert "hooks/config_reference.py" in text
