"""Retrieval: building indexes from folders and CSVs, searching them, submaps, and the embedder contract."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geoagent.config import RetrievalConfig
from geoagent.errors import ConfigError, InputError, WeightsError
from geoagent.eval.synthetic import perturb, save_with_gps, scene
from geoagent.retrieval.embedder import Embedder
from geoagent.retrieval.index import IndexMismatchError, ReferenceIndex, build_index, current_version
from geoagent.retrieval.retriever import Retriever

TINY = str(Path(__file__).parent / "data" / "tiny-clip.json")
N_PHOTOS = 200


def tiny_config(**kwargs: object) -> RetrievalConfig:
    return RetrievalConfig(**{"clip_model": TINY, "clip_pretrained": "none", **kwargs})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.load(tiny_config())


def coordinates(i: int) -> tuple[float, float]:
    rng = np.random.default_rng(i)
    return float(rng.uniform(-60, 70)), float(rng.uniform(-179, 179))


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 geotagged JPEGs in nested folders, odd-but-valid photos, and junk."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(N_PHOTOS):
        lat, lon = coordinates(i)
        save_with_gps(scene(i, palette_seed=i % 20), root / f"region{i % 5}" / f"p{i:03d}.jpg", lat, lon, quality=92)
    save_with_gps(scene(900).convert("CMYK"), root / "odd" / "cmyk.jpg", 48.85, 2.35)
    scene(901).save(root / "odd" / "no_gps.jpg")
    (root / "junk").mkdir()
    (root / "junk" / "empty.jpg").write_bytes(b"")
    (root / "junk" / "notes.jpg").write_text("this is not a photo")
    good = root / "region0" / "p000.jpg"
    (root / "junk" / "truncated.jpg").write_bytes(good.read_bytes()[:400])
    return root


def write_csv(folder: Path, out: Path) -> Path:
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "lat", "lon"])
        for i in range(N_PHOTOS):
            lat, lon = coordinates(i)
            writer.writerow([os.path.relpath(folder / f"region{i % 5}" / f"p{i:03d}.jpg", out.parent), lat, lon])
        writer.writerow(["junk/missing.jpg", 1, 2])
        writer.writerow([os.path.relpath(folder / "junk" / "notes.jpg", out.parent), 10, 20])
        writer.writerow([os.path.relpath(folder / "region0" / "p001.jpg", out.parent), "north", 20])
    return out


def test_folder_build_indexes_photos_and_names_the_junk(photo_folder, embedder, tmp_path):
    report = build_index(photo_folder, tmp_path / "idx", embedder, kmeans_k=10)
    assert report.indexed == N_PHOTOS + 1  # the CMYK photo is converted and indexed
    skipped = dict(report.skipped)
    assert skipped["odd/no_gps.jpg"] == "no GPS in EXIF"
    assert skipped["junk/empty.jpg"] == "empty file" and skipped["junk/notes.jpg"].startswith("not an image")
    assert set(skipped) == {"odd/no_gps.jpg", "junk/empty.jpg", "junk/notes.jpg", "junk/truncated.jpg"}
    index = ReferenceIndex.open(tmp_path / "idx")
    entry = next(e for e in index.entries if e.id == "odd/cmyk.jpg")
    assert (entry.country, entry.place) == ("FR", "Paris")
    assert index.manifest.kmeans_k == 10 and set(index.table.cluster) <= set(range(10))


def test_csv_build_names_bad_rows(photo_folder, embedder, tmp_path):
    report = build_index(write_csv(photo_folder, tmp_path / "refs.csv"), tmp_path / "idx", embedder)
    assert report.indexed == N_PHOTOS
    reasons = {name.rsplit("/", 1)[-1]: reason for name, reason in report.skipped}
    assert reasons["missing.jpg"] == "file not found"
    assert reasons["notes.jpg"].startswith("not an image")
    assert reasons["p001.jpg"] == "invalid lat/lon"


def test_indexed_photos_find_themselves_and_perturbed_copies_rank_in_top_10(photo_folder, embedder, tmp_path):
    build_index(photo_folder, tmp_path / "idx", embedder)
    index = ReferenceIndex.open(tmp_path / "idx")
    retriever = Retriever(embedder, index)
    originals = [scene(i, palette_seed=i % 20) for i in range(N_PHOTOS)]
    exact = embedder.embed_images_sync([Image.open(photo_folder / f"region{i % 5}" / f"p{i:03d}.jpg") for i in range(N_PHOTOS)])
    assert all(retriever.search_sync(v, 1)[0].id == f"region{i % 5}/p{i:03d}.jpg" for i, v in enumerate(exact))
    copies = embedder.embed_images_sync([perturb(img, 5000 + i) for i, img in enumerate(originals)])
    hits = sum(f"region{i % 5}/p{i:03d}.jpg" in {c.id for c in retriever.search_sync(v, 10)} for i, v in enumerate(copies))
    assert hits / N_PHOTOS >= 0.9


def test_search_restricted_to_a_submap_without_rebuilding(photo_folder, embedder, tmp_path):
    build_index(photo_folder, tmp_path / "idx", embedder, kmeans_k=8)
    index = ReferenceIndex.open(tmp_path / "idx")
    retriever = Retriever(embedder, index)
    query = embedder.embed_images_sync([scene(3, palette_seed=3)])[0]
    country = index.entries[0].country
    assert {c.country for c in retriever.search_sync(query, 10, countries={country})} == {country}
    cluster = int(index.table.cluster[0])
    found = retriever.search_sync(query, 5, clusters={cluster})
    assert found and all(index.table.cluster[[e.id for e in index.entries].index(c.id)] == cluster for c in found)
    assert retriever.search_sync(query, 5, countries={"ZZ"}) == []


def test_rebuild_embeds_only_new_or_changed_files_and_swaps_atomically(photo_folder, embedder, tmp_path):
    folder = tmp_path / "photos"
    for i in range(30):
        save_with_gps(scene(i), folder / f"{i}.jpg", *coordinates(i))
    first = build_index(folder, tmp_path / "idx", embedder)
    assert (first.embedded, first.reused) == (30, 0)
    save_with_gps(scene(99), folder / "new.jpg", 1.0, 2.0)
    os.utime(folder / "3.jpg", ns=(time.time_ns(), time.time_ns() + 10**9))
    second = build_index(folder, tmp_path / "idx", embedder)
    assert (second.embedded, second.reused, second.indexed) == (2, 29, 31)
    assert [p.name for p in (tmp_path / "idx").iterdir() if p.is_dir()] == [current_version(tmp_path / "idx").name]


def test_an_interrupted_build_leaves_the_previous_index_usable(photo_folder, embedder, tmp_path):
    folder = tmp_path / "photos"
    for i in range(12):
        save_with_gps(scene(i), folder / f"{i}.jpg", *coordinates(i))
    build_index(folder, tmp_path / "idx", embedder)
    save_with_gps(scene(50), folder / "late.jpg", 3.0, 4.0)

    def interrupt(_done: int, _embedded: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(folder, tmp_path / "idx", embedder, progress=interrupt)
    assert ReferenceIndex.open(tmp_path / "idx").manifest.count == 12


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_approximate_index_types_build_and_search(index_type, embedder, tmp_path):
    from geoagent.retrieval.vectors import build_faiss

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = build_faiss(vectors, index_type)  # type: ignore[arg-type]
    _, ids = index.search(vectors[:50], 1)
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.95


def test_another_embedder_cannot_search_the_index(photo_folder, embedder, tmp_path):
    folder = tmp_path / "photos"
    for i in range(5):
        save_with_gps(scene(i), folder / f"{i}.jpg", *coordinates(i))
    build_index(folder, tmp_path / "idx", embedder)
    with pytest.raises(IndexMismatchError, match="built with embedder tiny-clip / none, seed 0"):
        Retriever.load_sync(tiny_config(index=tmp_path / "idx", seed=1), tmp_path / "cache")


def test_an_embedders_spec_is_known_without_importing_open_clip_and_is_the_one_a_loaded_model_has(embedder):
    """What the Ray workers and the Ray build's driver check an index against: in a fresh process, the spec of a
    model open_clip ships and of a config JSON is computed with neither open_clip nor PyTorch imported (they
    cost a worker seconds and memory); each shipped model's config is the very one open_clip registers (so an
    index's recorded hash is unchanged), and the JSON's spec is the loaded embedder's."""
    from open_clip.factory import _MODEL_CONFIGS

    from geoagent.retrieval.embedder import _model_config

    code = (
        "import sys, json; from geoagent.config import RetrievalConfig; from geoagent.retrieval.embedder import embedder_spec;"
        "specs = [embedder_spec(RetrievalConfig(clip_model=m, clip_pretrained='none')).model_dump() for m in sys.argv[1:]];"
        "print(json.dumps([specs, sorted(m for m in ('torch', 'open_clip') if m in sys.modules)]))"
    )
    proc = subprocess.run([sys.executable, "-c", code, "ViT-B-32", TINY], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (shipped, tiny), imported = json.loads(proc.stdout)
    assert imported == []
    assert tiny == embedder.spec.model_dump() and shipped["model"] == "ViT-B-32"
    assert [name for name in _MODEL_CONFIGS if _model_config(name)[1] != _MODEL_CONFIGS[name]] == []


def test_random_weights_are_identical_across_processes(embedder):
    """clip_pretrained = "none" is seeded: a fresh process builds the very same weights."""
    code = (
        "import sys, numpy as np; from geoagent.config import RetrievalConfig;"
        "from geoagent.retrieval.embedder import Embedder; from geoagent.eval.synthetic import scene;"
        f"e = Embedder.load(RetrievalConfig(clip_model={TINY!r}, clip_pretrained='none'));"
        "np.save(sys.argv[1], e.embed_images_sync([scene(1)]))"
    )
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"emb-{os.getpid()}.npy"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, capture_output=True, timeout=300)
    assert np.allclose(np.load(out), embedder.embed_images_sync([scene(1)]), atol=1e-6)
    out.unlink()


def test_a_checkpoint_file_loads_and_is_fingerprinted(embedder, tmp_path):
    import torch

    checkpoint = tmp_path / "tiny.pt"
    torch.save(embedder.model.state_dict(), checkpoint)
    loaded = Embedder.load(tiny_config(clip_pretrained=str(checkpoint), seed=123))
    assert loaded.spec.pretrained.startswith("file:")
    assert np.allclose(loaded.embed_images_sync([scene(2)]), embedder.embed_images_sync([scene(2)]), atol=1e-6)


def test_missing_pretrained_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    connects: list[object] = []  # offline means offline: no connection is even tried (so nothing waits on one)
    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: connects.append(address) or real_connect(sock, address))
    with pytest.raises(WeightsError) as info:
        Embedder.load(RetrievalConfig(clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b79k"))
    assert connects == []
    message = str(info.value)
    assert "ViT-B-32/laion2b_s34b_b79k" in message and "clip_pretrained" in message and "HF_HOME" in message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_model": "ViT-Nope"}, "unknown open_clip model 'ViT-Nope'"),
        ({"clip_model": "ViT-B-32", "clip_pretrained": "lion9000"}, "'lion9000' is not a pretrained tag of ViT-B-32"),
        ({"clip_model": "ViT-B-32", "clip_pretrained": "/no/such/ckpt.pt"}, "no checkpoint file at /no/such/ckpt.pt"),
        ({"clip_model": "/no/such/model.json", "clip_pretrained": "none"}, "no model config at /no/such/model.json"),
    ],
)
def test_bad_embedder_settings_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Embedder.load(RetrievalConfig(**kwargs))


def test_opening_something_that_is_not_an_index(tmp_path):
    with pytest.raises(InputError, match="not a GeoAgent index"):
        ReferenceIndex.open(tmp_path)


def test_cli_index_build_names_the_junk_and_info_describes_the_index(photo_folder, tmp_path):
    """As a user runs it: a progress bar, a summary naming each skipped file, exit 0, no traceback."""
    from conftest import run_cli

    (tmp_path / "geoagent.toml").write_text(f'[retrieval]\nclip_model = "{TINY}"\nclip_pretrained = "none"\n')
    proc = run_cli("index", "build", str(photo_folder), "--out", str(tmp_path / "idx"), "--type", "hnsw", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"indexed {N_PHOTOS + 1} photos" in proc.stdout and "skipped 4" in proc.stdout
    for junk in ("junk/empty.jpg", "junk/notes.jpg", "junk/truncated.jpg", "odd/no_gps.jpg"):
        assert f"skipped {junk}:" in proc.stdout
    assert "Traceback" not in proc.stderr
    info = run_cli("index", "info", str(tmp_path / "idx"), cwd=tmp_path)
    assert info.returncode == 0
    assert f"entries: {N_PHOTOS + 1}" in info.stdout and "index_type: hnsw" in info.stdout and "tiny-clip / none" in info.stdout
    rerun = run_cli("index", "build", str(photo_folder), "--out", str(tmp_path / "idx"), cwd=tmp_path)
    assert f"0 embedded, {N_PHOTOS + 1} reused" in rerun.stdout
    from_csv = run_cli("index", "build", str(write_csv(photo_folder, tmp_path / "refs.csv")), "--out", str(tmp_path / "csv-idx"), cwd=tmp_path)
    assert from_csv.returncode == 0 and f"indexed {N_PHOTOS} photos" in from_csv.stdout and "skipped 3" in from_csv.stdout
    assert "junk/missing.jpg: file not found" in from_csv.stdout and "Traceback" not in from_csv.stderr
