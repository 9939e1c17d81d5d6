"""``geoagent ARGS`` in a new process without importing PyTorch again for each one (the suite runs ~200 commands,
and importing torch + open_clip costs each of them seconds of CPU).

A helper process per test worker imports the heavy libraries once (``PRELOAD``) and waits; each command is a
child forked from it: a new process with its own working folder, environment, stdin (/dev/null), stdout and
stderr, run as ``python -m geoagent ARGS`` runs (``runpy``, ``sys.argv``, ``sys.path[0]`` the working folder) and
ended by Python's normal exit (atexit, threads joined, streams flushed), its exit code read back as
``subprocess.run`` reads it. The geoagent modules every command imports are imported before the fork (none
reads the environment at import: settings are read when a command runs).

What a forked child cannot show is what a fresh interpreter does at import time, so ``run`` answers None (the
caller then starts a plain ``python -m geoagent``) when the environment asked for differs from the helper's in a
variable that is not known to be read only at run time: ``PYTHONPROFILEIMPORTTIME`` (a test of what a command
imports), ``HF_*`` (read by huggingface_hub when imported), ``PYTHONPATH`` and so on.
"""

from __future__ import annotations

import atexit
import json
import locale
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

#: Imported once by the helper: what makes a command that loads CLIP slow to start, and what every command
#: imports (the CLI, the agent, the batch runner, the model servers' clients: about 1 s of CPU a command).
#: None of them reads the environment when imported.
PRELOAD = ("numpy", "PIL.Image", "torch", "open_clip", "faiss", "ollama", "openai",
           "geoagent.cli", "geoagent.agent.controller", "geoagent.batch.runner", "geoagent.vlm.backends.openai")
#: Environment variables that may differ from the helper's: each is read when used, never when a module the
#: helper imported is imported (the tests' own cache folder, geoagent's settings, pytest's bookkeeping; Ray's:
#: the helper never imports ray). Three are set in the test worker's own environment by what a test imports
#: there, and would otherwise send every later command of that worker to a fresh interpreter: ``ray.init`` sets
#: ``RAY_*`` and ``PYTHONBREAKPOINT`` (read when ``breakpoint()`` is called); importing litellm sets
#: ``TIKTOKEN_CACHE_DIR`` (read by tiktoken when it loads an encoding; litellm sets it again when imported).
RUNTIME_ONLY = ("GEOAGENT_", "PYTEST_", "XDG_CACHE_HOME", "RAY_", "PYTHONBREAKPOINT", "TIKTOKEN_CACHE_DIR")
MESSAGE_BYTES = 1 << 20
#: TESTS_COLD_CLI=1: every command a plain ``python -m geoagent`` (to compare, or to rule this helper out).
COLD = os.environ.get("TESTS_COLD_CLI") == "1"


class WarmRunner:
    """The helper process of this test worker, started on first use, stopped when the worker exits."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}

    def _start(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="geoagent-warmcli-"))  # its socket, stderr and cache folder
        self.address = str(self.folder / "socket")
        self.env = {**os.environ, "XDG_CACHE_HOME": str(self.folder / "cache")}
        self.process = subprocess.Popen([sys.executable, __file__, self.address], cwd=self.folder, env=self.env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=(self.folder / "stderr.txt").open("wb"))  # fmt: skip
        ready = self.process.stdout.readline()  # type: ignore[union-attr]
        if ready != b"ready\n":
            raise RuntimeError(f"the warm runner did not start: {(self.folder / 'stderr.txt').read_text()[-3000:]}")
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()  # type: ignore[union-attr]  # EOF: the helper exits
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)

    def warm_enough(self, env: dict[str, str]) -> bool:
        """True when ``env`` differs from the helper's only in variables read at run time."""
        changed = {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)}
        return all(k.startswith(RUNTIME_ONLY) for k in changed)

    def run(self, args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str] | None:
        """``geoagent ARGS`` in a child forked from the helper; None when ``env`` needs a fresh interpreter."""
        if COLD:
            return None
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self._start()
        if not self.warm_enough(env):
            return None
        request = json.dumps({"args": args, "cwd": str(Path(cwd).resolve()), "env": env}).encode()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, open(os.devnull, "rb") as null, \
                socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:  # fmt: skip
            conn.connect(self.address)
            socket.send_fds(conn, [request], [null.fileno(), out.fileno(), err.fileno()])
            pid = json.loads(conn.recv(MESSAGE_BYTES))["pid"]
            conn.settimeout(timeout)
            try:
                status = json.loads(conn.recv(MESSAGE_BYTES))["returncode"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(["geoagent", *args], timeout) from None
            return subprocess.CompletedProcess([sys.executable, "-m", "geoagent", *args], status, _text(out), _text(err))


def _text(file) -> str:
    """What ``subprocess.run(text=True)`` makes of the bytes: the locale's encoding, universal newlines."""
    file.seek(0)
    return file.read().decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


RUNNER = WarmRunner()


# --- the helper process -------------------------------------------------------------------------------------


def _child(request: dict, fds: list[int], inherited: list[socket.socket]) -> None:
    """In the forked child: become ``python -m geoagent ARGS`` in the requested folder and environment."""
    import runpy

    for sock in inherited:
        sock.close()
    for target, fd in enumerate(fds):  # stdin, stdout, stderr (fd 0 was the helper's pipe from the test worker)
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["geoagent", *request["args"]]
    sys.path[0] = os.getcwd()  # what `python -m` puts first
    runpy.run_module("geoagent", run_name="__main__", alter_sys=True)
    sys.exit(0)


def _serve(address: str) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(64)
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection its exit code goes back on
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [], 0.02)
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 1):
            for pid in waiting:
                os.kill(pid, signal.SIGKILL)
            return
        if listener in readable:
            conn, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(conn, MESSAGE_BYTES, 3)
            pid = os.fork()
            if pid == 0:
                _child(json.loads(message), fds, [listener, conn, *waiting.values()])
            for fd in fds:
                os.close(fd)
            conn.send(json.dumps({"pid": pid}).encode())
            waiting[pid] = conn
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = waiting.pop(pid)
            try:
                conn.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
            except OSError:  # the test gave up on it (timeout)
                pass
            conn.close()


if __name__ == "__main__":
    _serve(sys.argv[1])
