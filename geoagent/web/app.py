"""The ASGI app of ``geoagent serve``: the page, its static files, and the JSON and server-sent-event APIs.

Every request shares one :class:`GeoAgent`, so tabs share its connections, cache and concurrency limits; at most
``photos_in_flight()`` photos are located at once, the rest wait their turn.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from geoagent import __version__
from geoagent.agent.controller import GeoAgent
from geoagent.agent.events import AgentEvent, Done, OnEvent
from geoagent.errors import BackendError, ConfigError, GeoAgentError, InputError, PhotoError
from geoagent.maps.data import locate_map_data
from geoagent.output import result_json
from geoagent.types import LocateResult
from geoagent.web.guard import Access, Guard
from geoagent.web.startup import Startup
from geoagent.web.upload import Upload, UploadError, receive_photo, upload_folder

STATIC_DIR = Path(__file__).parent / "static"
MAP_STATIC_DIR = Path(__file__).parent.parent / "maps" / "static"  # Leaflet and the map module, shared with --map
LEAFLET_DIR = MAP_STATIC_DIR / "leaflet"
#: The default basemap. Tile requests tell the tile server roughly where the answer is; ``--tiles none`` stops them.
DEFAULT_TILES = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
TILES_ATTRIBUTION = "&copy; OpenStreetMap contributors"
MAP_TITLE = "GeoAgent"  # the map panel's heading
SSE_PING_S = 15  # keeps idle streams open through proxies while the agent waits on a slow model


@dataclass
class WebOptions:
    """What ``geoagent serve`` was started with, as the app needs it."""

    max_upload_bytes: int
    tiles: str | None = DEFAULT_TILES  # a Leaflet tile URL template, or None for no basemap (no request leaves)
    host: str = "127.0.0.1"
    allow_remote: bool = False  # --allow-remote: a non-loopback host is refused without it
    access: Access | None = None  # who may use the app; None: loopback names only, no token (serve plans it)


#: A tile template's host: a name (with {s}-style placeholders) and an optional port; anything else could
#: smuggle text into the Content-Security-Policy header.
_TILE_HOST = re.compile(r"[A-Za-z0-9.\-{}]+(:[0-9]+)?|\[[0-9A-Fa-f:.]+\](:[0-9]+)?")
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")


def tile_source(tiles: str | None) -> str:
    """The CSP source that lets the page load ``tiles`` (a Leaflet URL template): its origin, with a
    placeholder label such as ``{s}`` (Leaflet's subdomains) as a ``*.`` wildcard; ConfigError for a template
    that is not an http(s) URL."""
    if not tiles:
        return ""
    parts = urlsplit(tiles)
    if parts.scheme not in ("http", "https") or not _TILE_HOST.fullmatch(parts.netloc):
        raise ConfigError(f"--tiles {tiles}: not a tile URL template such as {DEFAULT_TILES} (or 'none')")
    labels = parts.netloc.split(".")
    if _PLACEHOLDER.search(labels[0]):
        labels[0] = "*"  # {s}.tile.example.org -> *.tile.example.org
    host = ".".join(labels)
    if _PLACEHOLDER.search(host) or host == "*" or host.startswith("*:"):
        return f"{parts.scheme}:"  # a placeholder deeper in the name: any host of that scheme
    return f"{parts.scheme}://{host}"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _public(message: str, upload: Upload) -> str:
    """A message about the upload with the server's temporary path replaced by the client's file name."""
    return message.replace(str(upload.path), upload.name)


def _failure_status(exc: GeoAgentError) -> int:
    """422 for a photo the agent cannot use, 502 when the models could not answer, 503 for anything else
    that is the server's own state (configuration, credentials)."""
    if isinstance(exc, PhotoError | BackendError):
        return 502
    if isinstance(exc, InputError):
        return 422
    return 503


class _CleanupResponse(Response):
    """A response that runs ``cleanup`` once it is sent, or the client went away, or sending it failed."""

    def __init__(self, response: Response, cleanup: Callable[[], Awaitable[None]]) -> None:
        super().__init__(status_code=response.status_code)
        self.response = response
        self.cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            await self.cleanup()


def create_app(agent: GeoAgent, options: WebOptions, startup: Startup | None = None) -> Starlette:
    """The app over ``agent`` (its owner preflights and closes it); ``startup`` says when its models are ready
    (None: they are already)."""
    startup = startup or Startup(ready=True)
    photos = asyncio.Semaphore(agent.photos_in_flight())
    security_headers = {
        "Content-Security-Policy": (
            f"default-src 'self'; img-src 'self' data: blob: {tile_source(options.tiles)}; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers=security_headers)

    async def page_config(request: Request) -> Response:
        return JSONResponse({
            "version": __version__, "strategy": agent.settings.agent.strategy, "field": "photo",
            "max_upload_bytes": options.max_upload_bytes, "tiles": options.tiles, "attribution": TILES_ATTRIBUTION,
            "model_servers": agent.pool.server_status_json(),
        })  # fmt: skip

    async def status(request: Request) -> Response:
        """``GET /api/status``: loading models, ready, or failed, and each model server's state (down since when,
        back since when): the page polls it, to say when the model server is down and when it is back."""
        body = {**startup.status.model_dump(), "model_servers": agent.pool.server_status_json()}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def locate(upload: Upload, explain: bool, on_event: OnEvent | None = None) -> LocateResult:
        await startup.wait()  # a photo sent while the models load waits for them
        async with photos:
            result = await agent.locate(upload.path, explain=explain, on_event=on_event)
        return result.model_copy(update={"image": upload.name})

    async def locate_json(request: Request) -> Response:
        """``POST /api/locate``: the ``locate --json`` object (``?explain=true``: with its trace)."""
        explain = _flag(request, "explain")
        async with upload_folder() as folder:
            upload = await receive_photo(request, folder, options.max_upload_bytes)
            try:
                result = await locate(upload, explain)
            except GeoAgentError as exc:
                return _error(_failure_status(exc), _public(str(exc), upload))
        return Response(result_json(result, explain=explain), media_type="application/json")

    async def locate_stream(request: Request) -> Response:
        """``POST /api/locate/stream``: the agent's steps as server-sent events, then ``map`` (the answer's
        :class:`~geoagent.maps.data.MapData`, which the page draws) and ``result`` (or ``error``)."""
        explain = _flag(request, "explain")
        folder_kept = AsyncExitStack()  # the folder outlives this handler: the stream removes it when it ends
        folder = await folder_kept.enter_async_context(upload_folder())
        try:
            upload = await receive_photo(request, folder, options.max_upload_bytes)
        except BaseException:
            await folder_kept.aclose()
            raise
        stream = EventSourceResponse(_events(upload, explain), ping=SSE_PING_S, headers={"Cache-Control": "no-store"})
        return _CleanupResponse(stream, folder_kept.aclose)

    async def _events(upload: Upload, explain: bool) -> AsyncIterator[dict[str, str]]:
        queue: asyncio.Queue[AgentEvent] = asyncio.Queue()
        task = asyncio.create_task(locate(upload, explain, queue.put_nowait))
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait((getter, task), return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                event = getter.result()
                if not isinstance(event, Done):  # the result goes out below, as the API shows it
                    yield {"event": event.kind, "data": event.model_dump_json()}
            while not queue.empty():
                event = queue.get_nowait()
                if not isinstance(event, Done):
                    yield {"event": event.kind, "data": event.model_dump_json()}
            try:
                result = task.result()
            except GeoAgentError as exc:
                yield {"event": "error", "data": json.dumps({"error": _public(str(exc), upload), "status": _failure_status(exc)})}
                return
            # Reference thumbnails are read from disk: off the event loop.
            drawn = await asyncio.to_thread(locate_map_data, [result], title=MAP_TITLE)
            yield {"event": "map", "data": drawn.model_dump_json()}
            yield {"event": "result", "data": result_json(result, explain=explain)}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def upload_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, UploadError)
        return _error(exc.status, exc.message)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, exc.detail)

    # Host, cross-site and token checks on every request, before any route (the page's files included).
    middleware = [Middleware(Guard, access=options.access or Access.plan(options.host))]
    return Starlette(
        routes=[
            Route("/", page),
            Route("/api/config", page_config),
            Route("/api/status", status),
            Route("/api/locate", locate_json, methods=["POST"]),
            Route("/api/locate/stream", locate_stream, methods=["POST"]),
            Mount("/static/maps", StaticFiles(directory=MAP_STATIC_DIR)),
            Mount("/static", StaticFiles(directory=STATIC_DIR)),
        ],
        middleware=middleware,
        exception_handlers={UploadError: upload_error, HTTPException: http_error},
    )


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")
