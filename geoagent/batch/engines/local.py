"""The local engine: one process, asyncio, the photos in flight that the backends' request slots keep busy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from geoagent.agent.controller import GeoAgent, Readiness, RunGuard
from geoagent.batch.engines import BaseEngine, Outcome
from geoagent.batch.inputs import BatchItem
from geoagent.config import Settings
from geoagent.errors import GeoAgentError, RunStopped
from geoagent.types import LocateResult
from geoagent.vlm import CallStats


class Engine(BaseEngine):
    """``GeoAgent.locate`` over a stream: at most ``GeoAgent.photos_in_flight()`` photos at once, each yielded
    the moment it finishes, the next one read only when a slot frees (memory stays flat however long INPUT)."""

    def __init__(self, settings: Settings, *, explain: bool = False, agent: GeoAgent | None = None) -> None:
        super().__init__(settings, explain=explain)
        self.agent = agent or GeoAgent(settings)

    async def preflight(self) -> Readiness:
        return await self.agent.preflight()

    def totals(self) -> CallStats:
        return self.agent.pool.totals()

    async def aclose(self) -> None:
        await self.agent.aclose()

    async def _one(self, item: BatchItem) -> tuple[BatchItem, LocateResult | GeoAgentError]:
        assert item.path is not None  # items with a problem never reach an engine
        try:
            return item, await self.agent.locate(item.path, explain=self.explain)
        except GeoAgentError as exc:
            return item, exc

    async def run(self, items: AsyncIterator[BatchItem]) -> AsyncIterator[Outcome]:
        slots = self.agent.photos_in_flight()
        guard = RunGuard()
        running: set[asyncio.Task[tuple[BatchItem, LocateResult | GeoAgentError]]] = set()
        more = True
        stop: str | None = None
        try:
            while True:
                while more and stop is None and len(running) < slots:
                    try:
                        item = await anext(items)
                    except StopAsyncIteration:
                        more = False
                    else:
                        running.add(asyncio.create_task(self._one(item)))
                if not running or stop is not None:
                    break
                finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    item, outcome = task.result()
                    stop = stop or guard.stop_reason(outcome)
                    if guard.keeps(outcome):
                        yield item, outcome
            if stop is not None:
                raise RunStopped(stop)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
