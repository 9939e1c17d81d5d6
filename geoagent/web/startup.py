"""Where ``geoagent serve`` is in its start: the page is served at once, the models load behind it.

The server listens (and says its URL) before the preflight loads CLIP and asks the backends; ``/api/status`` tells
the page "loading models…", then "ready" (or what failed), and photos sent meanwhile wait for the models.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import BaseModel

from geoagent.errors import GeoAgentError

LOADING = "loading models…"


class StartupStatus(BaseModel):
    """What ``GET /api/status`` answers."""

    state: Literal["loading", "ready", "failed"]
    message: str


class NotReady(GeoAgentError):
    """The models could not be made ready: the server is stopping (the message says why)."""

    exit_code = 2


class Startup:
    """The start's state, set once by the server and awaited by the requests that need the models."""

    def __init__(self, *, ready: bool = False) -> None:
        self.status = StartupStatus(state="ready", message="ready") if ready else StartupStatus(state="loading", message=LOADING)
        self._settled = asyncio.Event()
        if ready:
            self._settled.set()

    def ready(self) -> None:
        self.status = StartupStatus(state="ready", message="ready")
        self._settled.set()

    def failed(self, problems: list[str]) -> None:
        self.status = StartupStatus(state="failed", message="; ".join(problems) or "the models could not be loaded")
        self._settled.set()

    async def wait(self) -> None:
        """Return once the models are ready; NotReady if they never will be."""
        await self._settled.wait()
        if self.status.state != "ready":
            raise NotReady(f"the server could not start: {self.status.message}")
