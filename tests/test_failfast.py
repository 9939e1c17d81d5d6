"""Failing in seconds: what stops every photo (a server down, a key unset, a checkpoint file missing) is told
before PyTorch and open_clip are imported, by every command that locates photos; and models are not needed when
they are not needed (``batch --use-exif`` on geotagged photos). Checked as properties of a real ``geoagent``
process (which modules it imported, which files it left), never as wall-clock times: those are in
``benchmarks/first_failure.py``."""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_cli

REAL = Path(__file__).parent / "data" / "exif"
#: Real camera files whose EXIF carries a GPS position (tests/data/exif/README.md).
GEOTAGGED = ("exiftool-Apple.jpg", "nikon1-aw1-exif-transplant.jpg", "exiv2-FurnaceCreekInn.jpg")
HEAVY = ("torch", "open_clip")
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$")


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def geoagent(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, list[str], set[str]]:
    """Run ``geoagent ARGS`` with Python's import log on; (exit code, the lines it printed on stderr, every module
    the process imported before it exited)."""
    proc = run_cli(*args, cwd=cwd, env={"PYTHONPROFILEIMPORTTIME": "1", **(env or {})})
    said, imported = [], set()
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:"):
            said.append(line)
        elif match := IMPORT_LINE.match(line):  # not the log's header line
            imported.add(match.group(1))
    return proc.returncode, said, imported


def write_config(folder: Path, base_url: str, **retrieval: str) -> None:
    """./geoagent.toml: one Ollama profile at ``base_url``, an empty cache, the default CLIP unless ``retrieval``."""
    keys = "".join(f"{key} = {json.dumps(value)}\n" for key, value in retrieval.items())
    (folder / "geoagent.toml").write_text(
        f'[backends.local]\nkind = "ollama"\nmodel = "llava:7b"\nbase_url = "{base_url}"\ntimeout_s = 5\n'
        f'[tasks]\ndefault = "local"\n[cache]\ndir = "{folder / "cache"}"\n[retrieval]\n{keys}'
    )


def plain_photo(path: Path) -> Path:
    """A JPEG with no EXIF: only a model can place it."""
    Image.new("RGB", (64, 48), (90, 140, 200)).save(path)
    return path


def no_weights(tmp_path: Path) -> dict[str, str]:
    """An environment where the default CLIP weights cannot be had: an empty Hugging Face home, offline."""
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def down(tmp_path: Path) -> str:
    """./geoagent.toml names an Ollama that is not running; its URL."""
    url = f"http://127.0.0.1:{closed_port()}"
    write_config(tmp_path, url)
    return url


def test_locate_with_the_server_down_is_diagnosed_before_torch_is_imported(down, tmp_path):
    """`locate photo.jpg`, Ollama not running, nothing cached: the diagnosis, exit 2, and the process never imported
    torch or open_clip (the server is checked before any model loads)."""
    code, said, imported = geoagent("locate", str(plain_photo(tmp_path / "p.jpg")), cwd=tmp_path, env=no_weights(tmp_path))
    assert code == 2, said
    assert any(f"cannot connect to {down}" in line and "ollama serve" in line for line in said), said
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert "geoagent.agent.controller" in imported  # the import log works: the command got as far as the agent


def test_batch_with_the_server_down_is_diagnosed_before_torch_and_leaves_no_output_file(down, tmp_path):
    """`batch` on photos that need a model, Ollama not running: diagnosed before torch is imported, exit 2, and
    neither the journal nor the CSV exists afterwards (a run that wrote no line leaves no file)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    plain_photo(folder / "a.jpg")
    code, said, imported = geoagent("batch", str(folder), "--out", "r.csv", cwd=tmp_path, env=no_weights(tmp_path))
    assert code == 2, said
    assert any(f"cannot connect to {down}" in line for line in said), said
    assert not imported & set(HEAVY)
    assert not (tmp_path / "r.csv").exists() and not (tmp_path / "r.jsonl").exists()


def test_eval_with_the_server_down_stops_the_column_before_torch_is_imported(down, tmp_path):
    """`eval` on a labelled set, Ollama not running: the column is stopped with the diagnosis before torch is
    imported, exit 2."""
    (tmp_path / "set.csv").write_text(f"path,lat,lon\n{plain_photo(tmp_path / 'p.jpg')},48.85,2.35\n")
    code, said, imported = geoagent("eval", "set.csv", cwd=tmp_path, env=no_weights(tmp_path))
    assert code == 2, said
    assert any(f"cannot connect to {down}" in line for line in said), said
    assert not imported & set(HEAVY)


def test_serve_with_the_server_down_stops_before_torch_is_imported(down, tmp_path):
    """`serve`, Ollama not running: the diagnosis and exit 2 before it listens, without importing torch."""
    code, said, imported = geoagent("serve", "--port", "0", cwd=tmp_path, env=no_weights(tmp_path))
    assert code == 2, said
    assert any(f"cannot connect to {down}" in line for line in said), said
    assert not imported & set(HEAVY)


def test_a_missing_checkpoint_file_and_a_down_server_are_both_told_before_torch(tmp_path):
    """Two problems that stop every photo are named together, at once: the checkpoint file that is not there
    and the server that is not running; torch was never imported."""
    write_config(tmp_path, f"http://127.0.0.1:{closed_port()}", clip_pretrained=str(tmp_path / "clip.safetensors"))
    code, said, imported = geoagent("locate", str(plain_photo(tmp_path / "p.jpg")), cwd=tmp_path)
    assert code == 2, said
    assert f"error: retrieval.clip_pretrained: no checkpoint file at {tmp_path / 'clip.safetensors'}" in said
    assert any("cannot connect to" in line for line in said), said
    assert not imported & set(HEAVY)


def test_an_unset_key_is_told_before_torch(tmp_path):
    """A hosted backend whose key variable is unset: named at once (exit 2), before any model loads."""
    (tmp_path / "geoagent.toml").write_text(
        '[backends.hosted]\nkind = "openai"\nmodel = "gpt-4o-mini"\nbase_url = "http://127.0.0.1:9/v1"\n'
        'api_key_env = "GEOAGENT_TEST_UNSET_KEY"\n[tasks]\ndefault = "hosted"\n'
    )
    code, said, imported = geoagent("locate", str(plain_photo(tmp_path / "p.jpg")), cwd=tmp_path)
    assert code == 2, said
    assert any("GEOAGENT_TEST_UNSET_KEY" in line for line in said), said
    assert not imported & set(HEAVY)


def test_a_missing_photo_is_named_before_any_heavy_import(tmp_path):
    """A typo in a path is reported without loading anything: one line, exit 1, torch and open_clip never
    imported."""
    code, said, imported = geoagent("locate", "missing.jpg", cwd=tmp_path)
    assert code == 1 and said == ["error: missing.jpg: file not found"]
    assert not imported & set(HEAVY)


def test_batch_use_exif_answers_a_geotagged_folder_with_no_server_and_no_weights(down, tmp_path):
    """`batch gps-folder --use-exif --out r.jsonl` with Ollama not running and no CLIP weights to be had: every
    photo is answered from its EXIF GPS, exit 0, and no model was loaded (torch never imported)."""
    folder = tmp_path / "gps"
    folder.mkdir()
    for name in GEOTAGGED:
        shutil.copy(REAL / name, folder / name)
    code, said, imported = geoagent("batch", str(folder), "--use-exif", "--out", "r.jsonl", cwd=tmp_path, env=no_weights(tmp_path))
    assert code == 0, said
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert sorted(Path(line["image"]).name for line in lines) == sorted(GEOTAGGED)
    assert all(line["source"] == "exif" and line["stats"]["vlm_calls"] == 0 for line in lines)
    assert not imported & set(HEAVY)


def test_batch_use_exif_journals_the_geotagged_photos_then_stops_at_one_that_needs_the_down_server(down, tmp_path):
    """With --use-exif, a photo without GPS still needs the server: the geotagged ones before it are journalled,
    the run then stops with the diagnosis (exit 2) and the photo without GPS is left for the rerun."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in GEOTAGGED:
        shutil.copy(REAL / name, folder / name)
    plain_photo(folder / "zz-plain.jpg")  # sorted last
    code, said, _ = geoagent("batch", str(folder), "--use-exif", "--out", "r.jsonl", cwd=tmp_path, env=no_weights(tmp_path))
    assert code == 2, said
    assert any(f"cannot connect to {down}" in line for line in said), said
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert sorted(Path(line["image"]).name for line in lines) == sorted(GEOTAGGED)
