"""Running ``geoagent serve``: bind, serve with uvicorn at once while the agent's preflight loads its models, until
Ctrl-C; close cleanly."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn

from geoagent.agent.controller import GeoAgent
from geoagent.config import Settings
from geoagent.errors import ConfigError
from geoagent.paths import os_error_reason
from geoagent.web.app import WebOptions, create_app
from geoagent.web.startup import Startup

GRACEFUL_SHUTDOWN_S = 5  # on Ctrl-C, open streams get this long to finish before they are cut
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STARTED_POLL_S = 0.02  # how often the start waits for uvicorn to be listening before it says the URL


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


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one); ConfigError naming the flag that is wrong."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: not an address of this computer ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    try:
        return socket.create_server(address, family=family, backlog=128)
    except OSError as exc:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({os_error_reason(exc)})") from None


def page_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


async def serve(
    settings: Settings,
    options: WebOptions,
    port: int,
    *,
    say: Callable[[str], None],
    warn: Callable[[str], None],
    error: Callable[[str], None],
) -> int:
    """Serve the page until stopped; the exit code. The URL is said as soon as the server listens; the models load
    behind it (the page shows "loading models…", then "ready"), and the preflight's problems stop the server."""
    sock = bind(options.host, port)
    try:
        async with GeoAgent(settings) as agent:
            startup = Startup()
            config = uvicorn.Config(
                create_app(agent, options, startup), log_config=None, access_log=False, lifespan="off",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            )
            server = _Server(config)
            serving = asyncio.create_task(server.serve(sockets=[sock]))
            preflight = asyncio.create_task(agent.preflight())
            while not server.started and not serving.done():
                await asyncio.sleep(STARTED_POLL_S)
            if server.started:
                say(f"GeoAgent page at {page_url(sock)} (Ctrl-C to stop)")
            await asyncio.wait((serving, preflight), return_when=asyncio.FIRST_COMPLETED)
            if not preflight.done():  # stopped while the models loaded
                preflight.cancel()
                await asyncio.gather(preflight, return_exceptions=True)
            else:
                readiness = preflight.result()
                code = readiness.tell(warn, error)
                if code:
                    startup.failed([str(problem) for problem in readiness.problems])
                    server.should_exit = True
                    await serving
                    return code
                startup.ready()
                say("ready: models loaded")
            await serving
            say("stopped")
    finally:
        sock.close()
    return 0
