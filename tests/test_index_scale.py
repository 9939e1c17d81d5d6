"""Indexes of millions (issue #9 item 3): chunked builds, the four index types and their size rules, appends,
memory-mapped search, lazy sources. Synthetic vectors go through the same writer `geoagent index build` uses."""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest

from geoagent.config import RetrievalConfig
from geoagent.errors import ConfigError, InputError
from geoagent.eval.synthetic import save_with_gps, scene
from geoagent.retrieval import vectors as vectors_module
from geoagent.retrieval.embedder import EmbedderSpec
from geoagent.retrieval.index import IndexWriter, ReferenceIndex, RowDraft, build_index, current_version, read_source, walk_sorted
from geoagent.retrieval.vectors import EXACT_BELOW, TRAINED_FILE, VectorTable, build_faiss, default_params

SPEC = EmbedderSpec(model="synthetic", pretrained="none", seed=0, config_hash="synthetic")
DIM = 64
TINY = str(Path(__file__).parent / "data" / "tiny-clip.json")


def clustered(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Unit vectors around n/50 centres: neighbourhoods an approximate index can get wrong."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 50), dim)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)] + 0.8 * rng.standard_normal((n, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def drafts(first: int, count: int, seed: int = 0) -> list[RowDraft]:
    rng = np.random.default_rng(seed + first)
    return [
        RowDraft(f"syn/{i}.jpg", f"/syn/{i}.jpg", float(rng.uniform(-60, 60)), float(rng.uniform(-170, 170)), 0, 0, "FR" if i % 3 else "JP", "Somewhere")
        for i in range(first, first + count)
    ]


def write(out: Path, vectors: np.ndarray, kind: str, *, batch: int = 300, chunk_rows: int = 500, base: ReferenceIndex | None = None, first: int = 0, **kwargs) -> str:
    with IndexWriter(out, SPEC, index_type=kind, source="synthetic", chunk_rows=chunk_rows, base=base, **kwargs) as writer:  # type: ignore[arg-type]
        for start in range(0, len(vectors), batch):
            part = vectors[start : start + batch]
            writer.add(drafts(first + start, len(part)), part)
        return writer.commit()[0]


def queries_near(vectors: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = vectors[rng.choice(len(vectors), count, replace=False)] + 0.05 * rng.standard_normal((count, vectors.shape[1]), dtype=np.float32)
    return picked / np.linalg.norm(picked, axis=1, keepdims=True)


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_a_chunked_build_searches_exactly_like_an_in_memory_one(kind, tmp_path):
    """Rows added 300 at a time, the faiss index filled 500 rows a chunk (shards merged on disk for IVF):
    the same ids and scores as one index built from the whole matrix in memory with the same parameters."""
    vectors = clustered(3000)
    write(tmp_path / "idx", vectors, kind)
    index = ReferenceIndex.open(tmp_path / "idx")
    params = default_params(kind, 3000, DIM)  # type: ignore[arg-type]
    assert index.manifest.params == params
    in_memory = VectorTable(vectors, build_faiss(vectors, kind, params), *[None] * 5, rerank=params.rerank or 0)  # type: ignore[arg-type]
    queries = queries_near(vectors, 100)
    found, scores = index.table.search_many(queries, 10)
    expected, expected_scores = in_memory.search_many(queries, 10)
    assert np.array_equal(found, expected)
    assert np.allclose(scores, expected_scores, atol=1e-5)
    assert isinstance(index.table.vectors, np.memmap)  # searched from disk, not loaded


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_approximate_types_recall_the_exact_neighbours(kind, tmp_path):
    """recall@10 against exact search on crowded clusters; ivfpq re-scores its compressed shortlist exactly."""
    vectors = clustered(4000)
    write(tmp_path / "idx", vectors, kind)
    index = ReferenceIndex.open(tmp_path / "idx")
    queries = queries_near(vectors, 100)
    truth = faiss.knn(queries, vectors, 10, faiss.METRIC_INNER_PRODUCT)[1]
    assert recall_at_10(index.table.search_many(queries, 10)[0], truth) >= 0.9
    assert [int(index.table.search(q, 1)[0][0]) for q in vectors[:50]] == list(range(50))


def test_ivfpq_stores_compressed_codes_and_needs_its_rerank(tmp_path):
    """ivfpq's lists hold pq_m bytes a vector (+ its id), not 4·d; without the exact re-ranking its recall drops."""
    vectors = clustered(4000)
    write(tmp_path / "idx", vectors, "ivfpq")
    index = ReferenceIndex.open(tmp_path / "idx")
    params = index.manifest.params
    lists = (index.version / "index.ivfdata").stat().st_size
    assert lists < len(vectors) * (params.pq_m + 8) * 1.5 < vectors.nbytes / 2
    queries = queries_near(vectors, 100)
    truth = faiss.knn(queries, vectors, 10, faiss.METRIC_INNER_PRODUCT)[1]
    raw = index.table.index.search(queries, 10)[1]
    assert recall_at_10(raw, truth) < recall_at_10(index.table.search_many(queries, 10)[0], truth)


def test_default_parameters_follow_the_documented_size_rule():
    """Small sets exact; nlist = 2·sqrt(n) capped at n/39; nprobe = nlist/16 (at least 16); efSearch steps
    64/128/256 at 100k and 1M; ivfpq d/8 bytes, fewer bits when 256 centroids cannot be trained."""
    for kind in ("hnsw", "ivf", "ivfpq"):
        assert default_params(kind, EXACT_BELOW - 1, 512).kind == "flat"  # type: ignore[arg-type]
    for n in (2_000, 100_000, 1_000_000, 5_000_000):
        ivf = default_params("ivf", n, 512)
        assert ivf.nlist == min(int(2 * math.sqrt(n)), n // 39)
        assert ivf.nprobe == min(ivf.nlist, max(16, ivf.nlist // 16))
        assert ivf.trained_on == n
    assert default_params("ivf", 1_000_000, 512).model_dump(exclude_none=True) == {"kind": "ivf", "nlist": 2000, "nprobe": 125, "trained_on": 1_000_000}
    assert [default_params("hnsw", n, 512).ef_search for n in (50_000, 500_000, 2_000_000)] == [64, 128, 256]
    assert default_params("hnsw", 2_000_000, 512).ef_construction < default_params("hnsw", 50_000, 512).ef_construction
    big, small = default_params("ivfpq", 1_000_000, 512), default_params("ivfpq", 3_000, 512)
    assert (big.pq_m, big.pq_bits, small.pq_bits) == (64, 8, 6)
    assert default_params("ivfpq", 100_000, 96).pq_m == 12  # divides the dimension
    overridden = default_params("ivf", 100_000, 512, {"nlist": 100, "nprobe": 7})
    assert (overridden.nlist, overridden.nprobe) == (100, 7)
    with pytest.raises(ConfigError, match="nlist applies to ivf and ivfpq indexes, not hnsw"):
        default_params("hnsw", 100_000, 512, {"nlist": 100})
    with pytest.raises(ConfigError, match="pq_m 48 bytes do not divide the embedding dimension 512"):
        default_params("ivfpq", 100_000, 512, {"pq_m": 48})


def test_searches_use_the_parameters_stored_in_the_manifest(tmp_path):
    vectors = clustered(3000)
    write(tmp_path / "ivf", vectors, "ivf", overrides={"nprobe": 3})
    write(tmp_path / "hnsw", vectors, "hnsw", overrides={"ef_search": 40})
    ivf = ReferenceIndex.open(tmp_path / "ivf")
    manifest = json.loads((ivf.version / "manifest.json").read_text())
    assert manifest["params"]["nprobe"] == 3 and faiss.extract_index_ivf(ivf.table.index).nprobe == 3
    assert ReferenceIndex.open(tmp_path / "hnsw").table.index.hnsw.efSearch == 40


def test_the_builder_holds_a_chunk_not_the_matrix(tmp_path):
    """Python-side allocations (numpy included, traced by tracemalloc) while 20,000 rows of 256-d are written
    and indexed 1,000 at a time stay far below the 20 MB matrix: rows are appended to disk and the index is
    filled from the file a chunk at a time. (What stays per row is ~80 bytes of coordinates and hashes.)"""
    n, dim, chunk = 20_000, 256, 1000
    matrix = clustered(n, dim)  # the embedder's output, before the builder sees it
    rows = [drafts(first, chunk) for first in range(0, n, chunk)]
    tracemalloc.start()
    try:
        with IndexWriter(tmp_path / "idx", SPEC, index_type="ivf", source="synthetic", chunk_rows=chunk, overrides={"nlist": 20}) as writer:
            for first in range(0, n, chunk):
                writer.add(rows[first // chunk], matrix[first : first + chunk])
            writer.commit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ReferenceIndex.open(tmp_path / "idx").manifest.count == n
    assert peak < matrix.nbytes / 4, f"peak {peak / 1e6:.1f} MB"


def test_submap_search_is_exact_over_the_submap_read_a_chunk_at_a_time(tmp_path, monkeypatch):
    """For every type (ivfpq included) a country or cluster submap is scored exactly from the memory-mapped
    vectors, chunk by chunk (7 rows here), ties in row order: the same as scoring the submap's rows at once."""
    monkeypatch.setattr(vectors_module, "SCORE_CHUNK_ROWS", 7)
    vectors = clustered(2000)
    vectors[3] = vectors[21]  # a tie, both in Japan
    write(tmp_path / "idx", vectors, "ivfpq")
    table = ReferenceIndex.open(tmp_path / "idx").table
    rows = table.submap(countries={"jp"})
    assert rows is not None and len(rows) and set(table.country[rows]) == {"JP"}
    query = vectors[21]
    found, scores = table.search(query, 10, rows)
    sims = vectors[rows] @ query
    order = np.argsort(-sims, kind="stable")[:10]
    assert np.array_equal(found, rows[order]) and np.allclose(scores, sims[order], atol=1e-6)
    assert list(found[:2]) == [3, 21]
    assert table.clusters_in({"jp"}) == {int(c) for c in table.cluster[rows]}


def test_an_ivf_index_moved_elsewhere_opens_and_faiss_prints_nothing(tmp_path, capfd):
    """index.faiss records where its list file is; a copied folder must find its own (and stdout, which
    carries results, must not get faiss's notices about it)."""
    vectors = clustered(3000)
    write(tmp_path / "idx", vectors, "ivf")
    before = ReferenceIndex.open(tmp_path / "idx").table.search_many(vectors[:20], 5)[0]
    shutil.copytree(tmp_path / "idx", tmp_path / "moved")
    shutil.rmtree(tmp_path / "idx")
    assert np.array_equal(ReferenceIndex.open(tmp_path / "moved").table.search_many(vectors[:20], 5)[0], before)
    assert capfd.readouterr().out == ""


# --- appends -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_append_adds_findable_rows_keeps_the_old_ones_and_the_quantizer(kind, tmp_path):
    vectors = clustered(3500)
    out = tmp_path / "idx"
    first = write(out, vectors[:3000], kind)
    base = ReferenceIndex.open(out)
    old = faiss.read_index(str(base.version / TRAINED_FILE)) if kind == "ivfpq" else None
    second = write(out, vectors[3000:], kind, base=base, first=3000)
    assert current_version(out).name == second != first
    assert [p.name for p in out.iterdir() if p.is_dir()] == [second]  # the old version went once replaced
    index = ReferenceIndex.open(out)
    assert index.manifest.count == 3500 and index.manifest.params == base.manifest.params
    assert index.entries[3100].id == "syn/3100.jpg" and index.entries[5].id == "syn/5.jpg"
    for row in (3, 2999, 3000, 3499):
        assert int(index.table.search(vectors[row], 1)[0][0]) == row
    assert set(index.table.cluster[3000:]) <= set(range(len(index.table.centroids)))
    assert np.array_equal(index.table.centroids, base.table.centroids)
    if old is not None:
        new = faiss.read_index(str(index.version / TRAINED_FILE))
        assert np.array_equal(old.quantizer.reconstruct_n(0, old.nlist), new.quantizer.reconstruct_n(0, new.nlist))
        assert np.array_equal(faiss.vector_to_array(old.pq.centroids), faiss.vector_to_array(new.pq.centroids))


def test_an_append_that_races_another_build_fails_instead_of_losing_rows(tmp_path):
    """Two appends copy the same live version; the second to commit would drop the first's rows: refused."""
    vectors = clustered(1200)
    out = tmp_path / "idx"
    write(out, vectors[:1000], "flat")
    base = ReferenceIndex.open(out)
    with IndexWriter(out, SPEC, index_type="flat", source="synthetic", base=base) as slow:
        slow.add(drafts(1000, 100), vectors[1000:1100])
        winner = write(out, vectors[1100:], "flat", base=ReferenceIndex.open(out), first=1100)
        with pytest.raises(InputError, match="another build committed while this one was appending"):
            slow.commit()
    assert current_version(out).name == winner
    assert ReferenceIndex.open(out).manifest.count == 1100
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]


@pytest.fixture(scope="module")
def embedder():
    from geoagent.retrieval.embedder import Embedder

    return Embedder.load(RetrievalConfig(clip_model=TINY, clip_pretrained="none"))


def photos(folder: Path, start: int, count: int) -> None:
    for i in range(start, start + count):
        save_with_gps(scene(i), folder / f"p{i:03d}.jpg", 10.0 + i, 20.0 + i)


def test_build_index_append_embeds_only_the_new_photos(tmp_path, embedder):
    folder, out = tmp_path / "photos", tmp_path / "idx"
    photos(folder, 0, 12)
    build_index(folder, out, embedder)
    photos(folder, 12, 3)
    report = build_index(folder, out, embedder, append=True)
    assert (report.appended, report.embedded, report.already, report.indexed) == (3, 3, 12, 15)
    index = ReferenceIndex.open(out)
    new = embedder.embed_images_sync([scene(13)])[0]
    assert index.candidate(int(index.table.search(new, 1)[0][0]), 0).id == "p013.jpg"
    again = build_index(folder, out, embedder, append=True)
    assert (again.appended, again.already, again.version) == (0, 15, current_version(out).name)


def test_an_interrupted_append_leaves_the_index_as_it_was(tmp_path, embedder):
    folder, out = tmp_path / "photos", tmp_path / "idx"
    photos(folder, 0, 5)
    build_index(folder, out, embedder)
    live = current_version(out)
    photos(folder, 5, 2)

    def interrupt(_done: int, _embedded: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(folder, out, embedder, append=True, progress=interrupt)
    assert current_version(out) == live and ReferenceIndex.open(out).manifest.count == 5
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [live.name]


def test_append_needs_an_index_of_the_same_type(tmp_path, embedder):
    folder = tmp_path / "photos"
    photos(folder, 0, 2)
    with pytest.raises(InputError, match="no index to append to"):
        build_index(folder, tmp_path / "none", embedder, append=True)
    build_index(folder, tmp_path / "idx", embedder, index_type="hnsw")
    with pytest.raises(ConfigError, match="--append keeps its type"):
        build_index(folder, tmp_path / "idx", embedder, append=True, index_type="ivf")


def test_cli_index_build_append_and_info(tmp_path):
    """As a user runs it: --type ivfpq on a small set searches exactly (said by `index info`), --append
    reports what it added."""
    from conftest import run_cli

    (tmp_path / "geoagent.toml").write_text(f'[retrieval]\nclip_model = "{TINY}"\nclip_pretrained = "none"\n')
    photos(tmp_path / "photos", 0, 4)
    built = run_cli("index", "build", "photos", "--out", "idx", "--type", "ivfpq", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert "indexed 4 photos" in built.stdout and "(4 embedded, 0 reused; flat)" in built.stdout
    photos(tmp_path / "photos", 4, 2)
    appended = run_cli("index", "build", "photos", "--out", "idx", "--append", cwd=tmp_path)
    assert appended.returncode == 0, appended.stderr
    assert "appended 2 photos" in appended.stdout and "now 6" in appended.stdout and "4 already in it" in appended.stdout
    info = run_cli("index", "info", "idx", cwd=tmp_path)
    assert "index_type: ivfpq" in info.stdout and "search: flat (exact below 1,000 vectors)" in info.stdout
    refused = run_cli("index", "build", "photos", "--out", "idx", "--append", "--nlist", "8", cwd=tmp_path)
    assert refused.returncode == 2 and "keeps the trained quantizer" in refused.stderr


# --- sources, read lazily ----------------------------------------------------------------------------------------


def test_folders_are_walked_in_rglob_order_one_folder_at_a_time(tmp_path):
    for name in ("b.jpg", "a/c.jpg", "a/b/z.jpg", "a.jpg", "a b/x.jpg", "A/y.jpg", "a/b.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert list(walk_sorted(tmp_path)) == sorted(tmp_path.rglob("*"))


def test_a_csv_source_is_read_as_it_is_consumed(tmp_path):
    """Millions of rows are never read at once: read_source checks the header and returns; a broken row far
    down is found (and named by line) only when the build reaches it."""
    csv_path = tmp_path / "refs.csv"
    csv_path.write_text("path,lat,lon\n" + "".join(f"p{i}.jpg,1,2\n" for i in range(5)) + "x" * 200_000 + ",3,4\n")
    items = read_source(csv_path)
    assert [next(items).id for _ in range(5)] == [f"p{i}.jpg" for i in range(5)]
    with pytest.raises(InputError, match="refs.csv line 7: not a readable CSV"):
        next(items)
    with pytest.raises(InputError, match="missing column"):
        read_source(_write(tmp_path / "bad.csv", "path,lat\n"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- item 4: dataset loaders at full size --------------------------------------------------------------------------


def mp16_csv(path: Path, rows: int, broken_end: bool = False) -> Path:
    with path.open("w") as fh:
        fh.write("IMG_ID,AUTHOR,LAT,LON\n")
        fh.writelines(f"{i % 100:02d}/{i}.jpg,someone,{i % 170 - 85}.5,{i % 350 - 175}.25\n" for i in range(rows))
        if broken_end:
            fh.write("x" * 200_000 + ",b,1,2\n")
    return path


def live_bytes(work: Callable[[], object]) -> int:
    """Python allocations still alive when ``work`` returns (its result included), leaving out CPython's
    table of interned path parts, which pathlib grows once for the whole process."""
    tracemalloc.start()
    try:
        result = work()
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    del result
    kept = snapshot.filter_traces([tracemalloc.Filter(False, pathlib.__file__)])
    return sum(stat.size for stat in kept.statistics("filename"))


def test_an_mp16_sized_metadata_csv_streams_a_row_at_a_time(tmp_path):
    """Halfway through 30,000 IMG_ID,LAT,LON rows the loader holds next to nothing (collecting them holds
    megabytes); load_dataset(limit=10) stops reading after 10 photos (a broken row further down is never met)."""
    from geoagent.eval.datasets import iter_dataset, load_dataset

    meta, images = mp16_csv(tmp_path / "mp16.csv", 30_000), tmp_path / "mp16"

    def halfway() -> object:
        rows = iter_dataset(meta, images)
        for _ in range(15_000):
            next(rows)
        return rows

    streaming, collected = live_bytes(halfway), live_bytes(lambda: load_dataset(meta, images))
    assert streaming < 200_000 and collected > 10 * streaming, f"streaming {streaming} B, collected {collected} B"
    broken = mp16_csv(tmp_path / "broken.csv", 50, broken_end=True)
    first = load_dataset(broken, tmp_path / "mp16", limit=10)
    assert [item.path for item in first.items] == [tmp_path / "mp16" / f"{i:02d}/{i}.jpg" for i in range(10)]
    with pytest.raises(InputError, match="broken.csv line 52: not a readable CSV"):
        load_dataset(broken, tmp_path / "mp16")


def test_index_build_reads_mp16_style_metadata_with_its_image_folder(tmp_path, embedder):
    folder = tmp_path / "mp16"
    photos(folder / "ab", 0, 3)
    meta = tmp_path / "mp16.csv"
    meta.write_text("IMG_ID,AUTHOR,LAT,LON\n" + "".join(f"ab/p{i:03d}.jpg,x,{i + 1}.5,{i + 2}.5\n" for i in range(3)) + "ab/gone.jpg,x,1,1\n")
    with pytest.raises(InputError, match="needs the image folder: --images DIR"):
        read_source(meta)
    report = build_index(meta, tmp_path / "idx", embedder, images=folder)
    assert report.indexed == 3 and report.skipped == [("ab/gone.jpg", "file not found")]
    index = ReferenceIndex.open(tmp_path / "idx")
    assert [(e.id, e.lat) for e in index.entries] == [("ab/p000.jpg", 1.5), ("ab/p001.jpg", 2.5), ("ab/p002.jpg", 3.5)]


def test_an_index_of_the_previous_format_asks_for_a_rebuild(tmp_path):
    """Format 1 kept every entry in RAM and had no rows.npy: opening one says so in one line, no traceback."""
    write(tmp_path / "idx", clustered(50), "flat")
    version = current_version(tmp_path / "idx")
    manifest = json.loads((version / "manifest.json").read_text())
    (version / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(InputError, match="index format 1, this GeoAgent reads 2; rebuild it"):
        ReferenceIndex.open(tmp_path / "idx")
