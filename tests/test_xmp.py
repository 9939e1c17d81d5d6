"""batch --xmp writes answers where photo managers read them: XMP sidecars, read back here with ExifTool (the
reader Immich and others rely on). Only answered photos without GPS of their own above the confidence
threshold get one; the photo files are never touched; an existing sidecar keeps every other tag; a sidecar
holding GPS or that is not XMP is left alone; a rerun changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest
from PIL import Image

from conftest import run_cli, write_world_config
from geoagent.batch.xmp import xmp_coordinate
from standin import WorldJudge

EXIFTOOL = shutil.which("exiftool")
#: What ExifTool reports about a file itself rather than its tags: equal-tag comparisons leave these out.
FILE_TAGS = {"SourceFile", "FileName", "Directory", "FileSize", "FileModifyDate", "FileAccessDate", "FileInodeChangeDate",
             "FilePermissions", "FileType", "FileTypeExtension", "MIMEType", "ExifToolVersion", "XMPToolkit"}  # fmt: skip


def exiftool(*args: str, read: bool = True) -> list[dict]:
    """ExifTool's JSON for the files named (``read=False``: a write, which prints no JSON)."""
    assert EXIFTOOL, "ExifTool is needed (Debian: apt-get install libimage-exiftool-perl; .ci/run installs it)"
    proc = subprocess.run([EXIFTOOL, *(["-j"] if read else []), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if read else []


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize(("value", "text"), [(48.858370, "48,51.50220000N"), (-33.8688, "33,52.12800000S"),
                                              (2.2944999, "2,17.66999400E"), (-0.00000001, "0,0.00000060W"), (179.99999999999, "180,0.00000000E")])  # fmt: skip
def test_xmp_gps_notation(value, text):
    """XMP writes GPS as DDD,MM.mmmmK: degrees, decimal minutes, hemisphere; a minute never rounds up to 60."""
    assert xmp_coordinate(value, "N" if "N" in text or "S" in text else "E", "S" if "N" in text or "S" in text else "W") == text


def test_batch_xmp_writes_exactly_the_sidecars_a_photo_library_should_get(standin, world, tmp_path):
    server = standin(judge=WorldJudge(world.truth))
    config = write_world_config(tmp_path / "agent.toml", world, server, tmp_path / "cache", strategy="tournament", reasoning=False)
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(world.queries[0].path, photos / "with-gps.jpg")  # the world's photos carry EXIF GPS
    for i, spot in enumerate(world.queries[1:6]):
        with Image.open(spot.path) as image:
            image.save(photos / f"p{i}.jpg", quality=92)  # pixels only: no EXIF, no GPS
    # A first pass finds each photo's confidence, to give the roles: the least sure falls below the threshold.
    first = run_cli("batch", str(photos), "--out", str(tmp_path / "first.jsonl"), "--config", str(config), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    entries = [json.loads(line) for line in (tmp_path / "first.jsonl").read_text().splitlines()]
    no_gps = sorted((e for e in entries if e["image"].rsplit("/", 1)[-1].startswith("p")), key=lambda e: e["confidence"])
    assert len(no_gps) == 5 and no_gps[0]["confidence"] < no_gps[1]["confidence"], [e["confidence"] for e in no_gps]
    threshold = (no_gps[0]["confidence"] + no_gps[1]["confidence"]) / 2
    below, corrupt, rated = no_gps[0]["image"], no_gps[1]["image"], no_gps[-1]["image"]
    rated_sidecar = tmp_path / "photos" / (rated.rsplit("/", 1)[-1] + ".xmp")
    exiftool("-overwrite_original", "-XMP-xmp:Rating=4", "-XMP-dc:Subject=holiday", "-XMP-dc:Subject=beach",
             "-XMP-dc:Title=Grandma's garden", "-XMP-xmp:Label=Red", str(rated_sidecar), read=False)  # fmt: skip
    before_rated = {k: v for k, v in exiftool(str(rated_sidecar))[0].items() if k not in FILE_TAGS}
    corrupt_sidecar = tmp_path / "photos" / (corrupt.rsplit("/", 1)[-1] + ".xmp")
    corrupt_sidecar.write_bytes(b"<x:xmpmeta this is not xml")
    photo_hashes = {name: h for name, h in digest(photos).items() if name.endswith(".jpg")}

    command = ["batch", str(photos), "--out", str(tmp_path / "run.jsonl"), "--config", str(config), "--xmp", "--min-confidence", f"{threshold:.6f}"]
    dry = run_cli(*command, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert sum(line.startswith("would write ") for line in dry.stderr.splitlines()) == 3 and "XMP: would write 3 sidecars" in dry.stderr
    assert not (photos / (below.rsplit("/", 1)[-1] + ".xmp")).exists()
    assert len([p for p in photos.iterdir() if p.suffix == ".xmp"]) == 2  # the two placed above: nothing new

    ran = run_cli(*command, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    sidecars = sorted(p.name for p in photos.glob("*.xmp"))
    answered = sorted(e["image"].rsplit("/", 1)[-1] + ".xmp" for e in no_gps[1:])  # every no-GPS photo above the threshold
    assert sidecars == answered  # none for the photo with GPS, none for the one below the threshold
    assert f"{corrupt_sidecar.name}: not valid XMP" in ran.stderr and corrupt_sidecar.read_bytes() == b"<x:xmpmeta this is not xml"
    journal = {e["image"].rsplit("/", 1)[-1]: e for e in map(json.loads, (tmp_path / "run.jsonl").read_text().splitlines())}
    for name in answered:
        if name == corrupt_sidecar.name:
            continue
        read = exiftool("-n", "-GPSLatitude", "-GPSLongitude", "-XMP-geoagent:all", str(photos / name))[0]
        truth = journal[name.removesuffix(".xmp")]
        assert read["GPSLatitude"] == pytest.approx(truth["lat"], abs=1e-6) and read["GPSLongitude"] == pytest.approx(truth["lon"], abs=1e-6)
    after_rated = {k: v for k, v in exiftool(str(rated_sidecar))[0].items() if k not in FILE_TAGS}
    added = set(after_rated) - set(before_rated)
    assert {k: after_rated[k] for k in before_rated} == before_rated  # rating, keywords, title, label kept exactly
    assert {"GPSLatitude", "GPSLongitude"} <= added
    assert {k: v for k, v in digest(photos).items() if k.endswith(".jpg")} == photo_hashes  # photos never written

    everything = digest(photos)
    again = run_cli(*command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert digest(photos) == everything and "XMP: wrote 0 sidecars, 3 unchanged" in again.stderr


def test_xmp_needs_its_extra_named_before_any_photo(tmp_path):
    """Without pyexiv2 the flag is a one-line usage error naming the extra (checked before anything is located)."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "pyexiv2.py").write_text("raise ImportError('blocked for the test')\n")
    (tmp_path / "photos").mkdir()
    proc = run_cli("batch", str(tmp_path / "photos"), "--out", str(tmp_path / "r.jsonl"), "--xmp", cwd=tmp_path,
                   env={"PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))})  # fmt: skip
    assert proc.returncode == 2 and "pip install 'geoagent-vlm[xmp]'" in proc.stderr and "Traceback" not in proc.stderr
