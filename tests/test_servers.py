"""Several servers per backend profile (vlm/pool.py): stand-in servers in their own processes, as separate
machines would be; routing by fewest outstanding requests, a server killed mid-run, servers that disagree on
the model's weights, `geoagent check` over every server; and the one-line reports of a base_url that is not
a model server (an HTML page) or not a URL at all."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import BaseModel

from conftest import run_cli, world_settings, write_world_config
from geoagent.agent.controller import GeoAgent
from geoagent.config import Settings
from geoagent.errors import ConfigError
from geoagent.vlm import VLMPool
from standin.process import StandinProcess, start_standins

LATENCY_S = 0.1  # each stand-in's answer time
CAPACITY = 2  # requests each stand-in serves at once


class MarkerAnswer(BaseModel):
    code: int


@pytest.fixture
def standins() -> Iterator[Callable[..., list[StandinProcess]]]:
    """Start ``count`` stand-in processes (capacity 2, 100 ms each unless told); all stop after the test."""
    started: list[StandinProcess] = []

    def start(count: int, *extra: str) -> list[StandinProcess]:
        servers = start_standins(count, "--latency-s", str(LATENCY_S), "--capacity", str(CAPACITY), *extra)
        started.extend(servers)
        return servers

    yield start
    for server in started:
        server.stop()


def pool_settings(tmp_path: Path, urls: list[str], **profile: object) -> Settings:
    backend = {"kind": "ollama", "model": "llava:7b", "base_url": urls, "max_concurrency": CAPACITY, "timeout_s": 10,
               "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.1, "probe_backoff_s": 0.2, **profile}  # fmt: skip
    return Settings(backends={"farm": backend}, tasks={"default": "farm"}, cache={"dir": tmp_path / "cache"})


async def ask_all(pool: VLMPool, marker_images, rounds: int) -> list[int]:
    """Every marker image asked ``rounds`` times in different words: that many distinct questions each."""
    client = pool.for_task("pairwise")
    questions = [(f"Which code is drawn? ({n})", image) for n in range(rounds) for image in marker_images]
    answers = await asyncio.gather(*(client.ask(prompt, [image], MarkerAnswer) for prompt, image in questions))
    return [answer.value.code for answer in answers]


async def test_four_servers_share_the_questions_evenly(standins, marker_images, tmp_path):
    """One profile over four servers (2 slots, 100 ms each): each server answers a quarter of 120 questions,
    within 15%, every answer right, and no server ever holds more than its 2 slots."""
    servers = standins(4)
    pool = VLMPool(pool_settings(tmp_path, [s.url for s in servers]))
    try:
        codes = await ask_all(pool, marker_images, rounds=3)
    finally:
        await pool.aclose()
    assert codes == [100 + i for i in range(40)] * 3
    shares = [s.chat_requests() for s in servers]
    assert sum(shares) == 120 and all(abs(share - 30) <= 0.15 * 30 for share in shares), shares
    assert all(s.stats()["max_busy"] <= CAPACITY for s in servers)


async def test_a_server_killed_mid_run_loses_nothing_and_the_others_absorb_its_work(standins, marker_images, tmp_path):
    """SIGKILL one of four servers once a quarter of the questions are answered: every question is still answered
    right (its requests in flight are retried on the others), it is taken out, and the three survivors answer
    everything after the kill between them."""
    servers = standins(4)
    pool = VLMPool(pool_settings(tmp_path, [s.url for s in servers]))
    client = pool.for_task("pairwise")
    victim = servers[0]
    killed_after: list[int] = []

    async def kill_when_a_quarter_is_answered() -> None:
        while sum(s.answered for s in client.status()) < 30:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(victim.kill)
        killed_after.append(client.status()[0].answered)  # once it is dead

    killer = asyncio.create_task(kill_when_a_quarter_is_answered())
    try:
        codes = await ask_all(pool, marker_images, rounds=3)
        await killer
    finally:
        await pool.aclose()
    assert codes == [100 + i for i in range(40)] * 3 and client.totals.failures == 0
    status = {s.url: s for s in pool.server_status()["farm"]}
    # Taken out for its connections: refused ones ("cannot connect"), or, when several requests were in flight
    # as it died, their reset connections ("connection failed: ReadError") count first; which, load decides.
    problem = status[victim.url].problem or ""
    assert not status[victim.url].up and ("cannot connect" in problem or "connection failed" in problem), problem
    survivors = [s.chat_requests() for s in servers[1:]]
    # the victim answered at most what it had when it died, plus replies already on their way
    assert status[victim.url].answered <= killed_after[0] + CAPACITY
    assert sum(survivors) >= 120 - status[victim.url].answered and all(share > 30 for share in survivors), survivors


async def test_servers_reporting_different_weights_are_refused_at_preflight(standins, world, world_retriever, tmp_path):
    """Two servers of one profile whose Ollama digests differ would answer under one cache key: the preflight
    refuses the profile (exit 2, a ConfigError) naming both servers and both digests, before any photo."""
    (first,) = standins(1, "--digest", "llava:7b=sha256:aaaa1111")
    (second,) = standins(1, "--digest", "llava:7b=sha256:bbbb2222")
    farm = pool_settings(tmp_path, [first.url, second.url])
    settings = world_settings(world, first, tmp_path / "cache", strategy="tournament").model_copy(update={"backends": farm.backends, "tasks": farm.tasks})
    async with GeoAgent(settings, retriever=world_retriever) as agent:
        readiness = await agent.preflight()
    assert len(readiness.problems) == 1 and isinstance(readiness.problems[0], ConfigError)
    message = str(readiness.problems[0])
    assert f"{first.url} reports sha256:aaaa1111" in message and f"{second.url} reports sha256:bbbb2222" in message
    assert first.chat_requests() == second.chat_requests() == 0


def test_check_lists_every_server(standins, tmp_path):
    """`geoagent check` checks each server of a profile, one line each: the one that answers and the one that is
    down, named by URL; the down one fails the check."""
    (server,) = standins(1)
    down = "http://127.0.0.1:9"
    (tmp_path / "geoagent.toml").write_text(f'[backends.farm]\nmodel = "llava:7b"\nbase_url = ["{server.url}", "{down}"]\n[tasks]\ndefault = "farm"\n')
    proc = run_cli("check", cwd=tmp_path)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"farm: ok: llava:7b at {server.url}" in lines
    assert any(line.startswith(f"farm: FAILED: backend 'farm': cannot connect to {down}") for line in lines), lines


# --- base_url that is not a model server, or not a URL ----------------------------------------------------------


class _WebPage(BaseHTTPRequestHandler):
    """A web app where the model server should be: every request answered with a long HTML page."""

    status = 200

    def _page(self) -> None:
        body = b"<!DOCTYPE html><html><head><title>Router login</title></head><body>" + b"<p>hello</p>" * 400 + b"</body></html>"
        self.send_response(self.status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        self._page()

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._page()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(params=[200, 404, 501, 502])
def web_page(request) -> Iterator[str]:
    """A server answering HTML with this status: a web app (200, 404), `python -m http.server` refusing a POST (501),
    a proxy whose model server is down (502)."""
    handler = type("Page", (_WebPage,), {"status": request.param})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def web_page_config(tmp_path: Path, world, kind: str, url: str) -> Path:
    backend = {"kind": kind, "base_url": url, "retry_backoff_s": 0.01, "max_retries": 1}
    return write_world_config(tmp_path / "g.toml", world, SimpleNamespace(url=url), tmp_path / "cache", backend=backend)  # type: ignore[arg-type]


def assert_one_line_naming(text: str, url: str) -> None:
    assert "<" not in text and "Traceback" not in text, text
    assert url in text and "an HTML page" in text and "is base_url right?" in text


@pytest.mark.parametrize("kind", ["ollama", "openai"])
def test_a_web_page_at_base_url_is_one_line_in_check(kind, web_page, world, tmp_path):
    """An HTML page where the API should be is never dumped into the error: `check` names base_url in one line."""
    checked = run_cli("check", "--config", str(web_page_config(tmp_path, world, kind, web_page)), cwd=tmp_path)
    assert checked.returncode == 1 and len(checked.stdout.strip().splitlines()) == 1
    assert_one_line_naming(checked.stdout + checked.stderr, web_page)


@pytest.mark.parametrize("web_page", [502], indirect=True)
def test_a_proxy_page_at_base_url_stops_locate_in_one_line(web_page, world, tmp_path):
    """A proxy's HTML error page on the ollama kind (it used to be dumped whole, exit 1): `locate` stops at the
    preflight with one error line naming base_url, exit 2."""
    located = run_cli("locate", str(world.queries[0].path), "--config", str(web_page_config(tmp_path, world, "ollama", web_page)), cwd=tmp_path)
    errors = [line for line in located.stderr.splitlines() if line.startswith("error:")]
    assert located.returncode == 2 and len(errors) == 1, located.stderr
    assert_one_line_naming(located.stdout + located.stderr, web_page)


@pytest.mark.parametrize("url", ['"not a url"', '["http://127.0.0.1:11434", "gpu2:11434"]'])
def test_a_base_url_that_is_not_a_url_is_a_config_error(url, tmp_path):
    """`base_url = "not a url"` is a configuration error (exit 2, naming the key), not "cannot connect ... is
    ollama serve running?"; the same for one entry of a list of servers."""
    (tmp_path / "geoagent.toml").write_text(f"[backends.local]\nbase_url = {url}\n")
    for command in ("check", "locate"):
        proc = run_cli(command, *(["x.jpg"] if command == "locate" else []), cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "backends.local.base_url" in proc.stderr and "not a URL" in proc.stderr and "cannot connect" not in proc.stderr
