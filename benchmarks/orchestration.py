"""Does the orchestrator add anything on top of what the VLM server takes?

Runs `locate` (adaptive tournament, no prior or reasoning, so every request is a comparison) over the photos
of a synthetic world against the stand-in VLM server with a fixed latency per request and a parallel
capacity P, and reports, in one run:

- wall time against the capacity bound: max(critical path, total requests x latency / P), where the critical
  path is the longest chain of requests one photo must make one after another (a tournament's rounds; an
  adaptive match's second ask waits for its first), read from each photo's trace;
- speed-up over the sequential loop a researcher would write: the same client and the same calls, one
  request at a time (max_concurrency 1, one photo at a time);
- orchestrator CPU per request: this process's CPU time over the run divided by the requests sent (the
  stand-in runs in another process, so its work is not counted; GeoAgent's own retrieval, image encoding,
  HTTP, validation and cache writes are);
- the same photos again from a warm cache, and `geoagent --help` start-up time.

    .venv/bin/python benchmarks/orchestration.py     # writes benchmarks/results/orchestration.md
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from geoagent.config import Settings  # noqa: E402
from geoagent.types import LocateResult, Match  # noqa: E402

TINY_CLIP = ROOT / "tests" / "data" / "tiny-clip.json"
CAPACITIES = (1, 4, 16)
TOP_KS = (10, 20)
BOUND_TARGET = 1.15
SPEEDUP_TARGET = 0.9
CPU_TARGET_MS = 1.0


def serve(truth: dict[int, tuple[float, float, str]], capacity: int, latency_s: float, pipe: Any) -> None:
    """The stand-in, in its own process: its CPU time is not the orchestrator's."""
    from standin import StandinConfig, StandinServer, WorldJudge

    with StandinServer(WorldJudge(truth), StandinConfig(capacity=capacity, queue=100_000, latency_s=latency_s)) as server:
        pipe.send(server.url)
        pipe.recv()  # until told to stop


class Standin:
    def __init__(self, truth: dict[int, tuple[float, float, str]], capacity: int, latency_s: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(target=serve, args=(truth, capacity, latency_s, child), daemon=True)
        self._process.start()
        self.url: str = self._pipe.recv()

    def stop(self) -> None:
        self._pipe.send("stop")
        self._process.join(timeout=10)


def tournament_rounds(pool_size: int) -> list[int]:
    """Matches per round of GeoAgent's knockout (one bye when the field is odd)."""
    rounds = []
    while pool_size > 1:
        rounds.append(pool_size // 2)
        pool_size -= pool_size // 2
    return rounds


def critical_path(result: LocateResult) -> int:
    """Requests one after another in this photo: per round, the most sequential asks any of its matches made
    (an adaptive match's second ask waits for its first; matches are recorded round after round)."""
    matches: list[Match] = result.trace.matches if result.trace else []
    chain, start = 0, 0
    for size in tournament_rounds(len(result.candidates)):
        chain += max((len(m.votes) for m in matches[start : start + size]), default=0)
        start += size
    return chain


async def run_photos(settings: Settings, retriever: Any, photos: list[str]) -> tuple[float, float, list[LocateResult], int]:
    """(wall s, CPU s, results, requests) for locating ``photos``."""
    from geoagent.agent.controller import GeoAgent

    agent = GeoAgent(settings, retriever=retriever)
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        results = [r async for _, r in agent.locate_many(photos, explain=True)]
    finally:
        await agent.aclose()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert all(isinstance(r, LocateResult) for r in results), results
    return wall, cpu, results, agent.pool.totals().requests  # type: ignore[return-value]


def settings_for(url: str, cache: Path, index: Path, capacity: int, top_k: int, photos_at_once: int | None = None) -> Settings:
    backend = {"kind": "ollama", "model": "llava:7b", "base_url": url, "max_concurrency": capacity, "timeout_s": 60}
    agent = {"strategy": "tournament", "country_prior": False, "reasoning": False, "top_k": top_k, "max_concurrent_photos": photos_at_once}
    retrieval = {"clip_model": str(TINY_CLIP), "clip_pretrained": "none", "index": str(index), "top_k": top_k}
    return Settings(backends={"b": backend}, tasks={"default": "b"}, cache={"dir": cache}, retrieval=retrieval, agent=agent)


async def bare_client_cpu_ms(url: str, photos: list[str], concurrency: int, requests: int = 200) -> float:
    """CPU per request of the bare ollama client sending what a comparison sends (query, A, B) at the same
    concurrency: the floor the HTTP stack itself sets, to tell GeoAgent's own share from it."""
    import ollama

    from geoagent.images import load_image

    images = [load_image(p, 768).data for p in photos]
    client = ollama.AsyncClient(host=url, timeout=60)
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with limit:
            trio = [images[(i + j) % len(images)] for j in range(3)]
            await client.chat(model="llava:7b", messages=[{"role": "user", "content": f"bare {i}: which code?", "images": trio}],
                              format={"type": "object", "properties": {"codes": {"type": "array"}}}, stream=False)

    cpu = time.process_time()
    await asyncio.gather(*(one(i) for i in range(requests)))
    return (time.process_time() - cpu) / requests * 1000


def help_startup_s(repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "geoagent", "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds per request at the stand-in")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "orchestration.md")
    args = parser.parse_args()

    from geoagent.retrieval.embedder import Embedder
    from geoagent.retrieval.index import build_index
    from geoagent.retrieval.retriever import Retriever
    from standin.world import build_world

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="geoagent-orch-") as scratch:
        work = Path(scratch)
        world = build_world(work / "world", places_per_country=max(6, -(-args.photos // 8)))
        photos = [str(q.path) for q in world.queries[: args.photos]]
        config = settings_for("http://unused", work / "c", work / "index", 1, max(TOP_KS)).retrieval
        build_index(world.references_csv, work / "index", Embedder.load(config))
        retriever = Retriever.load_sync(config)
        rows = []
        for top_k in TOP_KS:
            sequential = Standin(world.truth, 1, args.latency)
            try:
                naive = asyncio.run(run_photos(settings_for(sequential.url, work / f"seq{top_k}", work / "index", 1, top_k, 1), retriever, photos))
            finally:
                sequential.stop()
            for capacity in CAPACITIES:
                server = Standin(world.truth, capacity, args.latency)
                cache = work / f"cache{top_k}-{capacity}"
                try:
                    settings = settings_for(server.url, cache, work / "index", capacity, top_k)
                    wall, cpu, results, requests = asyncio.run(run_photos(settings, retriever, photos))
                    warm, _, _, warm_requests = asyncio.run(run_photos(settings, retriever, photos))
                    floor = asyncio.run(bare_client_cpu_ms(server.url, photos, capacity))
                finally:
                    server.stop()
                chain = max(critical_path(r) for r in results)
                bound = max(chain * args.latency, requests * args.latency / capacity)
                assert warm_requests == 0
                rows.append((top_k, capacity, requests, chain, wall, bound, naive[0], cpu, warm, floor))
    elapsed = time.perf_counter() - started
    text = render(rows, args, help_startup_s(), elapsed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


def render(rows: list[tuple[Any, ...]], args: argparse.Namespace, startup: float, elapsed: float) -> str:
    lines = [
        f"{args.photos} photos, adaptive tournament (no prior or reasoning), stand-in latency {args.latency * 1000:.0f} ms per "
        f"request in its own process, parallel capacity P = max_concurrency; one run of "
        f"`.venv/bin/python benchmarks/orchestration.py` ({elapsed:.0f} s) on this machine (2 cores):",
        "",
        "| K | P | requests | critical path | wall (s) | bound (s) | wall / bound | sequential (s) | speed-up | target 0.9P | CPU per request (ms) | bare client (ms) | warm cache (s) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for top_k, capacity, requests, chain, wall, bound, naive, cpu, warm, floor in rows:
        lines.append(
            f"| {top_k} | {capacity} | {requests} | {chain} | {wall:.2f} | {bound:.2f} | {wall / bound:.2f}x | {naive:.2f} | "
            f"{naive / wall:.1f}x | {SPEEDUP_TARGET * capacity:.1f}x | {cpu / requests * 1000:.2f} | {floor:.2f} | {warm:.2f} |"
        )
    lines += [
        "",
        "CPU per request is this process's CPU over the run (retrieval, image encoding, HTTP, validation, cache) per "
        "request sent; 'bare client' is the ollama client alone sending the same three photos per request at the same "
        "concurrency: the difference is GeoAgent's own share.",
        "",
        f"`geoagent --help` starts in {startup:.2f} s (median of 5).",
        "",
    ]
    misses = []
    for top_k, capacity, requests, _, wall, bound, naive, cpu, _, _ in rows:
        if wall / bound > BOUND_TARGET:
            misses.append(f"K={top_k}, P={capacity}: wall {wall / bound:.2f}x the bound (target <= {BOUND_TARGET}x)")
        if naive / wall < SPEEDUP_TARGET * capacity:
            misses.append(f"K={top_k}, P={capacity}: {naive / wall:.1f}x over sequential (target >= {SPEEDUP_TARGET * capacity:.1f}x)")
        if cpu / requests * 1000 >= CPU_TARGET_MS:
            misses.append(f"K={top_k}, P={capacity}: {cpu / requests * 1000:.2f} ms CPU per request (target < {CPU_TARGET_MS} ms)")
    lines += ["Targets missed: " + ("none" if not misses else "; ".join(misses)), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
