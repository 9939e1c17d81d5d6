"""``geoagent ARGS`` in a new process without importing PyTorch again for each one (the suite runs ~200 commands,
and importing torch + open_clip costs each of them seconds of CPU).

A helper process per test worker imports the heavy libraries once (``PRELOAD``) and waits; each command is a
child forked from it: a new process with its own working folder, environment, stdin (/dev/null), stdout and
stderr, run as ``python -m geoagent ARGS`` runs (``runpy``, ``sys.argv``, ``sys.path[0]`` the working folder) and
ended by Python's normal exit (atexit, threads joined, streams flushed), its exit code read back as
``subprocess.run`` reads it. The geoagent modules every command imports are imported before the fork (none
reads the environment at import: settings are read when a command runs).

What a forked child cannot show is what a fresh interpreter does at import time, so ``run`` and ``start`` answer
None (the caller then starts a plain ``python -m geoagent``) when the environment asked for differs from the helper's in a
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
from typing import Any

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

    def _ready(self, env: dict[str, str]) -> bool:
        """The helper started (on first use); False when ``env`` needs a fresh interpreter (or TESTS_COLD_CLI)."""
        if COLD:
            return False
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self._start()
        return self.warm_enough(env)

    def _fork(self, args: list[str], cwd: Path, env: dict[str, str], fds: list[int]) -> tuple[socket.socket, int]:
        """Ask the helper for a child with ``fds`` as its stdin, stdout and stderr: the connection its exit code
        will come back on, and its pid."""
        request = json.dumps({"args": args, "cwd": str(Path(cwd).resolve()), "env": env}).encode()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(self.address)
        socket.send_fds(conn, [request], fds)
        return conn, json.loads(conn.recv(MESSAGE_BYTES))["pid"]

    def run(self, args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str] | None:
        """``geoagent ARGS`` in a child forked from the helper, waited for (killed past ``timeout``, as
        ``subprocess.run`` kills); None when ``env`` needs a fresh interpreter."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            process = self.start(args, cwd, env, out, err)
            if process is None:
                return None
            try:
                status = process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise subprocess.TimeoutExpired(["geoagent", *args], timeout) from None
            return subprocess.CompletedProcess([sys.executable, "-m", "geoagent", *args], status, _text(out), _text(err))

    def start(self, args: list[str], cwd: Path, env: dict[str, str], stdout: Any, stderr: Any, text: bool = False) -> WarmProcess | None:
        """``geoagent ARGS`` started in a child forked from the helper, as ``subprocess.Popen`` starts it (stdin
        /dev/null; ``stdout`` and ``stderr`` each ``subprocess.PIPE``, ``subprocess.DEVNULL`` or an open file);
        None when ``env`` needs a fresh interpreter."""
        if not self._ready(env):
            return None
        ends: list[tuple[int, Any]] = []  # (the child's end, what the caller reads: a pipe's end or None)
        for target in (stdout, stderr):
            if target == subprocess.PIPE:
                read, write = os.pipe()
                ends.append((write, open(read, "r" if text else "rb")))  # noqa: SIM115 - the process's to close
            elif target == subprocess.DEVNULL:
                ends.append((os.open(os.devnull, os.O_WRONLY), None))
            else:
                ends.append((os.dup(target.fileno()), None))
        try:
            with open(os.devnull, "rb") as null:
                conn, pid = self._fork(args, cwd, env, [null.fileno(), *(end for end, _ in ends)])
        finally:
            for end, _ in ends:
                os.close(end)  # the child holds them now: the pipes end when it does
        return WarmProcess([sys.executable, "-m", "geoagent", *args], conn, pid, ends[0][1], ends[1][1])


class WarmProcess:
    """A command started by :meth:`WarmRunner.start`: what the tests use of ``subprocess.Popen`` (its exit code
    comes from the helper, which is its parent)."""

    def __init__(self, args: list[str], conn: socket.socket, pid: int, stdout: Any, stderr: Any) -> None:
        self.args, self.pid, self.stdout, self.stderr = args, pid, stdout, stderr
        self.returncode: int | None = None
        self._conn = conn

    def _exited(self, timeout: float | None) -> bool:
        if self.returncode is None:
            self._conn.settimeout(timeout)
            try:
                message = self._conn.recv(MESSAGE_BYTES)
            except (TimeoutError, BlockingIOError):
                return False
            self.returncode = json.loads(message)["returncode"]
            self._conn.close()
        return True

    def poll(self) -> int | None:
        self._exited(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        """Everything left on the pipes (read at once, as Popen does), then the exit code."""
        read: dict[int, Any] = {}
        readers = [
            threading.Thread(target=lambda n, f: read.__setitem__(n, f.read()), args=(n, f), daemon=True)
            for n, f in enumerate((self.stdout, self.stderr)) if f is not None
        ]  # fmt: skip
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout)
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self.wait(timeout)
        for pipe in (self.stdout, self.stderr):
            if pipe is not None:
                pipe.close()
        return read.get(0), read.get(1)


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
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as a command in a terminal gets it
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
