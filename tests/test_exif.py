"""Metadata first: EXIF read right on real camera files, refused when malformed, shown first, answered from
with --use-exif (no VLM request), and never used by eval (it would leak the truth into the score)."""

from __future__ import annotations

import asyncio
import json
import shutil
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from pathlib import Path

import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational
from rich.console import Console

from conftest import run_cli, write_world_config
from geoagent.eval.datasets import load_dataset
from geoagent.eval.runner import EvalRun, build_columns
from geoagent.exif import ExifGPS, ExifInfo, read_exif
from geoagent.geo import haversine_km, reverse_geocode
from geoagent.output import EXIF_AGREEMENT_KM, print_result
from geoagent.types import Candidate, LocateResult
from standin import WorldJudge

REAL = Path(__file__).parent / "data" / "exif"
DEGREES_TOLERANCE = 1e-6

# Real camera files (tests/data/exif/README.md names each one's origin and licence). Expected values read once
# by an independent reader, ExifTool 12.57 (Debian's libimage-exiftool-perl):
#   exiftool -n -Make -Model -Orientation -Composite:GPSLatitude -Composite:GPSLongitude -Composite:GPSAltitude
#            -DateTimeOriginal -OffsetTimeOriginal FILE
# (file, make, model, lat, lon, altitude_m, taken_at, orientation)
REAL_FILES = [
    ("exiftool-Apple.jpg", "Apple", "iPhone 7", 53.3828472222222, -1.45667777777778, 72.36649215, "2016-09-28T18:18:05", 1),
    ("exiftool-GoPro.jpg", "GoPro", "HERO6 Black", 40.6584191999722, -73.9933542999722, -3.983, "2017-10-03T10:58:29", 1),
    ("exiftool-Ricoh2.jpg", "RICOH", "Caplio Pro G3", 42.034575, -0.507502777777778, 117.0, "2006-05-26T11:48:48", 1),
    ("exiv2-FurnaceCreekInn.jpg", "Canon", "Canon PowerShot S5 IS", 36.4483333333333, -116.855, -14.28, "2008-05-08T09:54:28", 1),
    ("goexif-has-lens-info.jpg", "Apple", "iPhone 4S", 59.3325472222222, 18.0649416666667, 29.0, "2014-09-01T15:03:47", 6),
    ("node-exif-test2.jpg", "Apple", "iPhone 4S", 37.8146666666667, -122.264166666667, 2.0, "2012-12-23T14:47:49", None),
    ("pillow-ultrahdr.jpg", "Google", "Pixel 6", 30.62765, 119.738766666667, 98.9, "2024-05-07T09:33:04+08:00", 1),
    ("nikon1-aw1-exif-transplant.jpg", "NIKON CORPORATION", "NIKON 1 AW1", -35.5597783333333, 148.785953333333, 1601.0, "2016-03-17T16:37:48", 1),
    ("nokia-lumia820-exif-transplant.jpg", "Nokia", "Lumia 820", 55.0387558333333, 8.45719055555556, 0.05, "2013-05-10T15:21:35", 1),
]  # fmt: skip
# No real file with GPS in the south-west quarter was found in the registries' packages: the synthetic tests
# below cover S+W.


@pytest.mark.parametrize(("name", "make", "model", "lat", "lon", "altitude", "taken", "orientation"), REAL_FILES, ids=[r[0] for r in REAL_FILES])
def test_real_camera_files_read_as_exiftool_reads_them(name, make, model, lat, lon, altitude, taken, orientation):
    """GPS to 1e-6 degrees with the sign of S and W, altitude below sea level negative, camera, capture time
    (with its UTC offset where the camera wrote OffsetTimeOriginal) and orientation, as ExifTool reads them."""
    info = read_exif(REAL / name)
    assert info is not None and info.gps is not None
    assert info.gps.lat == pytest.approx(lat, abs=DEGREES_TOLERANCE)
    assert info.gps.lon == pytest.approx(lon, abs=DEGREES_TOLERANCE)
    assert info.gps.altitude_m == pytest.approx(altitude, abs=1e-6)
    assert (info.make, info.model, info.orientation) == (make, model, orientation)
    assert info.taken_at == datetime.fromisoformat(taken) and (info.taken_at.tzinfo is None) == ("+" not in taken)


def test_real_files_cover_three_hemisphere_quarters():
    """What the real files prove: north-east, north-west and south-east (no real south-west file was found)."""
    quarters = {("N" if lat >= 0 else "S") + ("E" if lon >= 0 else "W") for _, _, _, lat, lon, *_ in REAL_FILES}
    assert quarters == {"NE", "NW", "SE"}


def test_real_file_with_gps_written_as_text_gives_no_position():
    """An HTC One M8 wrote its GPS as text ("52,00000,50,00000,34,01180"): ambiguous, so no position rather than
    a guess (ExifTool reads it as 52.0139, 11.0028; its own minutes say 52.84). The capture time still reads."""
    info = read_exif(REAL / "goexif-geodegrees_as_string.jpg")
    assert info is not None and info.gps is None
    assert info.taken_at == datetime(2014, 4, 26, 19, 9, 19)


# --- synthetic files (written here with Pillow) -------------------------------------------------------------


def synthetic_jpeg(path: Path, gps: dict[int, object] | None = None, ifd0: dict[int, object] | None = None,
                   exif_ifd: dict[int, object] | None = None) -> Path:
    """A synthetic 8x8 JPEG with the given EXIF tags (GPS IFD, IFD0, Exif IFD)."""
    exif = Image.Exif()
    exif.update(ifd0 or {})
    if gps:
        exif.get_ifd(0x8825).update(gps)
    if exif_ifd:
        exif.get_ifd(0x8769).update(exif_ifd)
    Image.new("RGB", (8, 8), (90, 120, 150)).save(path, exif=exif)
    return path


def dms(numerators: tuple[int, int, int], denominators: tuple[int, int, int] = (1, 1, 100)) -> tuple[IFDRational, ...]:
    return tuple(IFDRational(n, d) for n, d in zip(numerators, denominators))


HEMISPHERES = [("N", "E", 1, 1), ("N", "W", 1, -1), ("S", "E", -1, 1), ("S", "W", -1, -1)]


@pytest.mark.parametrize(("lat_ref", "lon_ref", "lat_sign", "lon_sign"), HEMISPHERES)
def test_synthetic_gps_in_each_hemisphere_is_exact_and_signed(tmp_path, lat_ref, lon_ref, lat_sign, lon_sign):
    """Rationals become degrees exactly (the value is the nearest double to d + m/60 + s/3600), signed by ref."""
    path = synthetic_jpeg(tmp_path / "g.jpg", {1: lat_ref, 2: dms((33, 52, 3127)), 3: lon_ref, 4: dms((151, 12, 4511))})
    gps = read_exif(path).gps
    assert gps.lat == lat_sign * float(Fraction(33) + Fraction(52, 60) + Fraction(3127, 360000))
    assert gps.lon == lon_sign * float(Fraction(151) + Fraction(12, 60) + Fraction(4511, 360000))


def test_altitude_below_sea_level_is_negative(tmp_path):
    gps = {1: "N", 2: dms((31, 30, 0)), 3: "E", 4: dms((35, 30, 0)), 5: b"\x01", 6: IFDRational(4301, 10)}
    assert read_exif(synthetic_jpeg(tmp_path / "dead-sea.jpg", gps)).gps.altitude_m == pytest.approx(-430.1)


MALFORMED = {
    "latitude ref missing": {2: dms((33, 52, 0)), 3: "W", 4: dms((70, 40, 0))},
    "longitude ref missing": {1: "S", 2: dms((33, 52, 0)), 4: dms((70, 40, 0))},
    "ref not a hemisphere": {1: "X", 2: dms((33, 52, 0)), 3: "W", 4: dms((70, 40, 0))},
    "zero denominator": {1: "S", 2: dms((33, 52, 0), (0, 1, 1)), 3: "W", 4: dms((70, 40, 0))},
    "longitude missing": {1: "S", 2: dms((33, 52, 0)), 3: "W"},
    "latitude over 90": {1: "N", 2: dms((95, 0, 0)), 3: "E", 4: dms((10, 0, 0))},
    "receiver marked the fix void": {1: "N", 2: dms((48, 51, 0)), 3: "E", 4: dms((2, 21, 0)), 9: "V"},
    "null island placeholder": {1: "N", 2: dms((0, 0, 0)), 3: "E", 4: dms((0, 0, 0))},
}


@pytest.mark.parametrize("gps", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_or_partial_gps_gives_no_position_and_keeps_the_rest(tmp_path, gps):
    """A GPS block that cannot give a sure point gives none (never a crash, never a wrong point); the camera
    fields of the same file still read."""
    info = read_exif(synthetic_jpeg(tmp_path / "bad.jpg", gps, ifd0={0x010F: "Canon", 0x0110: "EOS 5D"}))
    assert info is not None and info.gps is None and info.camera == "Canon EOS 5D"


def test_capture_time_with_and_without_a_valid_offset(tmp_path):
    stamp = {0x9003: "2021:07:04 18:30:05"}
    west = read_exif(synthetic_jpeg(tmp_path / "a.jpg", exif_ifd={**stamp, 0x9011: "-03:00"}))
    assert west.taken_at == datetime(2021, 7, 4, 18, 30, 5, tzinfo=timezone(timedelta(hours=-3)))
    junk_offset = read_exif(synthetic_jpeg(tmp_path / "b.jpg", exif_ifd={**stamp, 0x9011: "+3h"}))
    assert junk_offset.taken_at == datetime(2021, 7, 4, 18, 30, 5) and junk_offset.taken_at.tzinfo is None
    placeholder = read_exif(synthetic_jpeg(tmp_path / "c.jpg", exif_ifd={0x9003: "0000:00:00 00:00:00"}, ifd0={0x0112: 3}))
    assert placeholder.taken_at is None and placeholder.orientation == 3


def test_no_exif_or_not_an_image_gives_none(tmp_path):
    plain = tmp_path / "plain.jpg"
    Image.new("RGB", (8, 8)).save(plain)
    (tmp_path / "text.jpg").write_text("not a photo")
    assert read_exif(plain) is None
    assert read_exif(tmp_path / "text.jpg") is None
    assert read_exif(tmp_path / "missing.jpg") is None


# --- shown first ---------------------------------------------------------------------------------------------


def visual_result(lat: float, lon: float, exif: ExifInfo | None) -> LocateResult:
    point = Candidate(id="x", lat=lat, lon=lon, country="IT", place="Siena", source="gazetteer", rank=1)
    return LocateResult(image="p.jpg", lat=lat, lon=lon, country="IT", place="Siena", confidence=0.5, candidates=[point], exif=exif)


def rendered(result: LocateResult) -> list[str]:
    console = Console(record=True, width=200, color_system=None)
    print_result(console, result)
    return console.export_text().splitlines()


def test_human_output_shows_exif_first_and_whether_the_visual_answer_agrees():
    """First line: the EXIF position with its nearest place; then camera and time; after the answer, agreement
    with the distance (near: agrees; far: disagrees)."""
    exif = ExifInfo(gps=ExifGPS(lat=43.4674, lon=11.8851), make="NIKON", model="COOLPIX P6000",
                    taken_at=datetime(2008, 10, 22, 16, 29, 49, tzinfo=timezone(timedelta(hours=2))))
    country, place = reverse_geocode(43.4674, 11.8851)[0]
    near = rendered(visual_result(43.3188, 11.3308, exif))  # Siena, ~48 km
    assert near[0] == f"EXIF GPS: 43.4674, 11.8851 ({place}, {country})" and (place, country) == ("Arezzo", "IT")
    assert near[1] == "EXIF: camera NIKON COOLPIX P6000, taken 2008-10-22 16:29:49+02:00"
    km = float(haversine_km(43.3188, 11.3308, 43.4674, 11.8851))
    assert f"visual answer disagrees with EXIF GPS: {km:.1f} km apart" in near
    close = rendered(visual_result(43.4600, 11.8800, exif))
    km = float(haversine_km(43.46, 11.88, 43.4674, 11.8851))
    assert km < EXIF_AGREEMENT_KM and f"visual answer agrees with EXIF GPS: {km:.1f} km apart" in close
    assert rendered(visual_result(43.46, 11.88, None))[0] == "EXIF: none"


# --- --use-exif and eval, through the command line ----------------------------------------------------------


def strip_exif(data: bytes) -> bytes:
    """The JPEG without its EXIF (APP1 "Exif") segment; every other byte, the pixels included, kept."""
    out, i = bytearray(data[:2]), 2
    while data[i] == 0xFF and data[i + 1] != 0xDA:  # segments up to the start of scan
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if not (data[i + 1] == 0xE1 and data[i + 4 : i + 10] == b"Exif\x00\x00"):
            out += data[i:end]
        i = end
    return bytes(out + data[i:])


def test_use_exif_answers_from_gps_with_no_vlm_request_and_others_go_visual(standin, world, tmp_path):
    """--use-exif: each real camera file is answered from its GPS (source "exif", one candidate, 0 VLM requests);
    a stripped photo is located visually in the same run."""
    server = standin(judge=WorldJudge(world.truth))
    config = write_world_config(tmp_path / "c.toml", world, server, tmp_path / "cache", strategy="tournament", reasoning=False)
    stripped = tmp_path / "stripped.jpg"
    stripped.write_bytes(strip_exif(world.queries[0].path.read_bytes()))
    assert read_exif(stripped) is None and read_exif(world.queries[0].path).gps is not None
    real = [REAL / name for name, *_ in REAL_FILES]
    proc = run_cli("locate", "--use-exif", "--json", "--no-cache", "--top-k", "4", "--config", str(config), *map(str, real), str(stripped), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    by_exif, (visual,) = results[: len(real)], results[len(real) :]
    for result, (_, _, _, lat, lon, *_) in zip(by_exif, REAL_FILES):
        assert result["source"] == "exif" and result["stats"]["vlm_calls"] == 0
        assert (result["lat"], result["lon"]) == pytest.approx((lat, lon), abs=DEGREES_TOLERANCE)
        assert [(c["source"], c["lat"], c["lon"]) for c in result["candidates"]] == [("exif", result["lat"], result["lon"])]
    assert visual["source"] == "visual" and visual["exif"] is None and visual["stats"]["vlm_calls"] > 0
    assert len(server.chat_requests()) == visual["stats"]["vlm_calls"]  # none for the EXIF answers


def test_use_exif_needs_no_server_or_weights_and_shows_the_exif_answer(tmp_path):
    """When every photo carries EXIF GPS, --use-exif needs neither a VLM server nor CLIP weights (none will be
    used); the human output leads with the EXIF position and says the answer came from it."""
    (tmp_path / "geoagent.toml").write_text(
        '[backends.local]\nbase_url = "http://127.0.0.1:9"\n[retrieval]\nclip_pretrained = "/nonexistent/weights.bin"\n'
    )
    proc = run_cli("locate", "--use-exif", str(REAL / "exiftool-Apple.jpg"), str(REAL / "nikon1-aw1-exif-transplant.jpg"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "EXIF GPS: 53.3828, -1.4567 (Sheffield, GB), altitude 72 m"
    assert lines[1] == "EXIF: camera Apple iPhone 7, taken 2016-09-28 18:18:05 (no UTC offset recorded)"
    assert "EXIF GPS: -35.5598, 148.7860 (Tuggeranong, AU), altitude 1601 m" in lines
    assert proc.stdout.count("answered from EXIF GPS (--use-exif): no model ran") == 2


def test_eval_never_answers_from_exif_a_geotagged_folder_scores_as_its_stripped_copy(standin, world, tmp_path):
    """eval turns use_exif off: over a folder whose photos carry their true GPS (config use_exif = true) every
    photo is located visually, and the same photos with EXIF stripped score the same, their every VLM request a
    cache hit (so no EXIF reached any prompt). In-process, as `geoagent eval` runs it (saves two CLI starts)."""
    server = standin(judge=WorldJudge(world.truth))
    config = write_world_config(tmp_path / "c.toml", world, server, tmp_path / "cache", strategy="tournament", reasoning=False, top_k=4, use_exif=True)
    tagged, bare = tmp_path / "tagged", tmp_path / "bare"
    tagged.mkdir(), bare.mkdir()
    rows = ["path,lat,lon"]
    for spot in world.queries[:4]:
        shutil.copy(spot.path, tagged / spot.path.name)
        (bare / spot.path.name).write_bytes(strip_exif(spot.path.read_bytes()))
        gps = read_exif(spot.path).gps
        rows.append(f"bare/{spot.path.name},{gps.lat!r},{gps.lon!r}")
    (tmp_path / "bare.csv").write_text("\n".join(rows) + "\n")

    def evaluate(dataset: Path) -> tuple[dict, list]:
        run = EvalRun(load_dataset(dataset), build_columns([f"c={config}"], []))
        asyncio.run(run.execute())
        return run.report()["columns"]["c"], run.predictions["c"]

    with_gps, predictions = evaluate(tagged)
    assert with_gps["settings"]["agent"]["use_exif"] is False and with_gps["metrics"]["n"] == 4
    assert all(p.vlm_calls > 0 for p in predictions)  # each photo located visually, not from its GPS
    server.reset_log()
    stripped, _ = evaluate(tmp_path / "bare.csv")
    assert server.chat_requests() == [] and stripped["metrics"]["cache_hits"] == with_gps["metrics"]["vlm_calls"]
    for metric in ("acc@1km", "acc@25km", "acc@200km", "median_km", "geoscore"):
        assert with_gps["metrics"][metric] == pytest.approx(stripped["metrics"][metric]), metric
