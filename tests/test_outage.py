"""Recovery from a model server outage without restarting GeoAgent (issue 18, F9): `serve` and a long `batch`
whose stand-in VLM server is killed mid-run, left down long enough to be taken out (several probes fail), then
restarted on the same port. The probe backoff is set small (0.2 s doubling to 1 s) so a 5 s outage stands for
a longer one: what matters is that the server was marked down and had to be found back by a probe."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from browser import offline_browser
from conftest import run_cli, start_cli, write_world_config
from standin import StandinConfig, StandinServer, WorldJudge

OUTAGE_S = 5.0  # how long the stand-in stays down: many times the longest probe backoff below
RECOVERY = {"probe_backoff_s": 0.2, "probe_backoff_max_s": 1.0, "retry_backoff_s": 0.01}
READY_LINE = "GeoAgent page at "
STARTUP_TIMEOUT_S = 180


def port_of(server: StandinServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


@pytest.fixture
def outage_serve(world, tmp_path) -> Iterator[tuple[str, StandinServer, Path]]:
    """`geoagent serve` on a stand-in; questions wait at most 3 s for a server that went down."""
    vlm = StandinServer(WorldJudge(world.truth), StandinConfig(latency_s=0.01)).__enter__()
    backend = {"max_concurrency": 4, "outage_wait_s": 3.0, **RECOVERY}
    config = write_world_config(tmp_path / "geoagent.toml", world, vlm, tmp_path / "cache", backend=backend, strategy="tournament")
    out = tmp_path / "stdout.txt"
    with out.open("wb") as stdout:
        process = start_cli("serve", "--port", "0", "--config", str(config), "--tiles", "none", cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if not k.startswith("GEOAGENT_")}, stdout=stdout, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while READY_LINE not in out.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("geoagent serve did not start")
        time.sleep(0.1)
    yield out.read_text().split(READY_LINE)[1].split()[0], vlm, tmp_path
    process.kill()
    process.wait()
    vlm.__exit__(None, None, None)


def upload(url: str, photo: Path) -> httpx.Response:
    return httpx.post(url + "api/locate", files={"photo": (photo.name, photo.read_bytes(), "image/jpeg")}, timeout=120)


def servers(url: str) -> list[dict]:
    return httpx.get(url + "api/config", timeout=10).json()["model_servers"]["sim"]


def test_serve_answers_again_after_its_model_server_comes_back(outage_serve, world):
    """The stand-in dies; an upload meanwhile fails (after waiting 3 s for it), /api/config says the server is
    down and the open page says so; restarted on the same port after 5 s, the next upload is answered 200 by
    the same `serve` process (before, one outage made every later upload 502 until serve was restarted), the
    server shows as back, and the page says it is back."""
    url, vlm, _ = outage_serve
    assert upload(url, world.queries[0].path).status_code == 200
    with offline_browser(allow=(url,)) as browser:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("body[data-servers=up]", timeout=60_000)
        assert page.locator("#servers").is_hidden()
        port = port_of(vlm)
        vlm.kill()
        down_at = time.monotonic()
        during = upload(url, world.queries[1].path)
        assert during.status_code == 502 and "cannot connect" in during.json()["error"]
        assert servers(url)[0]["up"] is False and servers(url)[0]["down_since"]
        page.wait_for_selector("body[data-servers=down]", timeout=30_000)
        assert f"Model server {vlm.url} is down since" in page.locator("#servers").inner_text()
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
        with StandinServer(WorldJudge(world.truth), StandinConfig(latency_s=0.01), port=port) as revived:
            after = upload(url, world.queries[2].path)
            assert after.status_code == 200, after.text
            assert len(revived.chat_requests()) > 0
            status = servers(url)[0]
            assert status["up"] is True and status["back_since"] and status["problem"] is None
            page.wait_for_selector("body[data-servers=back]", timeout=30_000)
            assert f"Model server {vlm.url} is back since" in page.locator("#servers").inner_text()
        assert not page.geoagent_errors, page.geoagent_errors


def test_a_batch_over_60_photos_rides_out_an_outage(world, tmp_path):
    """60 photos (all distinct, no EXIF GPS): the stand-in is killed after 10 are journalled and restarted on the
    same port 5 s later; the batch waits for it (outage_wait_s) and probes it back: every photo answered, no
    failure journalled, exit 0, with no restart of the batch."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(60):
        query = world.queries[i % len(world.queries)]
        Image.open(query.path).save(photos / f"{i:02d}.jpg", quality=90 - i // len(world.queries))  # new bytes, same scene
    vlm = StandinServer(WorldJudge(world.truth), StandinConfig(latency_s=0.01)).__enter__()
    backend = {"max_concurrency": 4, "outage_wait_s": 60.0, **RECOVERY}
    config = write_world_config(tmp_path / "g.toml", world, vlm, tmp_path / "cache", backend=backend, strategy="tournament")
    out = tmp_path / "run.jsonl"
    seen: dict[str, int] = {}
    revived: list[StandinServer] = []

    def lines() -> int:
        return out.read_bytes().count(b"\n") if out.exists() else 0

    def outage() -> None:
        deadline = time.monotonic() + 300
        while lines() < 10 and time.monotonic() < deadline:
            time.sleep(0.005)
        port = port_of(vlm)
        vlm.kill()
        seen["at_kill"] = lines()
        time.sleep(OUTAGE_S)
        seen["at_restart"] = lines()
        revived.append(StandinServer(WorldJudge(world.truth), StandinConfig(latency_s=0.01), port=port).__enter__())

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        done = run_cli("batch", str(photos), "--out", str(out), "--config", str(config), cwd=tmp_path)
        thread.join(timeout=60)
    finally:
        for server in (vlm, *revived):
            server.__exit__(None, None, None)
    assert done.returncode == 0, done.stderr
    entries = [line for line in out.read_text().splitlines() if line]
    assert len(entries) == 60 and not any('"error"' in line for line in entries)
    assert seen["at_kill"] >= 10 and seen["at_restart"] < 60  # the outage fell mid-run
    assert revived and len(revived[0].chat_requests()) > 0  # the rest was answered by the restarted server
