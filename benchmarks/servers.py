"""Throughput of one backend profile spread over 1, 2 and 4 servers, in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/servers.py     # writes benchmarks/results/servers.md

On a machine shared with other work, run it ahead of that work (as root: ``nice -n -15``): the client and
the four stand-ins share the machine's cores, and a busy machine measures its own contention, not the routing.

Four stand-in servers (tests/standin), each in its own process with a capacity of 2 requests at once and
100 ms per request; the profile gives each server 2 slots (``base_url = [...]``). For each server count, 240
distinct questions go through the real client (cache, retry, routing, the ollama client): the wall time is
compared with the capacity bound, ``questions x 0.1 s / (2 x servers)``, the time the servers alone would
need; the ratio is the routing's overhead (1.0: none) plus the machine's own cost, measured apart by the same
questions against four servers that answer at once. Shares are each server's count of chat requests.
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
from standin import marked_scene  # noqa: E402
from standin.process import start_standins  # noqa: E402

QUESTIONS = 240
LATENCY_S = 0.1
CAPACITY = 2


class MarkerAnswer(BaseModel):
    code: int


async def timed_run(urls: list[str], cache: Path, images: list, tag: str) -> float:
    backend = {"kind": "ollama", "base_url": urls, "max_concurrency": CAPACITY, "timeout_s": 30}
    pool = VLMPool(Settings(backends={"b": backend}, tasks={"default": "b"}, cache={"dir": cache}))
    client = pool.for_task("default")
    await client.identity()  # asked once per run, before the clock starts, as the preflight does
    started = time.perf_counter()
    answers = await asyncio.gather(
        *(client.ask(f"code? ({tag} {i})", [images[i % len(images)]], MarkerAnswer) for i in range(QUESTIONS))
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    await pool.aclose()
    assert all(a.value.code == 100 + i % len(images) for i, a in enumerate(answers))
    return elapsed


async def main() -> None:
    images = [encode_image(marked_scene(100 + i), 768) for i in range(20)]
    servers = start_standins(4, "--latency-s", str(LATENCY_S), "--capacity", str(CAPACITY))
    instant = start_standins(4, "--latency-s", "0", "--capacity", str(CAPACITY))
    rows = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            # The machine's own cost of the questions (client, HTTP, the stand-ins' decoding), servers taking no time
            floor = await timed_run([s.url for s in instant], Path(scratch) / "floor", images, "floor")
            for count in (1, 2, 4):
                used = servers[:count]
                before = [s.chat_requests() for s in used]
                elapsed = await timed_run([s.url for s in used], Path(scratch) / f"c{count}", images, f"n{count}")
                shares = [s.chat_requests() - b for s, b in zip(used, before, strict=True)]
                rows.append((count, elapsed, QUESTIONS * LATENCY_S / (CAPACITY * count), shares))
    finally:
        for server in servers + instant:
            server.stop()
    base = rows[0][1]
    lines = [
        f"# Several servers per profile: {QUESTIONS} questions, stand-ins of {CAPACITY} slots x {LATENCY_S * 1000:.0f} ms each",
        "",
        "| servers | wall (s) | capacity bound (s) | wall / bound | speed-up vs 1 | questions per server |",
        "|--------:|---------:|-------------------:|-------------:|--------------:|:---------------------|",
    ]
    for count, elapsed, bound, shares in rows:
        lines.append(f"| {count} | {elapsed:.2f} | {bound:.2f} | {elapsed / bound:.2f} | {base / elapsed:.2f}x | {', '.join(map(str, shares))} |")
    lines += ["", f"The same {QUESTIONS} questions over 4 servers answering at once (0 ms): {floor:.2f} s, the machine's own cost"]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / "servers.md"
    out.write_text(text)


if __name__ == "__main__":
    asyncio.run(main())
