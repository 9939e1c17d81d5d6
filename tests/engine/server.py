"""``transformers serve`` as a subprocess on 127.0.0.1: a real OpenAI-compatible engine for the tests.

Started as a new user would start it, with no model pinned: models are loaded on demand by the name a request
gives (here, a local folder path), with an empty Hugging Face home (a fresh machine, nothing downloaded) and the
hub offline. Its log goes to a file the tests read to prove what reached the engine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

#: How long a cold start may take (imports torch and transformers; about 10 s on a busy 2-core machine).
STARTUP_TIMEOUT_S = 180.0
POLL_S = 0.1
#: The engine logs this (level warning) when a chat request reaches its handler, before generating.
REQUEST_RECEIVED = "[Request received]"
#: ... and this, once per process, for OpenAI fields it accepts without applying.
IGNORED_FIELDS = "Ignoring unsupported fields in the request"

_LAUNCH = "from transformers.cli.transformers import main; main()"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EngineServer:
    """One ``transformers serve`` process; ``url`` is its OpenAI base URL (``.../v1``)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / "engine.log"
        self.hf_home = workdir / "hf-home"  # never created: the engine sees a machine with no model cache
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0
        self._started_at = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def launch(self) -> None:
        """Start the process without waiting for it (loading torch overlaps whatever the caller does next)."""
        self.port = free_port()
        env = {
            **os.environ,
            "HF_HOME": str(self.hf_home),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
        command = [sys.executable, "-c", _LAUNCH, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--device", "cpu", "--log-level", "warning"]
        self._started_at = time.perf_counter()
        with self.log_path.open("ab") as log:
            log.write(f"\n=== engine start: {' '.join(command[3:])} ===\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir, start_new_session=True
            )

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Poll ``/health`` until it answers 200; fail with the log's tail if the process dies or takes too long."""
        assert self.process is not None, "launch() first"
        deadline = self._started_at + timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).status_code == 200:
                    self.startup_s = time.perf_counter() - self._started_at
                    return
            except httpx.TransportError:
                pass
            time.sleep(POLL_S)
        self.stop()
        raise RuntimeError(f"transformers serve not ready after {timeout_s:g} s:\n{self.log_tail()}")

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def ensure_running(self) -> None:
        """Restart the engine if a test killed it."""
        if self.process is None or self.process.poll() is not None:
            self.start()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGCONT)  # a paused engine cannot act on SIGTERM
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL: the engine dies as in a crash or an out-of-memory kill, with requests in flight."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the engine accepts connections (the kernel does) but answers nothing, like a hung server."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def requests_received(self) -> int:
        """Chat requests the engine's handler has started on, as its own log says."""
        return self.log_text().count(REQUEST_RECEIVED)

    def wait_received(self, count: int, timeout_s: float = 60.0) -> None:
        """Wait until the engine has logged ``count`` chat requests in all (requests it is still working through)."""
        deadline = time.perf_counter() + timeout_s
        while self.requests_received() < count:
            if time.perf_counter() > deadline:
                raise AssertionError(f"the engine logged {self.requests_received()} requests, expected {count}")
            time.sleep(POLL_S)
