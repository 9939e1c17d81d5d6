"""A stand-in server in its own process (``python -m standin``), as a separate machine would be: for tests and
benchmarks of several servers, where one must be SIGKILLed while the others go on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from standin.__main__ import READY

TESTS = Path(__file__).resolve().parent.parent


class StandinProcess:
    """``python -m standin ARGS``; :meth:`ready` waits for its URL (start several, then wait for each)."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen([sys.executable, "-m", "standin", *args], cwd=TESTS, env=env, stdout=subprocess.PIPE, text=True)
        self.url = ""

    def ready(self) -> StandinProcess:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith(READY):
            raise RuntimeError(f"the stand-in did not start: {line!r}")
        self.url = line[len(READY) :].strip()
        return self

    def stats(self) -> dict[str, int]:
        """``chat_requests`` answered and ``max_busy`` (most requests in it at once)."""
        return dict(httpx.get(self.url + "/standin/stats", timeout=5).json())

    def chat_requests(self) -> int:
        return self.stats()["chat_requests"]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def start_standins(count: int, *args: str) -> list[StandinProcess]:
    """``count`` stand-in processes started at once, each ready."""
    started = [StandinProcess(*args) for _ in range(count)]
    return [server.ready() for server in started]
