"""Indexes at scale: build time, peak memory, size on disk, query latency and recall@10 per index type.

    .venv/bin/python benchmarks/index_scale.py                  # 100k and 1M vectors; writes benchmarks/results/index_scale.md
    .venv/bin/python benchmarks/index_scale.py --sizes 100000   # a quicker run

Vectors are synthetic, 512-d, L2-normalised and clustered in a 32-d latent space (n/100 centres, spread 0.8,
projected to 512-d, plus 0.05 noise), so neighbourhoods are crowded as CLIP embeddings' are and approximate
indexes miss some true neighbours: recall means something. Queries are database vectors plus 0.02 noise.

Each build runs :class:`geoagent.retrieval.index.IndexWriter`, the chunked writer and index builder behind
``geoagent index build``, fed synthetic rows a batch at a time instead of decoded, embedded photos (the rows
carry their place, so no reverse geocoding), in a fresh process whose memory is measured: peak RSS (VmHWM; it
counts the memory-mapped file pages faiss and numpy touch, which the kernel can drop) and peak anonymous
memory (RssAnon sampled every 10 ms: what the process holds itself). Searches run in another fresh process
through ``ReferenceIndex.open`` and ``VectorTable.search`` (ivfpq's exact re-ranking included): single
queries on one thread, batches of 64 on every core. recall@10 is measured against flat (exact) search.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DIM = 512
LATENT = 32
ROWS_PER_CENTRE = 100
SPREAD = 0.8
NOISE = 0.05
QUERY_NOISE = 0.02
SEED = 7
BATCH_ROWS = 1024  # rows handed to the writer at once, as `index build` hands it an embedding batch
QUERY_BATCH = 64
K = 10
FLAT_SINGLE_BUDGET_S = 60.0  # flat single queries at 1M take ~0.2 s each: sample fewer
MEMORY_SAMPLE_S = 0.01
TYPES = ("flat", "hnsw", "ivf", "ivfpq")


# --- synthetic data --------------------------------------------------------------------------------------------


def synthetic_chunks(n: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, vectors) ``BATCH_ROWS`` at a time, the same for every process (seeded per chunk)."""
    rng = np.random.default_rng(SEED)
    centres = rng.normal(size=(max(1, n // ROWS_PER_CENTRE), LATENT)).astype(np.float32)
    projection = rng.normal(size=(LATENT, DIM)).astype(np.float32) / np.sqrt(LATENT)
    for first in range(0, n, BATCH_ROWS):
        chunk = np.random.default_rng((SEED, first))
        size = min(BATCH_ROWS, n - first)
        latent = centres[chunk.integers(0, len(centres), size)] + SPREAD * chunk.standard_normal((size, LATENT), dtype=np.float32)
        vectors = latent @ projection + NOISE * chunk.standard_normal((size, DIM), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        yield first, vectors


def synthetic_queries(n: int, count: int) -> np.ndarray:
    rows = np.sort(np.random.default_rng(SEED + 1).choice(n, count, replace=False))
    picked = []
    for first, vectors in synthetic_chunks(n):
        inside = rows[(rows >= first) & (rows < first + len(vectors))]
        picked.append(vectors[inside - first])
    queries = np.concatenate(picked) + QUERY_NOISE * np.random.default_rng(SEED + 2).standard_normal((count, DIM), dtype=np.float32)
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


# --- memory of this process --------------------------------------------------------------------------------------


class MemoryWatch:
    """Peak anonymous memory (RssAnon, sampled) and peak RSS (VmHWM) of this process, in MB."""

    def __init__(self) -> None:
        self.peak_anon = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def status(field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, self.status("RssAnon"))
            time.sleep(MEMORY_SAMPLE_S)

    def __enter__(self) -> MemoryWatch:
        self.baseline_anon = self.status("RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, self.status("RssAnon"))
        self.peak_rss = self.status("VmHWM")


# --- the two workers (each in a fresh process) ---------------------------------------------------------------------


def build_worker(kind: str, n: int, out: Path) -> dict[str, float]:
    from geoagent.retrieval.embedder import EmbedderSpec
    from geoagent.retrieval.index import IndexWriter, RowDraft

    spec = EmbedderSpec(model="synthetic", pretrained="none", seed=SEED, config_hash="synthetic")
    geo = np.random.default_rng(SEED + 3)
    with MemoryWatch() as memory:
        started = time.perf_counter()
        with IndexWriter(out, spec, index_type=kind, source="synthetic") as writer:  # type: ignore[arg-type]
            for first, vectors in synthetic_chunks(n):
                lat, lon = geo.uniform(-60, 70, len(vectors)), geo.uniform(-180, 180, len(vectors))
                drafts = [
                    RowDraft(f"syn/{first + i:08d}.jpg", f"/synthetic/{first + i:08d}.jpg", float(lat[i]), float(lon[i]), 0, 0, "ZZ", "Synthetic")
                    for i in range(len(vectors))
                ]
                writer.add(drafts, vectors)
            name, manifest = writer.commit()
        build_s = time.perf_counter() - started
    version = out / name
    sizes = {p.name: p.stat().st_size for p in version.iterdir()}
    index_bytes = sum(size for file, size in sizes.items() if file.startswith(("index.", "trained.")))
    return {
        "build_s": build_s, "peak_rss_mb": memory.peak_rss, "peak_anon_mb": memory.peak_anon,
        "baseline_anon_mb": memory.baseline_anon, "disk_mb": sum(sizes.values()) / 1e6, "index_mb": index_bytes / 1e6,
        "vectors_mb": sizes["vectors.npy"] / 1e6, "params": manifest.params.describe(),
    }  # fmt: skip


def search_worker(directory: Path, queries_path: Path, single: int, found_path: Path) -> dict[str, float]:
    import faiss

    from geoagent.retrieval.index import ReferenceIndex

    queries = np.load(queries_path)
    with MemoryWatch() as memory:
        started = time.perf_counter()
        table = ReferenceIndex.open(directory).table
        open_s = time.perf_counter() - started
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # one locate's view: one query, one thread
        table.search(queries[0], K)  # warm-up
        single_ms = []
        for query in queries[:single]:
            t0 = time.perf_counter()
            table.search(query, K)
            single_ms.append((time.perf_counter() - t0) * 1000)
        faiss.omp_set_num_threads(threads)
        batch_ms, found = [], []
        for start in range(0, len(queries), QUERY_BATCH):
            t0 = time.perf_counter()
            ids, _ = table.search_many(queries[start : start + QUERY_BATCH], K)
            batch_ms.append((time.perf_counter() - t0) * 1000)
            found.append(ids)
    np.save(found_path, np.concatenate(found))
    return {
        "open_s": open_s, "single_p50_ms": float(np.percentile(single_ms, 50)), "single_p99_ms": float(np.percentile(single_ms, 99)),
        "singles": len(single_ms), "batch_p50_ms": float(np.percentile(batch_ms, 50)), "batch_p99_ms": float(np.percentile(batch_ms, 99)),
        "search_anon_mb": memory.peak_anon,
    }  # fmt: skip


def run_worker(*args: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the run -------------------------------------------------------------------------------------------------------


def measure(n: int, kinds: list[str], query_count: int, scratch: Path) -> list[dict[str, float | str]]:
    queries_path, found_path = scratch / "queries.npy", scratch / "found.npy"
    np.save(queries_path, synthetic_queries(n, query_count))
    rows: list[dict[str, float | str]] = []
    truth: np.ndarray | None = None
    for kind in ["flat", *[k for k in kinds if k != "flat"]]:
        out = scratch / f"{kind}-{n}"
        print(f"{n:,} {kind}: building", file=sys.stderr, flush=True)
        built = run_worker("build", kind, str(n), str(out))
        single = query_count if kind != "flat" else max(100, min(query_count, int(FLAT_SINGLE_BUDGET_S / (n * DIM * 4 / 5e9))))
        print(f"{n:,} {kind}: searching ({built['build_s']:.0f} s build)", file=sys.stderr, flush=True)
        searched = run_worker("search", str(out), str(queries_path), str(single), str(found_path))
        found = np.load(found_path)
        truth = found if truth is None else truth
        recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth)]))
        rows.append({"n": n, "index": kind, **built, **searched, "recall": recall})
        shutil.rmtree(out)
    return [row for row in rows if row["index"] in kinds]


def table(rows: list[dict[str, float | str]], query_count: int) -> list[str]:
    lines = [
        "| vectors | index | parameters | build (s) | peak RSS (MB) | peak anon. (MB) | on disk (MB) | of which index (MB) "
        f"| single p50 / p99 (ms) | batch of {QUERY_BATCH} p50 / p99 (ms) | recall@10 vs flat |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['n']:,} | {row['index']} | {row['params']} | {row['build_s']:.1f} | {row['peak_rss_mb']:.0f} | "
            f"{row['peak_anon_mb']:.0f} | {row['disk_mb']:.0f} | {row['index_mb']:.0f} | "
            f"{row['single_p50_ms']:.2f} / {row['single_p99_ms']:.2f} | {row['batch_p50_ms']:.1f} / {row['batch_p99_ms']:.1f} | "
            f"{row['recall']:.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--scratch", type=Path, default=None, help="where indexes are built (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "index_scale.md")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, *rest = args.worker
        result = build_worker(rest[0], int(rest[1]), Path(rest[2])) if mode == "build" else search_worker(Path(rest[0]), Path(rest[1]), int(rest[2]), Path(rest[3]))
        print(json.dumps(result))
        return

    load_before, started = os.getloadavg()[1], time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        rows = [row for n in args.sizes for row in measure(n, args.types, args.queries, Path(scratch))]
    load_after, minutes = os.getloadavg()[1], (time.perf_counter() - started) / 60
    idle = min(float(row["baseline_anon_mb"]) for row in rows)
    lines = [
        f"Measured in one run on this machine ({os.cpu_count()} CPU cores, no GPU, shared: 5-minute load average "
        f"{load_before:.1f} at the start, {load_after:.1f} at the end; {minutes:.0f} minutes); ratios travel better than absolute figures.",
        "",
        f"{args.queries} queries; single queries on one thread (flat: the first {min(int(r['singles']) for r in rows if r['index'] == 'flat')} "
        f"at the largest size), batches on every core. Peak anonymous memory includes the {idle:.0f} MB a process holds "
        "once numpy, faiss and GeoAgent are imported; peak RSS also counts memory-mapped file pages.",
        "",
        *table(rows, args.queries),
        "",
        "Opening an index (entries, rows and vectors memory-mapped): "
        + ", ".join(f"{r['index']} {r['n']:,} {r['open_s']:.2f} s / {r['search_anon_mb']:.0f} MB anon. while searching" for r in rows),
    ]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
