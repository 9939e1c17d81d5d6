"""Start visibly (issue 17, part 2): on a terminal, `locate`, `batch` and `eval` say what they load while they load
it (nothing when stderr is piped); `serve` says its URL as soon as it listens, loads its models behind it, and the
page tells "loading models…" until they are ready."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from browser import offline_browser
from conftest import run_cli, write_world_config
from standin import StandinConfig, WorldJudge
from test_terminal import run_with_terminal_stderr

LOADING_CLIP = "loading CLIP tiny-clip"  # what the status line says while the world's CLIP loads
READY_LINE = "GeoAgent page at "
STARTUP_TIMEOUT_S = 120


@pytest.mark.parametrize("command", ["locate", "batch", "eval"])
def test_a_terminal_is_told_what_is_loading_and_a_pipe_is_not(command, world, standin, tmp_path):
    """stderr a terminal: the status line names the CLIP model while it loads (for batch and eval inside their bar's
    label); stderr a pipe: no such line at all, a log file stays clean (one command shows it: every command installs
    the status line the same way, in cli.user_errors)."""
    server = standin(judge=WorldJudge(world.truth))
    config = write_world_config(tmp_path / "geoagent.toml", world, server, tmp_path / "cache")
    photo = str(world.queries[0].path)
    (tmp_path / "photos.txt").write_text(photo + "\n")
    args = {
        "locate": ["locate", photo, "--strategy", "none", "--json"],
        "batch": ["batch", str(tmp_path / "photos.txt"), "--strategy", "none", "--out", str(tmp_path / "out.jsonl")],
        "eval": ["eval", str(world.queries_csv), "--limit", "1", "--config", f"a={config}"],
    }[command]
    if command != "eval":
        args += ["--config", str(config)]
    code, _out, screen = run_with_terminal_stderr(args, tmp_path)
    assert code == 0, screen
    assert f"{LOADING_CLIP}…" in screen, screen
    if command != "locate":
        return
    piped = run_cli(*args, cwd=tmp_path)
    assert piped.returncode == 0, piped.stderr
    assert LOADING_CLIP not in piped.stderr, piped.stderr


def test_serve_says_its_url_at_once_and_the_page_shows_when_the_models_are_ready(world, standin, tmp_path):
    """The backend's model check is held (the stand-in answers /api/show only when let go), so the preflight cannot
    finish: the URL is out all the same, /api/status says "loading", the page says "Loading models…", and a photo sent
    meanwhile waits. Let go, the status turns "ready" (said on stdout too), the page clears its line, and the photo
    is answered."""
    held = threading.Event()
    server = standin(judge=WorldJudge(world.truth), config=StandinConfig(hold_show=held))
    config = write_world_config(tmp_path / "geoagent.toml", world, server, tmp_path / "cache")
    out = tmp_path / "stdout.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEOAGENT_")}
    with out.open("wb") as stdout, (tmp_path / "stderr.txt").open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "geoagent", "serve", "--port", "0", "--config", str(config)],
                                   cwd=tmp_path, env=env, stdout=stdout, stderr=stderr)  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while READY_LINE not in out.read_text():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
            time.sleep(0.05)
        url = out.read_text().split(READY_LINE)[1].split()[0]
        status = httpx.get(url + "api/status", timeout=10).json()
        assert {k: status[k] for k in ("state", "message")} == {"state": "loading", "message": "loading models…"}
        answer: dict[str, httpx.Response] = {}
        sender = threading.Thread(target=lambda: answer.update(r=httpx.post(
            url + "api/locate", files={"photo": ("q.jpg", world.queries[0].path.read_bytes(), "image/jpeg")}, timeout=120)))
        sender.start()
        with offline_browser(allow=(url,)) as browser:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("body[data-models=loading]", timeout=30_000)
            assert page.locator("#status").inner_text() == "Loading models…"
            assert "r" not in answer  # the photo waits for the models
            held.set()
            page.wait_for_selector("body[data-models=ready]", timeout=60_000)
            assert page.locator("#status").inner_text() == ""
            assert page.locator("#error").is_hidden()
        sender.join(timeout=120)
        assert answer["r"].status_code == 200 and "lat" in answer["r"].json()
        assert httpx.get(url + "api/status", timeout=10).json()["state"] == "ready"
        lines = out.read_text().splitlines()
        assert lines[0].startswith(READY_LINE) and "ready: models loaded" in lines[1:]
    finally:
        held.set()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert process.returncode == 0


def test_a_listener_of_a_load_is_told_its_start_and_end(tmp_path):
    """geoagent.loading: the announcer sees each wait for as long as it lasts, from worker threads too; with none
    installed, a load runs as it would anyway."""
    from contextlib import contextmanager

    from geoagent.loading import loading, set_announcer

    heard: list[str] = []

    @contextmanager
    def announcer(text: str):
        heard.append(f"+{text}")
        yield
        heard.append(f"-{text}")

    set_announcer(announcer)
    try:
        with loading("loading CLIP A"):
            heard.append("work")
        thread_done: list[str] = []

        def in_thread() -> None:
            with loading("loading B"):
                thread_done.append("b")

        worker = threading.Thread(target=in_thread)
        worker.start()
        worker.join()
    finally:
        set_announcer(None)
    with loading("unheard"):
        pass
    assert heard == ["+loading CLIP A", "work", "-loading CLIP A", "+loading B", "-loading B"] and thread_done == ["b"]
