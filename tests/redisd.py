"""A real Redis server for the tests: Debian's ``redis-server`` on a free port of 127.0.0.1, its data in a folder.

Persistence is the append-only file, fsynced on every write, so a test can SIGKILL the server, start it again
on the same folder and port, and find what was written before the kill.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """A self-signed certificate for 127.0.0.1 and its key (the certificate is its own CA)."""

    cert: Path
    key: Path

    @classmethod
    def make(cls, folder: Path) -> TlsFiles:
        """Made by the openssl command line, as an administrator would."""
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / "cert.pem", folder / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        return cls(cert, key)


class RedisServer:
    """``start()``, ``kill()`` (SIGKILL), ``start()`` again: the same port and data folder each time."""

    def __init__(self, data_dir: Path, password: str | None = None, tls: TlsFiles | None = None) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.tls = tls  # set: the server speaks TLS only (rediss://), with this certificate
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.cert}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _ping(self) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
            if self.tls is None:
                raw.sendall(b"PING\r\n")
                return raw.recv(64)
            with ssl.create_default_context(cafile=str(self.tls.cert)).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64)

    def start(self) -> RedisServer:
        args = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls is not None:
            args[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key), "--tls-auth-clients", "no"]
        log = (self.data_dir / "redis.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.data_dir / 'redis.log').read_text()[-2000:]}")
            try:
                reply = self._ping()
                if reply.startswith((b"+PONG", b"-NOAUTH")):
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer within 30 s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None

    def command(self, *args: str) -> str:
        """One command through redis-cli (another client than GeoAgent's), its reply as text."""
        auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
        tls = ["--tls", "--cacert", str(self.tls.cert)] if self.tls is not None else []
        proc = subprocess.run(["redis-cli", "-p", str(self.port), *tls, *auth, *args], capture_output=True, text=True, timeout=30)
        return proc.stdout.strip()
