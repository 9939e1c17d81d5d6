"""Batch engines: how a batch's photos become outcomes. ``--engine NAME`` loads ``geoagent.batch.engines.NAME``,
whose ``Engine`` class implements :class:`BaseEngine`; a new engine (Ray, say) is one module here.

The runner owns everything else (reading INPUT, the journal, resume, output formats, progress): an engine
takes photos lazily, keeps a bounded number in flight, and hands back each outcome as it finishes.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from geoagent.errors import ConfigError

if TYPE_CHECKING:
    from geoagent.agent.controller import Readiness
    from geoagent.batch.inputs import BatchItem
    from geoagent.config import Settings
    from geoagent.errors import GeoAgentError
    from geoagent.types import LocateResult
    from geoagent.vlm import CallStats

DEFAULT_ENGINE = "local"

Outcome = tuple["BatchItem", "LocateResult | GeoAgentError"]


class BaseEngine(ABC):
    """Locates a stream of photos. Use as ``async with Engine(settings) as engine:``."""

    def __init__(self, settings: Settings, *, explain: bool = False) -> None:
        self.settings = settings
        self.explain = explain

    async def __aenter__(self) -> BaseEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @abstractmethod
    async def preflight(self) -> Readiness:
        """What would fail every photo (weights, servers, keys), found before the first one."""

    @abstractmethod
    def run(self, items: AsyncIterator[BatchItem]) -> AsyncIterator[Outcome]:
        """Each item's outcome as it finishes (any order), a bounded number of photos in flight, ``items``
        pulled only as slots free up. A photo that fails yields its error and the rest go on.

        Raises RunStopped, after yielding what finished, when the rest would fail the same way
        (:class:`~geoagent.agent.controller.RunGuard`); photos cut short are not yielded (a rerun does them).
        """

    @abstractmethod
    def totals(self) -> CallStats:
        """The VLM questions asked so far (requests sent, cache hits), for the progress bar."""

    async def aclose(self) -> None:
        """Release connections, workers, clusters."""


def engine_names() -> list[str]:
    return sorted(module.name for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_"))


def load_engine(name: str) -> type[BaseEngine]:
    """The engine class named ``name``; a ConfigError naming the engines there are otherwise."""
    names = engine_names()
    if name not in names:
        raise ConfigError(f"--engine: no engine '{name}' (available: {', '.join(names)})")
    engine: type[BaseEngine] = importlib.import_module(f"{__name__}.{name}").Engine
    return engine
