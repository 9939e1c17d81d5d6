"""Retrieval performance on CPU: embedding throughput, index build time, search latency and recall.

    .venv/bin/python benchmarks/retrieval.py         # writes benchmarks/results/retrieval.md

Embedding uses random weights (no weights can be downloaded here); speed does not depend on the values.
Search runs over 100k synthetic 512-d vectors drawn around 2,000 centres (real CLIP embeddings cluster too),
queries are perturbed database vectors, recall@10 is measured against exact (Flat) search.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from geoagent.config import RetrievalConfig
from geoagent.eval.synthetic import save_with_gps, scene
from geoagent.retrieval.embedder import Embedder
from geoagent.retrieval.index import build_index
from geoagent.retrieval.vectors import build_faiss

ROOT = Path(__file__).resolve().parent.parent
TINY_CLIP = ROOT / "tests" / "data" / "tiny-clip.json"


def embedding_throughput(model: str, n: int) -> float:
    embedder = Embedder.load(RetrievalConfig(clip_model=model, clip_pretrained="none", device="cpu"))
    images = [scene(i) for i in range(n)]
    embedder.embed_images_sync(images[:8])  # warm-up
    started = time.perf_counter()
    embedder.embed_images_sync(images, batch_size=32)
    return n / (time.perf_counter() - started)


def end_to_end_build(n: int) -> float:
    embedder = Embedder.load(RetrievalConfig(clip_model=str(TINY_CLIP), clip_pretrained="none"))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "photos"
        rng = np.random.default_rng(0)
        for i in range(n):
            save_with_gps(scene(i), folder / f"{i}.jpg", float(rng.uniform(-60, 60)), float(rng.uniform(-170, 170)))
        started = time.perf_counter()
        build_index(folder, Path(scratch) / "index", embedder)
        return n / (time.perf_counter() - started)


def clustered_vectors(n: int, dim: int, centres: int, rng: np.random.Generator) -> np.ndarray:
    centre = rng.normal(size=(centres, dim)).astype(np.float32)
    vectors = centre[rng.integers(0, centres, n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def search_benchmark(n: int, dim: int, queries: int) -> list[dict[str, float | str]]:
    rng = np.random.default_rng(0)
    base = clustered_vectors(n, dim, 2000, rng)
    probe = base[rng.integers(0, n, queries)] + 0.05 * rng.normal(size=(queries, dim)).astype(np.float32)
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    threads = faiss.omp_get_max_threads()
    rows: list[dict[str, float | str]] = []
    truth: np.ndarray | None = None
    for kind in ("flat", "hnsw", "ivf"):
        faiss.omp_set_num_threads(threads)  # builds use every core
        started = time.perf_counter()
        index = build_faiss(base, kind)  # type: ignore[arg-type]
        build_s = time.perf_counter() - started
        faiss.omp_set_num_threads(1)  # single-query latency, as one locate sees it
        latencies, found = [], []
        for q in probe:
            t0 = time.perf_counter()
            _, ids = index.search(q[None, :], 10)
            latencies.append((time.perf_counter() - t0) * 1000)
            found.append(ids[0])
        found_arr = np.array(found)
        if truth is None:
            truth = found_arr
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found_arr, truth)]))
        rows.append({"index": kind, "build_s": build_s, "p50_ms": float(np.percentile(latencies, 50)),
                     "p99_ms": float(np.percentile(latencies, 99)), "recall@10": recall})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "retrieval.md")
    args = parser.parse_args()

    tiny = embedding_throughput(str(TINY_CLIP), 256)
    vit = embedding_throughput("ViT-B-32", 64)
    build = end_to_end_build(200)
    rows = search_benchmark(args.vectors, 512, args.queries)
    flat = rows[0]
    lines = [
        "Measured in one run on this machine (2 CPU cores, no GPU); ratios travel better than absolute figures.",
        "",
        "| embedding (CPU, batch 32, random weights) | images/s |",
        "| --- | ---: |",
        f"| tiny test config (tests/data/tiny-clip.json) | {tiny:.0f} |",
        f"| ViT-B-32 | {vit:.1f} |",
        f"| `geoagent index build`, 200 photos, tiny config (decode + embed + write) | {build:.0f} |",
        "",
        f"Search over {args.vectors:,} vectors (512-d), {args.queries} single queries, one thread:",
        "",
        "| index | build (s) | p50 (ms) | p99 (ms) | p50 speed-up vs Flat | recall@10 vs Flat |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['index']} | {row['build_s']:.1f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{float(flat['p50_ms']) / float(row['p50_ms']):.1f}x | {row['recall@10']:.3f} |"
        )
    lines.append(f"\nViT-B-32 embeds {tiny / vit:.0f}x slower than the tiny test config.")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
