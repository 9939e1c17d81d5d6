"""Exact and near-duplicate matches win (issue 11, part 2): a copy of an indexed photo is answered with that
photo's coordinate whatever the look-alikes around it say, from a threshold each index measures at build time."""

from __future__ import annotations

import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from conftest import TINY_CLIP, run_cli
from geoagent.agent.controller import GeoAgent
from geoagent.config import AgentConfig, Settings
from geoagent.eval.synthetic import perturb, save_with_gps, scene
from geoagent.geo import haversine_km
from geoagent.output import print_result
from geoagent.retrieval.duplicates import EXACT_COPY_SIMILARITY, NearDuplicateCalibration, choose_threshold, resolve_threshold
from geoagent.retrieval.index import ReferenceIndex, build_index, current_version, index_summary
from geoagent.retrieval.retriever import Retriever
from geoagent.types import LocateResult

TOWN = (43.4674, 11.8851)
LONE_KM = 55.0
PALETTE = 0  # every scene in the colours of one region: the look-alikes retrieval cannot tell apart


@dataclass
class Gallery:
    root: Path
    index: Path
    photos: dict[Path, tuple[float, float]]  # every indexed photo and its coordinate
    lone: Path
    retriever: Retriever

    def settings(self, **agent: object) -> Settings:
        return Settings(
            retrieval={"clip_model": TINY_CLIP, "clip_pretrained": "none", "index": str(self.index)},
            agent={"strategy": "none", **agent},
        )


def _offset(km: float, bearing: float) -> tuple[float, float]:
    lat, lon = TOWN
    return lat + km / 111.2 * math.cos(bearing), lon + km / (111.2 * math.cos(math.radians(lat))) * math.sin(bearing)


def indexed_gallery(root: Path, spots: dict[str, tuple[int, float, float]], lone: str) -> Gallery:
    """Scenes saved with GPS as ``root/photos/NAME.jpg`` (NAME -> (scene seed, km from the town, bearing)), indexed."""
    from geoagent.config import RetrievalConfig
    from geoagent.retrieval.embedder import Embedder

    photos = {}
    for name, (seed, km, bearing) in spots.items():
        path, coordinate = root / "photos" / f"{name}.jpg", _offset(km, bearing)
        save_with_gps(scene(seed, palette_seed=PALETTE), path, *coordinate, quality=92)
        photos[path] = coordinate
    embedder = Embedder.load(RetrievalConfig(clip_model=TINY_CLIP, clip_pretrained="none"))
    build_index(root / "photos", root / "index", embedder)
    return Gallery(root, root / "index", photos, root / "photos" / f"{lone}.jpg", Retriever(embedder, ReferenceIndex.open(root / "index")))


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Gallery:
    """Nine photos of one town (different scenes 0.3-1.5 km from its centre) and one of a town 55 km west, indexed."""
    spots = {f"town-{i}": (i, 0.3 + 0.15 * i, 2 * math.pi * i / 9) for i in range(9)} | {"lone": (100, LONE_KM, -math.pi / 2)}
    return indexed_gallery(tmp_path_factory.mktemp("gallery"), spots, "lone")


async def locate(gallery: Gallery, photo: Path, retriever: Retriever | None = None, **agent: object) -> LocateResult:
    async with GeoAgent(gallery.settings(**agent), retriever=retriever or gallery.retriever) as geoagent:
        return await geoagent.locate(photo)


def reencoded_half_size(path: Path, out: Path) -> Path:
    """The copy a messenger makes: half the size, JPEG quality 60, no EXIF."""
    with Image.open(path) as image:
        image.convert("RGB").resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS).save(out, quality=60)
    return out


def km_from(result: LocateResult, coordinate: tuple[float, float]) -> float:
    return float(haversine_km(result.lat, result.lon, *coordinate))


async def test_the_lone_photo_among_look_alikes_answers_with_its_own_coordinate(gallery):
    """--strategy none over nine look-alikes of one town and one photo 55 km away: locating that photo returns
    its own indexed coordinate, marked near_duplicate; with the override off, the cluster's consensus wins (the
    bug the default fixes)."""
    result = await locate(gallery, gallery.lone)
    assert result.match == "near_duplicate" and km_from(result, gallery.photos[gallery.lone]) < 1e-3
    assert json.loads(result.model_dump_json())["match"] == "near_duplicate"
    assert result.candidates[0].retrieval_score == pytest.approx(1.0, abs=1e-5)
    shown = Console(file=io.StringIO(), width=200, color_system=None)
    print_result(shown, result)
    assert "near-duplicate of reference lone.jpg (similarity 1.0000)" in shown.file.getvalue()  # type: ignore[attr-defined]

    consensus = await locate(gallery, gallery.lone, near_duplicate_similarity="off")
    assert consensus.match is None and km_from(consensus, gallery.photos[gallery.lone]) > LONE_KM - 5


async def test_a_reencoded_half_size_copy_of_any_indexed_photo_is_its_near_duplicate(gallery, tmp_path):
    """Each photo's quality-60, half-size copy is answered with that photo's coordinate, marked near_duplicate."""
    for photo, coordinate in gallery.photos.items():
        result = await locate(gallery, reencoded_half_size(photo, tmp_path / f"copy-{photo.name}"))
        assert result.match == "near_duplicate", photo.name
        assert km_from(result, coordinate) < 1e-3, photo.name


async def test_a_merely_similar_photo_is_not_a_near_duplicate(gallery, tmp_path):
    """Another view of an indexed scene (reframed, re-lit, partly hidden) and new scenes of the same town are
    located the ordinary way: no match, the ranking is the consensus's."""
    similar = [perturb(scene(i, palette_seed=PALETTE), 7) for i in range(9)] + [scene(200 + i, palette_seed=PALETTE) for i in range(6)]
    threshold = gallery.retriever.source.manifest.near_duplicates.threshold  # type: ignore[attr-defined]
    for i, image in enumerate(similar):
        path = tmp_path / f"similar-{i}.jpg"
        image.save(path, quality=92)
        result = await locate(gallery, path)
        assert result.match is None, f"similar-{i}: {result.candidates[0].retrieval_score} >= {threshold}"


def test_index_build_measures_copies_and_different_photos(gallery):
    """The manifest holds each kind of copy's similarities, the different photos', and a threshold between them."""
    index = ReferenceIndex.open(gallery.index)
    measured = index.manifest.near_duplicates
    assert measured is not None and measured.sampled == len(gallery.photos)
    assert set(measured.copies) == {"reencoded", "reencoded_half_size", "reencoded_cropped"}
    assert max(measured.distinct) < measured.distinct_bound < measured.threshold  # type: ignore[operator]
    assert measured.separated and all(min(measured.copies[kind]) > measured.threshold for kind in measured.separated)
    assert "a reference is the answer from similarity" in str(index_summary(index)["near_duplicates"])


def test_the_threshold_lies_between_different_photos_and_the_copies_told_apart():
    """Halfway (on a log scale of 1 - similarity) between the plausible bound of different photos and the farthest
    copy of the kinds told apart; a kind that overlaps is left out; none told apart leaves exact copies only."""
    distinct = [0.90, 0.92, 0.94]
    bound = 1 - 0.06**2 / 0.08  # as far past the most similar different photo as it lies past the median one
    threshold, measured_bound, separated = choose_threshold({"a": [0.99, 0.995], "b": [0.999, 0.998], "c": [0.95, 0.97]}, distinct)
    assert measured_bound == pytest.approx(bound, abs=1e-6) and separated == ["a", "b"]
    assert threshold == pytest.approx(1 - math.sqrt((1 - bound) * 0.01), abs=1e-6)
    assert 0.94 < bound < threshold < 0.99

    threshold, _, separated = choose_threshold({"c": [0.95, 0.97]}, distinct)
    assert separated == [] and threshold == EXACT_COPY_SIMILARITY
    assert choose_threshold({"a": [0.99]}, []) == (None, None, [])


def test_the_setting_overrides_the_index_or_turns_the_override_off():
    """A number wins; "off" (or false) never overrides; unset takes the index's threshold, exact copies only for an
    index built before calibration, and nothing for the gazetteer."""
    measured = NearDuplicateCalibration(threshold=0.97, sampled=1, copies={}, distinct=[0.9])
    assert resolve_threshold(0.9, measured, indexed=True) == 0.9
    assert resolve_threshold("off", measured, indexed=True) is None
    assert resolve_threshold(None, measured, indexed=True) == 0.97
    assert resolve_threshold(None, None, indexed=True) == EXACT_COPY_SIMILARITY
    assert resolve_threshold(None, None, indexed=False) is None
    assert AgentConfig(near_duplicate_similarity=False).near_duplicate_similarity == "off"
    assert AgentConfig(near_duplicate_similarity="0.95").near_duplicate_similarity == 0.95
    for wrong in (True, 0, 1.5, "maybe"):
        with pytest.raises(ValueError, match=r'a cosine similarity in \(0, 1\], "off", or unset'):
            AgentConfig(near_duplicate_similarity=wrong)


async def test_an_index_built_before_calibration_counts_exact_copies_and_says_so(gallery, tmp_path):
    """An older manifest (no near_duplicates) still reads; the exact copy wins, and preflight warns once."""
    old = tmp_path / "old-index"
    shutil.copytree(gallery.index, old)
    manifest = current_version(old) / "manifest.json"  # type: ignore[operator]
    raw = json.loads(manifest.read_text())
    del raw["near_duplicates"]
    manifest.write_text(json.dumps(raw))
    retriever = Retriever(gallery.retriever.embedder, ReferenceIndex.open(old))
    result = await locate(gallery, gallery.lone, retriever=retriever)
    assert result.match == "near_duplicate" and km_from(result, gallery.photos[gallery.lone]) < 1e-3
    async with GeoAgent(gallery.settings(), retriever=retriever) as geoagent:
        readiness = await geoagent.preflight()
        assert geoagent.near_duplicate_threshold() == EXACT_COPY_SIMILARITY
    assert [w for w in readiness.warnings if "built before near-duplicate calibration" in w] and not readiness.problems


def test_locate_json_marks_the_copy_and_not_the_look_alike(gallery, tmp_path):
    """End to end: `geoagent locate ... --strategy none --json` gives the lone photo its own coordinate and
    "match": "near_duplicate", the same for a re-encoded half-size copy, and null for another view of a scene;
    stderr, a pipe, gets no progress bar."""
    copy = reencoded_half_size(gallery.lone, tmp_path / "copy.jpg")
    perturb(scene(3, palette_seed=PALETTE), 7).save(tmp_path / "similar.jpg", quality=92)
    (tmp_path / "geoagent.toml").write_text(
        f'[retrieval]\nclip_model = "{TINY_CLIP}"\nclip_pretrained = "none"\nindex = "{gallery.index}"\n'
    )
    proc = run_cli("locate", str(gallery.lone), str(copy), "similar.jpg", "--strategy", "none", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lone, copied, similar = (json.loads(line) for line in proc.stdout.splitlines())
    for answer in (lone, copied):
        assert answer["match"] == "near_duplicate" and haversine_km(answer["lat"], answer["lon"], *gallery.photos[gallery.lone]) < 1e-3
    assert similar.get("match") is None and similar["candidates"]  # absent: JSON leaves out empty fields
    assert "━" not in proc.stderr and "0/3" not in proc.stderr  # stderr is no terminal here: no progress bar


@pytest.fixture(scope="module")
def one_town(tmp_path_factory: pytest.TempPathFactory) -> Gallery:
    """Nine photos of one town, every one within 1 km of every other (0.05-0.45 km from its centre), indexed."""
    spots = {f"street-{i}": (i, 0.05 + 0.05 * i, 2 * math.pi * i / 9) for i in range(9)}
    town = indexed_gallery(tmp_path_factory.mktemp("one-town"), spots, "street-0")
    assert max(haversine_km(*p, *q) for p in town.photos.values() for q in town.photos.values()) < 1.0
    return town


async def test_a_one_town_gallery_still_recognises_a_copy(one_town, tmp_path):
    """Issue 18 point 8: with no reference over 1 km from another, calibration compares each photo with the other
    photos of the town (a different photo of the same street is no copy), so the index gets a threshold, says how it
    was measured, and a half-size quality-60 copy of an indexed photo is answered as its near-duplicate."""
    measured = ReferenceIndex.open(one_town.index).manifest.near_duplicates
    assert measured is not None and measured.threshold is not None and measured.distinct_km == 0
    assert len(measured.distinct) == len(one_town.photos) and measured.separated
    info = str(index_summary(ReferenceIndex.open(one_town.index))["near_duplicates"])
    assert "a reference is the answer from similarity" in info and "different photos of one place were compared" in info
    for photo, coordinate in list(one_town.photos.items())[:3]:
        result = await locate(one_town, reencoded_half_size(photo, tmp_path / f"copy-{photo.name}"))
        assert result.match == "near_duplicate", photo.name
        assert km_from(result, coordinate) < 1e-3, photo.name
    (tmp_path / "geoagent.toml").write_text(f'[retrieval]\nclip_model = "{TINY_CLIP}"\nclip_pretrained = "none"\nindex = "{one_town.index}"\n')
    proc = run_cli("locate", str(tmp_path / f"copy-{one_town.lone.name}"), "--strategy", "none", "--json", cwd=tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout)["match"] == "near_duplicate", proc.stderr


def test_a_gallery_of_one_photo_says_no_threshold_can_be_set_and_keeps_exact_copies():
    """No other photo to compare with: the calibration says so in one line, and exact copies still win."""
    lonely = NearDuplicateCalibration(threshold=None, sampled=1, copies={"reencoded": [0.99]}, distinct=[], distinct_bound=None)
    assert lonely.describe().startswith("no threshold can be set") and str(EXACT_COPY_SIMILARITY) in lonely.describe()
    assert resolve_threshold(None, lonely, indexed=True) == EXACT_COPY_SIMILARITY
