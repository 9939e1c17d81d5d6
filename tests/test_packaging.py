"""Installed like a real package: bundled prompts, lean extras that fail clearly when missing, true floors, clean help."""

from __future__ import annotations

import filecmp
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_CLIP, run_cli, write_world_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TEMPLATES = (
    "instructions", "query", "prior", "reasoning", "reasoning_neighbours", "pairwise", "pairwise_cross", "pointwise", "pointwise_cross",
    "setwise", "setwise_cross",
)


def run_cli_without(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``geoagent ARGS`` in a fresh process where ``module`` cannot be imported, as if its extra were not installed."""
    prelude = f"import sys; sys.modules[{module!r}] = None; from geoagent.cli import app; app(prog_name='geoagent')"
    return subprocess.run([sys.executable, "-c", prelude, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def _requirements() -> dict[str, str]:
    """Every direct requirement of pyproject.toml (core and extras), name -> specifier, self-references left out."""
    project = PYPROJECT["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    found = {}
    for line in lines:
        name, spec = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?\s*([^;]*)", line).groups()  # type: ignore[union-attr]
        if name != project["name"]:
            found[name.lower().replace("_", "-")] = spec.strip()
    return found


def _release(version: str) -> tuple[int, ...]:
    """1.24 and 1.24.0 are the same release."""
    parts = [int(p) for p in version.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def test_bundled_prompts_live_inside_the_package_and_the_wheel_ships_them():
    """A wheel has no repo around it: every template the agent renders is inside geoagent/ and covered by package-data."""
    from fnmatch import fnmatch

    from geoagent.prompts import DEFAULT_PROMPTS_DIR, PROMPTS_README, PromptSet

    package = REPO / "geoagent"
    assert DEFAULT_PROMPTS_DIR.is_relative_to(package.resolve())
    prompts = PromptSet()
    assert set(prompts.hashes()) == set(TEMPLATES)
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["geoagent.prompts"]
    shipped = [p for p in DEFAULT_PROMPTS_DIR.iterdir() if p.is_file()]
    assert PROMPTS_README in {p.name for p in shipped}
    unshipped = [p.name for p in shipped if not any(fnmatch(str(p.relative_to(package / "prompts")), g) for g in globs)]
    assert not unshipped, f"not in package-data: {unshipped}"


def test_the_top_level_prompts_folder_is_the_bundled_one():
    """README and users point at ./prompts: it must be the very files the package ships, not a drifting copy."""
    from geoagent.prompts import DEFAULT_PROMPTS_DIR

    assert (REPO / "prompts").resolve() == DEFAULT_PROMPTS_DIR


def test_prompts_export_writes_the_bundled_templates_and_keeps_edits_unless_forced(tmp_path):
    """`prompts export DIR` gives an editable copy (README included) whose hashes match; it never overwrites silently."""
    from geoagent.prompts import DEFAULT_PROMPTS_DIR

    target = tmp_path / "my-prompts"
    proc = run_cli("prompts", "export", str(target), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in target.iterdir())
    assert names == sorted([f"{t}.txt" for t in TEMPLATES] + ["README.md"])
    assert all(filecmp.cmp(target / n, DEFAULT_PROMPTS_DIR / n, shallow=False) for n in names)
    bundled = run_cli("prompts", "list", cwd=tmp_path).stdout.splitlines()[1:]
    assert run_cli("prompts", "list", "--prompts", str(target), cwd=tmp_path).stdout.splitlines()[1:] == bundled

    edited = "My own prior prompt.\n"
    (target / "prior.txt").write_text(edited)
    again = run_cli("prompts", "export", str(target), cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    assert (target / "prior.txt").read_text() == edited
    forced = run_cli("prompts", "export", str(target), "--force", cwd=tmp_path)
    assert forced.returncode == 0 and filecmp.cmp(target / "prior.txt", DEFAULT_PROMPTS_DIR / "prior.txt", shallow=False)


def test_a_litellm_profile_without_the_hosted_extra_stops_in_the_preflight(standin, world, tmp_path):
    """No litellm installed: one line naming the profile and `pip install 'geoagent-vlm[hosted]'`, exit 2, nothing sent."""
    server = standin()
    config = tmp_path / "hosted.toml"
    config.write_text(
        f'[backends.hosted]\nkind = "litellm"\nmodel = "openai/llava:7b"\nbase_url = "{server.openai_url}"\n'
        f'[tasks]\ndefault = "hosted"\n[cache]\ndir = "{tmp_path / "cache"}"\n'
        f'[retrieval]\nclip_model = "{TINY_CLIP}"\nclip_pretrained = "none"\nindex = "{world.root / "index"}"\n'
    )
    photo = str(world.queries[0].path)
    proc = run_cli_without("litellm", "locate", photo, "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: backends.hosted (kind 'litellm') needs litellm, which is not installed: pip install 'geoagent-vlm[hosted]'"]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert server.log == []


def test_eval_without_matplotlib_writes_everything_but_the_plot(standin, world, tmp_path):
    """No [plot] extra: report.json, report.md and predictions.csv are written, a stale plot removed, the fix said once."""
    server = standin()
    config = write_world_config(tmp_path / "retrieval.toml", world, server, tmp_path / "cache", strategy="none")
    out = tmp_path / "out"
    out.mkdir()
    (out / "accuracy.png").write_bytes(b"a plot from an earlier run")
    proc = run_cli_without("matplotlib", "eval", str(world.queries_csv), "--config", str(config), "--limit", "3", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["predictions.csv", "report.json", "report.md"]
    assert proc.stderr.count("pip install 'geoagent-vlm[plot]'") == 1 and "Traceback" not in proc.stderr
    assert "accuracy.png" not in proc.stdout and "predictions.csv" in proc.stdout


@pytest.mark.parametrize("command", [["locate"], ["eval"], ["index", "build"], ["prompts", "export"], ["prompts", "list"]])
def test_help_shows_flags_as_flags(tmp_path, command):
    """typer 0.29 prints `--json <bool>` and `<list[Path]>`; flags must read as flags and help text keep its brackets."""
    proc = run_cli(*command, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "<bool>" not in proc.stdout and "list[" not in proc.stdout, proc.stdout
    if command == ["locate"]:
        assert re.search(r"--json\s+One JSON object", proc.stdout), proc.stdout
    if command == ["eval"]:
        assert "[name=]config.toml" in proc.stdout, proc.stdout


def test_extras_keep_a_plain_install_lean():
    """litellm, matplotlib, pillow-heif, redis, the ranker's and the web page's libraries are extras; `test` pulls in what
    the suite needs; compromised litellm never."""
    core = {re.split(r"[<>=!~;\s\[]", r, maxsplit=1)[0].lower() for r in PYPROJECT["project"]["dependencies"]}
    assert not core & {"litellm", "matplotlib", "pillow-heif", "transformers", "peft", "safetensors", "starlette", "uvicorn", "playwright", "pyexiv2", "redis"}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert [r.split(">")[0] for r in extras["hosted"]] == ["litellm"]
    assert "!=1.82.7" in extras["hosted"][0] and "!=1.82.8" in extras["hosted"][0] and "<=1.106.2" in extras["hosted"][0]
    assert extras["plot"][0].startswith("matplotlib") and extras["heic"][0].startswith("pillow-heif")
    assert "geoagent-vlm[hosted,plot,engine,ray,ranker,web,xmp,redis]" in extras["test"]
    assert [r.split(">")[0] for r in extras["xmp"]] == ["pyexiv2"]
    assert [r.split(">")[0] for r in extras["redis"]] == ["redis"]
    assert [re.split(r"[<>=]", r)[0] for r in extras["ranker"]] == ["transformers", "peft", "safetensors"]
    assert [r.split(">")[0] for r in extras["engine"]] == ["transformers[serving]"]


def test_floors_file_pins_every_direct_dependency_at_its_lower_bound():
    """.ci/floors.txt is what CI installs to prove the floors true: it must match pyproject.toml's lower bounds exactly."""
    floors = {}
    for line in (REPO / ".ci" / "floors.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = re.match(r"([A-Za-z0-9_.-]+)==([^;\s]+)", line).groups()  # type: ignore[union-attr]
            floors[name.lower().replace("_", "-")] = version
    requirements = _requirements()
    # torch: CI's own build; transformers: only the real-engine tests use it, and its huggingface_hub floor
    # (1.31) is above the product's, so the floors job runs the suite without those tests.
    assert set(floors) == set(requirements) - {"torch", "transformers"}
    for name, version in floors.items():
        lower = re.search(r">=\s*([^,\s]+)", requirements[name])
        assert lower and _release(lower.group(1)) == _release(version), f"{name}: pyproject {requirements[name]!r}, floors.txt {version}"
