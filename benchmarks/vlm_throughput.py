"""How the VLM layer spends a server's time: bounded concurrency versus one at a time, and the cache.

    .venv/bin/python benchmarks/vlm_throughput.py     # writes benchmarks/results/vlm_throughput.md

Against the stand-in server (tests/standin) with a fixed per-request latency and a parallel capacity of 64,
through the real ollama client: 200 distinct questions at several `max_concurrency` settings, then the same
200 again from the cache. Figures are ratios within one run.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from pydantic import BaseModel  # noqa: E402

from geoagent.config import Settings  # noqa: E402
from geoagent.images import encode_image  # noqa: E402
from geoagent.vlm import VLMPool  # noqa: E402
from standin import StandinConfig, StandinServer, marked_scene, marker_judge  # noqa: E402

ASKS = 200
LATENCY_S = 0.05


class MarkerAnswer(BaseModel):
    code: int


async def timed_run(server: StandinServer, cache: Path, concurrency: int, images: list) -> float:
    backend = {"kind": "ollama", "base_url": server.url, "max_concurrency": concurrency, "timeout_s": 30}
    pool = VLMPool(Settings(backends={"b": backend}, tasks={"default": "b"}, cache={"dir": cache}))
    client = pool.for_task("default")
    started = time.perf_counter()
    answers = await asyncio.gather(*(client.ask(f"code? ({i})", [images[i % len(images)]], MarkerAnswer) for i in range(ASKS)))
    elapsed = time.perf_counter() - started
    await pool.aclose()
    assert all(a.value.code == 100 + i % len(images) for i, a in enumerate(answers))
    return elapsed


async def main() -> None:
    images = [encode_image(marked_scene(100 + i), 768) for i in range(20)]
    rows = []
    with tempfile.TemporaryDirectory() as scratch, StandinServer(marker_judge, StandinConfig(latency_s=LATENCY_S)) as server:
        for concurrency in (1, 4, 16, 64):
            cache = Path(scratch) / f"c{concurrency}"
            cold = await timed_run(server, cache, concurrency, images)
            warm = await timed_run(server, cache, concurrency, images)
            rows.append((concurrency, cold, warm))
    base = rows[0][1]
    lines = [
        f"{ASKS} distinct questions, stand-in latency {LATENCY_S * 1000:.0f} ms per request, ollama client, one run:",
        "",
        "| max_concurrency | wall (s) | speed-up vs 1 | cached rerun (s) | cache speed-up |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for concurrency, cold, warm in rows:
        lines.append(f"| {concurrency} | {cold:.2f} | {base / cold:.1f}x | {warm:.2f} | {cold / warm:.0f}x |")
    text = "\n".join(lines) + "\n"
    out = ROOT / "benchmarks" / "results" / "vlm_throughput.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    asyncio.run(main())
