"""`geoagent serve` under a flood of large photos (issue 18, point 3's must-show): 30 concurrent uploads of a
20 MB PNG that decodes to 80 M pixels (240 MB of RGB each) are each answered or refused, the server stays up,
and its peak RSS stays under 2 GB, because decodes are bounded: at most two at once (the decode pool) and at
most two photos holding full-resolution pixels between decode and embedding."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import write_world_config
from pngs import repeated_row_png
from test_serve import start_serve
from standin import StandinConfig, StandinServer, WorldJudge

WIDTH, HEIGHT = 10_000, 8_000  # 80 M pixels: under Pillow's (and the default) 89.5 M pixel limit, so decoded
NOISE_BYTES = 2_400  # random bytes per row, so the file is ~20 MB instead of compressing to nothing
UPLOADS = 30
PEAK_RSS_LIMIT_MB = 2048


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    stderr: Path

    def peak_rss_mb(self) -> float:
        """The server's peak resident set so far (VmHWM), read from /proc while it runs."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM in /proc status")


@pytest.fixture(scope="module")
def big_png(tmp_path_factory) -> Path:
    # noise in each row, so the file is ~20 MB instead of compressing to nothing
    return repeated_row_png(tmp_path_factory.mktemp("big") / "big.png", WIDTH, HEIGHT, os.urandom(NOISE_BYTES))


@pytest.fixture(scope="module")
def server(world, tmp_path_factory) -> Iterator[Server]:
    """`geoagent serve` with the default pixel limit and a 25 MB upload limit. Retrieval only (strategy none):
    what is measured is decoding, and the stand-in could not judge a picture of noise anyway."""
    root = tmp_path_factory.mktemp("serve-memory")
    with StandinServer(WorldJudge(world.truth), StandinConfig(capacity=64)) as vlm:
        config = write_world_config(root / "geoagent.toml", world, vlm, root / "cache", backend={"max_concurrency": 4}, strategy="none")
        process, url = start_serve(root, "--port", "0", "--config", str(config), "--max-upload-mb", "25")
        yield Server(url, process, root / "stderr.txt")
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def _upload_all(url: str, photo: bytes) -> list[int]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(900)) as client:

        async def one(i: int) -> int:
            response = await client.post(url + "api/locate", files={"photo": (f"big-{i}.png", photo, "image/png")})
            return response.status_code

        return await asyncio.gather(*(one(i) for i in range(UPLOADS)))


def test_thirty_concurrent_80_megapixel_uploads_keep_the_server_under_2_gb(server, big_png):
    """Each upload is answered (200) or refused with a 4xx, none fails with a 5xx, the server still answers
    afterwards, and its peak RSS (VmHWM, measured while it runs) stays under 2 GB: unbounded, 30 decodes of
    240 MB each (three per upload before) would need several GB."""
    size_mb = big_png.stat().st_size / 1e6
    assert 15 < size_mb < 25, size_mb
    before = server.peak_rss_mb()
    statuses = asyncio.run(_upload_all(server.url, big_png.read_bytes()))
    assert all(status == 200 or 400 <= status < 500 for status in statuses), statuses
    assert server.process.poll() is None, server.stderr.read_text()[-3000:]
    assert httpx.get(server.url, timeout=30).status_code == 200
    peak = server.peak_rss_mb()
    print(f"{UPLOADS} uploads of a {size_mb:.1f} MB, {WIDTH * HEIGHT / 1e6:.0f} Mpx PNG: statuses {sorted(set(statuses))}, "
          f"server peak RSS {before:.0f} MB at start, {peak:.0f} MB after")  # fmt: skip
    assert peak < PEAK_RSS_LIMIT_MB, peak
    assert "Traceback" not in server.stderr.read_text()
