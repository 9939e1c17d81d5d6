"""Bounded decoding and unusable inputs (issue 18: point 3, F3, F4, F6, F7): one pixel limit, checked from the
header before any pixel is decoded; EXIF read without decoding; only regular files opened (a FIFO never
hangs a run); a damaged index or a config file that is not UTF-8 named in one line, exit 2."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from conftest import TINY_CLIP, run_cli, write_world_config
from pngs import repeated_row_png
from geoagent.config import PILLOW_MAX_PIXELS as SETTINGS_DEFAULT
from geoagent.eval.synthetic import _dms, save_with_gps, scene
from geoagent.exif import read_exif
from geoagent.images import PILLOW_MAX_PIXELS
from geoagent.retrieval.index import IndexUnusableError, ReferenceIndex, current_version, read_gps
from standin import WorldJudge

TINY_TOML = f'[retrieval]\nclip_model = "{TINY_CLIP}"\nclip_pretrained = "none"\n'
BOMB_SIDE = 12000  # 144 Mpx: over Pillow's 89.5 Mpx limit, under twice it (where Pillow itself would refuse at open)
BOMB_DECODED_MB = BOMB_SIDE * BOMB_SIDE * 3 / 2**20  # 412 MB of RGB pixels, from a 0.7 MB file
NO_DECODE_PEAK_MB = 150  # a Python process with Pillow and numpy loaded, and no pixel decoded
HANG_GUARD_S = 300  # generous: a hang guard, not a timing assertion


@dataclass
class Measured:
    returncode: int
    stdout: str
    stderr: str
    peak_mb: float  # the child's peak resident set (ru_maxrss of this very child, from wait4)


#: Runs ``python ARGS...`` (a ``-c`` script or ``-m`` module) and, as the process exits, writes its own peak
#: resident set (VmHWM: this process's memory, counted afresh at exec) to the file named first.
PEAK_WRAPPER = """
import atexit, runpy, sys
report = sys.argv.pop(1)
def peak():
    with open('/proc/self/status') as status:
        kb = next(line.split()[1] for line in status if line.startswith('VmHWM:'))
    with open(report, 'w') as out:
        out.write(kb)
atexit.register(peak)
mode, target = sys.argv[1], sys.argv[2]
sys.argv = [target, *sys.argv[3:]]
if mode == '-c':
    exec(compile(target, '<string>', 'exec'), {'__name__': '__main__'})
else:
    runpy.run_module(target, run_name='__main__', alter_sys=True)
"""


def run_measured(args: list[str], cwd: Path) -> Measured:
    """``python -c SCRIPT ...`` or ``python -m MODULE ...`` (``args``, after the interpreter) in a child process,
    and that process's own peak RSS as it reports it at exit. Not wait4's ru_maxrss: a child started from a big
    test worker inherits the worker's peak there (Linux carries it over exec)."""
    out, err, report = cwd / "child.out", cwd / "child.err", cwd / "child.peak"
    report.unlink(missing_ok=True)
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen([args[0], "-c", PEAK_WRAPPER, str(report), *args[1:]], cwd=cwd, stdout=stdout, stderr=stderr)
    try:
        proc.wait(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{args} still running after {HANG_GUARD_S} s: {err.read_text()[-2000:]}")
    return Measured(proc.returncode, out.read_text(), err.read_text(), int(report.read_text()) / 1024)


def geoagent(*args: str) -> list[str]:
    return [sys.executable, "-m", "geoagent", *args]


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return repeated_row_png(tmp_path_factory.mktemp("bomb") / "big.png", BOMB_SIDE, BOMB_SIDE)  # all black


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --- the pixel limit ------------------------------------------------------------------------------------------


def test_the_settings_default_is_pillows_limit():
    """images.max_pixels defaults to Pillow's own limit (written out in config.py so settings never import PIL)."""
    assert SETTINGS_DEFAULT == PILLOW_MAX_PIXELS == 1024 * 1024 * 1024 // 4 // 3


def test_every_header_reader_refuses_a_bomb_without_decoding_it(bomb, tmp_path):
    """F7: read_exif (PNG getexif decoded the whole image), index build's read_gps and open_image each meet the
    12000x12000 PNG; none decodes it: the child's peak RSS stays far below the 412 MB of pixels."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from geoagent.exif import read_exif\n"
        "from geoagent.images import PixelLimitError, open_image\n"
        "from geoagent.retrieval.index import read_gps\n"
        "path = Path(sys.argv[1])\n"
        "print('exif', read_exif(path))\n"
        "print('gps', read_gps(path))\n"
        "try:\n"
        "    open_image(path)\n"
        "except PixelLimitError as exc:\n"
        "    print('open', exc)\n"
    )
    child = run_measured([sys.executable, "-c", script, str(bomb)], tmp_path)
    assert child.returncode == 0, child.stderr
    lines = child.stdout.splitlines()
    assert lines[0] == "exif None"
    assert lines[1].startswith("gps (None, 'refused: 12000x12000 is 144,000,000 pixels, over the 89,478,485 pixel limit")
    assert lines[2].startswith(f"open {bomb}: refused: 12000x12000")
    assert child.peak_mb < NO_DECODE_PEAK_MB < BOMB_DECODED_MB / 2, child.peak_mb


def test_locate_names_a_bomb_in_one_line_before_any_model_loads(bomb, tmp_path):
    """`locate` on the bomb: one line naming the file and the limit, exit 1, no traceback, and no decode (the
    header is checked with the cheap checks, before torch loads)."""
    (tmp_path / "g.toml").write_text(TINY_TOML)
    child = run_measured(geoagent("locate", str(bomb), "--config", "g.toml"), tmp_path)
    assert child.returncode == 1
    assert child.stderr.splitlines() == [
        f"error: {bomb}: refused: 12000x12000 is 144,000,000 pixels, over the 89,478,485 pixel limit "
        "(images.max_pixels; possible decompression bomb)"
    ]
    assert child.peak_mb < NO_DECODE_PEAK_MB, child.peak_mb
    print(f"locate on a {BOMB_DECODED_MB:.0f} MB bomb: peak RSS {child.peak_mb:.0f} MB")


def test_index_build_skips_a_bomb_naming_it_without_decoding(bomb, tmp_path):
    """`index build` over a folder holding the bomb and a geotagged photo: the bomb is listed as skipped with
    the reason, the photo indexed, no traceback; its peak RSS is that of the same build without the bomb
    (within 100 MB), not 412 MB more."""
    (tmp_path / "g.toml").write_text(TINY_TOML)
    folder = tmp_path / "photos"
    save_with_gps(scene(1), folder / "p1.jpg", 10.0, 20.0)
    plain = run_measured(geoagent("index", "build", str(folder), "--out", "plain", "--config", "g.toml"), tmp_path)
    assert plain.returncode == 0, plain.stderr
    shutil.copy(bomb, folder / "big.png")
    child = run_measured(geoagent("index", "build", str(folder), "--out", "idx", "--config", "g.toml"), tmp_path)
    assert child.returncode == 0, child.stderr
    assert "Traceback" not in child.stderr
    assert "skipped big.png: refused: 12000x12000 is 144,000,000 pixels, over the 89,478,485 pixel limit" in child.stdout
    assert child.peak_mb - plain.peak_mb < 100, (plain.peak_mb, child.peak_mb)
    print(f"index build: peak RSS {plain.peak_mb:.0f} MB without the bomb, {child.peak_mb:.0f} MB with it")


def test_the_pixel_limit_is_a_setting(tmp_path):
    """[images] max_pixels applies to every decode: a 256x192 photo is refused at a 10,000-pixel limit."""
    save_with_gps(scene(2), tmp_path / "p.jpg", 10.0, 20.0)
    (tmp_path / "g.toml").write_text(TINY_TOML + "[images]\nmax_pixels = 10000\n")
    proc = run_cli("locate", "p.jpg", "--config", "g.toml", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "error: p.jpg: refused: 256x192 is 49,152 pixels, over the 10,000 pixel limit (images.max_pixels; possible decompression bomb)"
    ]


def png_with_late_exif(path: Path, lat: float, lon: float) -> Path:
    """A PNG whose eXIf chunk follows the image data (allowed by the PNG spec; Pillow writes it before)."""
    exif = Image.Exif()
    exif[0x010F] = "TestCam"  # a top-level tag: Pillow's PNG writer skips an Exif that looks empty
    exif.get_ifd(0x8825).update({1: "N", 2: _dms(lat), 3: "E", 4: _dms(lon)})
    scene(3).save(path, exif=exif.tobytes())  # Pillow writes IHDR, eXIf, IDAT, IEND
    data = path.read_bytes()
    chunks, at = [], 8
    while at < len(data):
        length = struct.unpack(">I", data[at : at + 4])[0]
        chunks.append(data[at : at + 12 + length])
        at += 12 + length
    late = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    assert len(late) == 1 and rest[-1][4:8] == b"IEND"
    path.write_bytes(data[:8] + b"".join(rest[:-1]) + late[0] + rest[-1])
    return path


def test_png_exif_after_the_image_data_is_read_without_decoding(tmp_path, monkeypatch):
    """Pillow's PNG getexif() decodes the whole image to find an eXIf chunk after IDAT; ours walks the chunk
    headers. With decoding made impossible, the GPS is still read (read_exif and index build's read_gps)."""
    path = png_with_late_exif(tmp_path / "late.png", 48.8566, 2.3522)

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    info = read_exif(path)
    assert info is not None and info.gps is not None
    assert (round(info.gps.lat, 4), round(info.gps.lon, 4)) == (48.8566, 2.3522)
    gps, problem = read_gps(path)
    assert problem is None and gps is not None and round(gps[0], 4) == 48.8566


# --- FIFOs and other files that are not regular (F6) ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "list"])
def test_a_fifo_among_batch_photos_is_named_and_the_rest_answered(kind, world, standin, tmp_path):
    """F6: `batch` used to hang forever on a FIFO named x.jpg (read_exif opened it, blocking for a writer).
    Now it is refused at once, named in one line, and the other photos are located (exit 1: one failed)."""
    server = standin(judge=WorldJudge(world.truth))
    config = write_world_config(tmp_path / "g.toml", world, server, tmp_path / "cache", strategy="pointwise")
    folder = tmp_path / "in"
    folder.mkdir()
    for query in world.queries[:2]:
        shutil.copy(query.path, folder / query.path.name)
    os.mkfifo(folder / "x.jpg")
    source = folder if kind == "folder" else tmp_path / "list.txt"
    if kind == "list":
        source.write_text("".join(f"{p}\n" for p in sorted(folder.iterdir())))
    try:
        proc = run_cli_guarded(["batch", str(source), "--out", "run.jsonl", "--config", str(config)], tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("batch hung on a FIFO")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    fifo_lines = [line for line in proc.stderr.splitlines() if "x.jpg" in line]
    assert len(fifo_lines) == 1 and "not a regular file" in fifo_lines[0], proc.stderr
    assert "2 located, 1 failed" in proc.stderr


def test_a_fifo_as_batch_input_is_refused_at_once(tmp_path):
    """INPUT itself a FIFO (a CSV or a list by its name) would block the first read: a usage error, exit 2."""
    os.mkfifo(tmp_path / "photos.csv")
    try:
        proc = run_cli_guarded(["batch", "photos.csv", "--out", "run.jsonl"], tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("batch hung on a FIFO INPUT")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: photos.csv: not a regular file (INPUT: a folder of photos, a CSV with a path column, or a text file of paths)"
    ]


def run_cli_guarded(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``geoagent ARGS``, killed (``subprocess.TimeoutExpired``) if it runs past the hang guard."""
    return run_cli(*args, cwd=cwd, timeout=HANG_GUARD_S)


# --- damaged indexes (F3 and the minor point) -----------------------------------------------------------------


def copied_index(world, tmp_path: Path) -> Path:
    target = tmp_path / "index"
    shutil.copytree(world.root / "index", target)
    return target


def test_a_truncated_entries_file_is_found_at_open_not_at_query_time(world, tmp_path):
    """F3: entries.jsonl cut short used to pass the open and raise pydantic's ValidationError mid-query."""
    index = copied_index(world, tmp_path)
    entries = current_version(index) / "entries.jsonl"
    entries.write_bytes(entries.read_bytes()[: entries.stat().st_size // 2])
    with pytest.raises(IndexUnusableError, match="entries.jsonl: damaged index: entry .* cannot be read .*geoagent index build"):
        ReferenceIndex.open(index)


def test_an_entry_edited_in_the_middle_is_one_clear_error_at_query_time(world, tmp_path):
    """A line damaged in the middle (same length, so the open's checks pass) is the same one-line error when a
    query reaches it, never pydantic's ValidationError."""
    index = copied_index(world, tmp_path)
    entries = current_version(index) / "entries.jsonl"
    lines = entries.read_bytes().splitlines(keepends=True)
    lines[3] = b"x" * (len(lines[3]) - 1) + b"\n"
    entries.write_bytes(b"".join(lines))
    opened = ReferenceIndex.open(index)
    with pytest.raises(IndexUnusableError, match="entry 4 of .* cannot be read"):
        opened.entries[3]


@pytest.mark.parametrize("damage", ["missing", "empty folder", "a file", "truncated entries", "rows not numpy"])
def test_an_unusable_index_is_one_line_of_our_own_exit_2(damage, world, standin, tmp_path):
    """An unusable --index exited 1 and passed on numpy's advice to allow pickles; now exit 2 (usage), one
    error line naming the index and how to rebuild it, no traceback."""
    server = standin(judge=WorldJudge(world.truth))
    config = write_world_config(tmp_path / "g.toml", world, server, tmp_path / "cache", strategy="pointwise")
    index = tmp_path / "idx"
    if damage == "empty folder":
        index.mkdir()
    elif damage == "a file":
        index.write_text("not an index")
    elif damage != "missing":
        copied = copied_index(world, tmp_path)
        version = current_version(copied)
        if damage == "truncated entries":
            (version / "entries.jsonl").write_bytes((version / "entries.jsonl").read_bytes()[:100])
        else:
            (version / "rows.npy").write_bytes(b"garbage, not an array")
        index = copied
    proc = run_cli("locate", str(world.queries[0].path), "--index", str(index), "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "pickle" not in proc.stderr
    [line] = error_lines(proc.stderr)
    assert str(index) in line
    assert ("index build" in line) if damage != "a file" else "not an index folder" in line


# --- config files that are not UTF-8 (F4) ---------------------------------------------------------------------


def test_a_config_file_that_is_not_utf8_is_one_line_exit_2(tmp_path):
    """F4: a Latin-1 "é" in a comment raised UnicodeDecodeError with a traceback."""
    (tmp_path / "g.toml").write_bytes(b"# caf\xe9\n[agent]\nstrategy = 'pointwise'\n")
    save_with_gps(scene(4), tmp_path / "p.jpg", 1.0, 2.0)
    proc = run_cli("locate", "p.jpg", "--config", "g.toml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: g.toml: not UTF-8 at byte 5 (save the config file as UTF-8)"]


def test_image_module_installs_no_decompression_bomb_filter():
    """images.py used to silence Pillow's DecompressionBombWarning for the whole process."""
    import warnings

    import geoagent.images  # noqa: F401

    assert not [f for f in warnings.filters if f[2] is Image.DecompressionBombWarning]
