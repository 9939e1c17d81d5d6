"""Running ``geoagent serve``: bind, preflight the agent once, serve with uvicorn until Ctrl-C, close cleanly."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import uvicorn

from geoagent.agent.controller import GeoAgent
from geoagent.config import Settings
from geoagent.errors import ConfigError
from geoagent.paths import os_error_reason
from geoagent.web.app import WebOptions, create_app, tile_source
from geoagent.web.guard import TOKEN_PARAM, Access, is_every_address

GRACEFUL_SHUTDOWN_S = 5  # on Ctrl-C, open streams get this long to finish before they are cut
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
TOKEN_BYTES = 32  # a generated token: 43 URL-safe characters


class _Server(uvicorn.Server):
    """uvicorn's server, stopping on Ctrl-C or SIGTERM without raising the signal again once stopped: the
    agent is closed and the command exits normally."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        try:
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
        except NotImplementedError:  # Windows: uvicorn's own handling (it raises the signal again when stopped)
            with super().capture_signals():
                yield
            return
        try:
            yield
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)


def resolve(host: str, port: int) -> tuple[int, tuple[object, ...]]:
    """The address family and socket address ``--host`` names; ConfigError when it is not one of this computer's."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: not an address of this computer ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    return family, address


def is_loopback(address: tuple[object, ...]) -> bool:
    """True when the socket address is reachable from this computer only (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(str(address[0]).split("%")[0]).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one); ConfigError naming the flag that is wrong."""
    family, address = resolve(host, port)
    try:
        return socket.create_server(address, family=family, backlog=128)  # type: ignore[arg-type]
    except OSError as exc:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({os_error_reason(exc)})") from None


def plan_access(settings: Settings, options: WebOptions, port: int) -> tuple[Access, bool]:
    """Who may use the server, and whether its token was generated here (to be printed): a non-loopback
    ``--host`` needs ``--allow-remote`` and gets a token; ``[serve] token_env`` sets the token on any bind."""
    _, address = resolve(options.host, port)
    loopback = is_loopback(address)
    if not loopback and not options.allow_remote:
        raise ConfigError(
            f"--host {options.host} lets other computers reach the page: add --allow-remote to serve them "
            "(a token is then required), or use --host 127.0.0.1"
        )
    token = settings.serve.token()
    generated = token is None and not loopback
    if generated:
        token = secrets.token_urlsafe(TOKEN_BYTES)
    return Access.plan(options.host, settings.serve.allowed_hosts, token), generated


def page_url(sock: socket.socket, token: str | None = None) -> str:
    """The page's address (on an every-address bind: under this computer's name), with ``?token=`` if given."""
    host, port = sock.getsockname()[:2]
    if is_every_address(host):
        host = socket.gethostname()
    url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    return url + (f"?{TOKEN_PARAM}={token}" if token else "")


async def serve(
    settings: Settings,
    options: WebOptions,
    port: int,
    *,
    say: Callable[[str], None],
    warn: Callable[[str], None],
    error: Callable[[str], None],
) -> int:
    """Serve the page until stopped; the exit code (the preflight's problems stop it before it listens)."""
    tile_source(options.tiles)  # a bad --tiles is refused before anything starts
    access, generated = plan_access(settings, options, port)
    options = replace(options, access=access)
    sock = bind(options.host, port)
    try:
        if not is_loopback(sock.getsockname()):
            warn(
                f"--allow-remote: the page listens on {options.host}, so other computers can reach it; only a holder "
                "of the token can use it, but plain HTTP is not encrypted: on an untrusted network, use an SSH "
                "tunnel or a TLS reverse proxy"
            )
        async with GeoAgent(settings) as agent:
            code = (await agent.preflight()).tell(warn, error)
            if code:
                return code
            config = uvicorn.Config(
                create_app(agent, options), log_config=None, access_log=False, lifespan="off",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            )
            server = _Server(config)
            # A generated token is printed here once, in the URL; one from token_env is never printed.
            told = "" if generated or access.token is None else f"; token: the value of {settings.serve.token_env}"
            say(f"GeoAgent page at {page_url(sock, access.token if generated else None)} (Ctrl-C to stop{told})")
            await server.serve(sockets=[sock])
            say("stopped")
    finally:
        sock.close()
    return 0
