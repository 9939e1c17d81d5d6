"""The Ray engine: the local engine's pipeline spread over a Ray cluster (``RAY_ADDRESS``, else a local one).

What runs where:

- the driver (this process) reads INPUT, keeps the journal (the runner's) and hands photos out;
- ``ray.data`` reads and embeds the photos in batches: ``map_batches`` with
  :class:`~geoagent.retrieval.ray_build.ClipEmbedder`, an actor holding the CLIP model (on a GPU when the
  cluster has one);
- :class:`LocateWorker` actors (async) run ``GeoAgent.locate`` on each embedded photo;
- one :class:`ProfileGate` actor per server of each backend profile holds that server's ``max_concurrency``
  slots: every worker's client takes a slot from it for each request to that server, so no server ever sees
  more in flight, however many workers;
- the response cache is the configured one, opened by every worker: on several nodes it must be a server
  every node reaches (``[cache] url = "redis://..."``); the preflight refuses an SQLite file there, and one on
  a network filesystem anywhere (SQLite's locking does not hold on one).

The preflight runs on every worker and reports each problem once, naming the workers (and their nodes) that
found it when not all did: a node that cannot see the index or the cache is found before the first photo.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import warnings
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from itertools import cycle
from typing import Any

import numpy as np

from geoagent.agent.controller import GeoAgent, Readiness, RunGuard
from geoagent.batch.engines import BaseEngine, Outcome
from geoagent.batch.inputs import BatchItem
from geoagent.config import Settings
from geoagent.errors import ConfigError, GeoAgentError, RunStopped
from geoagent.paths import display_path
from geoagent.retrieval.ray_build import ClipEmbedder, connect, count_from_env, ray_error  # a ConfigError without the extra
from geoagent.retrieval.retriever import Retriever
from geoagent.types import LocateResult
from geoagent.vlm import CallStats
from geoagent.vlm.cache import CacheWarning, sqlite_folder
from geoagent.vlm.cache.sqlite import NETWORK_FILESYSTEMS, cache_filesystem

import ray  # after ray_build, which says how to install it when it is missing
import ray.data
import ray.util

WORKERS_ENV = "GEOAGENT_RAY_WORKERS"  # how many LocateWorker actors (default: one per CPU of the cluster)
EMBED_BATCH = 32  # photos per map_batches call of the CLIP actor
EMBED_CHUNK = 256  # photos read from INPUT per ray.data pass (each pass loads the CLIP model once)
GATE_MAX_WAITERS = 100_000  # calls one ProfileGate accepts at once (waiting for a slot is one of them)
#: What a LocateWorker reserves: a token of memory. Ray spreads only actors that reserve some resource (with
#: none, a 2-node cluster got both workers on one node in 7 runs of 8, ray-project/ray#27577; with this, all 24
#: runs of 2 or 4 workers used both). Memory, not a CPU share: a share keeps a 1-CPU node's CPU from the CLIP actor.
WORKER_MEMORY = 1 << 20


@ray.remote(num_cpus=0)
class ProfileGate:
    """One server's request slots, cluster-wide: ``acquire`` waits for one, ``release`` returns it."""

    def __init__(self, slots: int) -> None:
        self._slots = asyncio.Semaphore(slots)

    async def acquire(self) -> None:
        await self._slots.acquire()

    async def release(self) -> None:
        self._slots.release()


class ClusterSlot:
    """``async with`` a :class:`ProfileGate` slot: what a worker's ``Server.limit`` becomes."""

    def __init__(self, gate: Any) -> None:
        self._gate = gate

    async def __aenter__(self) -> None:
        acquired = asyncio.wrap_future(self._gate.acquire.remote().future())
        try:
            await asyncio.shield(acquired)
        except asyncio.CancelledError:  # the request was abandoned: hand the slot back once it is granted
            acquired.add_done_callback(self._release_if_granted)
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self._gate.release.remote()

    def _release_if_granted(self, acquired: asyncio.Future[None]) -> None:
        if not acquired.cancelled() and acquired.exception() is None:
            self._gate.release.remote()


@ray.remote(num_cpus=0, memory=WORKER_MEMORY, scheduling_strategy="SPREAD")
class LocateWorker:
    """``GeoAgent.locate`` on embedded photos, several at once; every request through its profile's gate."""

    def __init__(self, settings: Settings, gates: dict[str, list[Any]]) -> None:
        self.settings = settings
        self.agent = GeoAgent(settings)
        for name, server_gates in gates.items():
            for server, gate in zip(self.agent.pool.client(name).servers.servers, server_gates, strict=True):
                server.limit = ClusterSlot(gate)

    async def preflight(self) -> WorkerReport:
        """The agent's, on a retriever that loads no CLIP model (the photos come embedded by ray.data), with
        where this worker runs and the filesystem its SQLite cache folder would be on."""
        context = ray.get_runtime_context()
        folder = sqlite_folder(self.settings.cache) if self.settings.cache.enabled else None
        report = WorkerReport(
            Readiness(), context.get_node_id(), ray.util.get_node_ip_address(),
            await asyncio.to_thread(cache_filesystem, folder) if folder is not None else None,
        )
        try:
            retriever = await Retriever.load(self.settings.retrieval, defer_embedder=True)
        except GeoAgentError as exc:
            report.readiness.problems.append(exc)
            return report
        self.agent = GeoAgent(self.settings, retriever=retriever, pool=self.agent.pool)
        report.readiness = await self.agent.preflight()
        return report

    async def locate(
        self, path: str, vector: np.ndarray | None, explain: bool
    ) -> tuple[LocateResult | GeoAgentError, CallStats, str | None]:
        """The photo's outcome (an error is returned, not raised), this worker's VLM totals so far, and the line
        saying its cache stopped, if it did (a worker's own warnings never reach the user: the driver says it)."""
        try:
            outcome: LocateResult | GeoAgentError = await self.agent.locate(path, explain=explain, vector=vector)
        except GeoAgentError as exc:
            outcome = exc
        cache = self.agent.pool.cache
        stopped = cache.stopped_warning() if cache is not None and cache.stopped else None
        return outcome, self.agent.pool.totals(), stopped

    async def aclose(self) -> None:
        await self.agent.aclose()


@dataclass
class WorkerReport:
    """One worker's preflight and where it ran (``cache_fs``: the filesystem type of its SQLite cache folder)."""

    readiness: Readiness
    node: str
    address: str
    cache_fs: str | None


def merge_reports(reports: list[WorkerReport], settings: Settings) -> Readiness:
    """Every worker's problems and warnings, each once: as it is when every worker found it, else prefixed
    with the workers (and nodes) that did. Then the cache's fitness for the cluster: an SQLite file is refused
    on a network filesystem or when the workers span several nodes (each would write its own file)."""
    merged = Readiness()
    found: dict[tuple[type, str], tuple[GeoAgentError | str, list[int]]] = {}
    for number, report in enumerate(reports, 1):
        for item in [*report.readiness.problems, *report.readiness.warnings]:
            found.setdefault((type(item), str(item)), (item, []))[1].append(number)
    for item, numbers in found.values():
        where = "" if len(numbers) == len(reports) else f"{_workers(numbers, reports)}: "
        if isinstance(item, str):
            merged.warnings.append(where + item)
        else:
            named = copy.copy(item)
            named.args = (where + str(item),)
            merged.problems.append(named)
    folder = sqlite_folder(settings.cache) if settings.cache.enabled else None
    if folder is None:
        return merged
    fix = 'set [cache] url = "redis://HOST:6379/0" to a Redis server every node reaches (or run without --engine ray)'
    network = [number for number, report in enumerate(reports, 1) if report.cache_fs in NETWORK_FILESYSTEMS]
    nodes = sorted({report.node for report in reports})
    if network:
        kind = reports[network[0] - 1].cache_fs
        merged.problems.append(ConfigError(
            f"the SQLite cache {display_path(folder)} is on a network filesystem ({kind}) for {_workers(network, reports)}, "
            f"where SQLite's locking does not hold; {fix}"
        ))
    elif len(nodes) > 1:
        merged.problems.append(ConfigError(
            f"the SQLite cache {display_path(folder)} is not one file on every node: this run's workers are on {len(nodes)} nodes "
            f"({', '.join(_node(n) for n in nodes)}), each would keep its own; {fix}"
        ))
    return merged


def _node(node: str) -> str:
    return node[:12]


def _workers(numbers: list[int], reports: list[WorkerReport]) -> str:
    """``worker 2 of 3 (node 0123456789ab at 10.0.0.2)``, or several of them."""
    places = sorted({f"node {_node(reports[n - 1].node)} at {reports[n - 1].address}" for n in numbers})
    label = "worker" if len(numbers) == 1 else "workers"
    return f"{label} {', '.join(map(str, numbers))} of {len(reports)} ({'; '.join(places)})"


def worker_count(resources: dict[str, float]) -> int:
    """``GEOAGENT_RAY_WORKERS``, else one worker per CPU of the cluster."""
    return count_from_env(WORKERS_ENV, max(1, int(resources.get("CPU", 1))))


class Engine(BaseEngine):
    """The batch on Ray: ``ray.data`` embeds INPUT chunk by chunk, :class:`LocateWorker` actors locate, the
    driver keeps at most ``GeoAgent.photos_in_flight()`` photos at the workers and one chunk embedded ahead."""

    def __init__(self, settings: Settings, *, explain: bool = False) -> None:
        super().__init__(settings, explain=explain)
        self.slots = GeoAgent(settings).photos_in_flight()
        self.gates: dict[str, list[Any]] = {}
        self.workers: list[Any] = []
        self.gpus_per_embedder = 0
        self._totals: dict[int, CallStats] = {}

    async def __aenter__(self) -> Engine:
        await asyncio.to_thread(self._start)  # joining or starting a cluster takes seconds
        return self

    def _start(self) -> None:
        """Join the cluster; start the gates and the workers."""
        connect()
        resources = ray.cluster_resources()
        self.gates = {
            name: [
                ProfileGate.options(max_concurrency=GATE_MAX_WAITERS).remote(slots)
                for _, slots in self.settings.backends[name].server_list()
            ]
            for name in self.settings.routed_profiles()
        }
        self.workers = [
            LocateWorker.options(max_concurrency=self.slots).remote(self.settings, self.gates)
            for _ in range(worker_count(resources))
        ]
        self.gpus_per_embedder = 1 if resources.get("GPU", 0) else 0

    async def preflight(self) -> Readiness:
        """Each worker's (they load their index and check the servers now, not on their first photo)."""
        try:
            found = await asyncio.gather(*(_awaitable(worker.preflight.remote()) for worker in self.workers))
        except ray.exceptions.RayError as exc:
            return Readiness(problems=[ConfigError(f"the Ray workers could not start: {_first_line(exc)}")])
        return merge_reports(found, self.settings)

    def totals(self) -> CallStats:
        return sum(self._totals.values(), CallStats())

    async def aclose(self) -> None:
        await asyncio.gather(*(_awaitable(worker.aclose.remote()) for worker in self.workers), return_exceptions=True)
        for actor in [*self.workers, *(gate for gates in self.gates.values() for gate in gates)]:
            ray.kill(actor)

    def _embed_sync(self, paths: list[str]) -> list[dict[str, Any]]:
        """One ray.data pass: the photos read and embedded in batches by the CLIP actor."""
        dataset = ray.data.from_items([{"path": path} for path in paths]).map_batches(
            ClipEmbedder,
            fn_constructor_kwargs={"retrieval": self.settings.retrieval},
            batch_size=EMBED_BATCH,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_gpus=self.gpus_per_embedder,
        )
        return dataset.take_all()

    async def _next_chunk(self, items: AsyncIterator[BatchItem]) -> list[tuple[BatchItem, np.ndarray | None]]:
        """Up to ``EMBED_CHUNK`` items of INPUT with their vectors (None: the photo could not be opened)."""
        chunk: list[BatchItem] = []
        async for item in items:
            assert item.path is not None  # items with a problem never reach an engine
            chunk.append(item)
            if len(chunk) == EMBED_CHUNK:
                break
        if not chunk:
            return []
        rows = await asyncio.to_thread(self._embed_sync, [str(item.path) for item in chunk])
        vectors = {str(row["path"]): row["vector"] if row["embedded"] else None for row in rows}
        return [(item, vectors[str(item.path)]) for item in chunk]

    async def run(self, items: AsyncIterator[BatchItem]) -> AsyncIterator[Outcome]:
        guard = RunGuard()
        told_cache_stopped = False
        workers = cycle(range(len(self.workers)))
        ready: deque[tuple[BatchItem, np.ndarray | None]] = deque()
        running: dict[asyncio.Future[Any], tuple[BatchItem, int]] = {}
        embedding: asyncio.Task[list[tuple[BatchItem, np.ndarray | None]]] | None = None
        more = True
        stop: str | None = None
        try:
            while stop is None:
                if more and embedding is None and len(ready) < self.slots:
                    embedding = asyncio.create_task(self._next_chunk(items))
                while ready and len(running) < self.slots:
                    item, vector = ready.popleft()
                    index = next(workers)
                    call = self.workers[index].locate.remote(str(item.path), vector, self.explain)
                    running[_awaitable(call)] = (item, index)
                waiting: set[asyncio.Future[Any]] = set(running) | ({embedding} if embedding is not None else set())
                if not waiting:
                    break
                finished, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for done in finished:
                    try:
                        if done is embedding:
                            chunk = embedding.result()
                            more = len(chunk) == EMBED_CHUNK
                            ready.extend(chunk)
                            embedding = None
                            continue
                        item, index = running.pop(done)
                        outcome, self._totals[index], cache_stopped = done.result()
                        if cache_stopped is not None and not told_cache_stopped:
                            told_cache_stopped = True  # once per run, however many workers lost the cache
                            warnings.warn(CacheWarning(cache_stopped), stacklevel=1)
                    except ray.exceptions.RayError as exc:  # a worker or the CLIP actor died: a rerun resumes
                        stop = stop or f"stopped: {ray_error(exc)}"
                        continue
                    stop = stop or guard.stop_reason(outcome)
                    if guard.keeps(outcome):
                        yield item, outcome
            if stop is not None:
                raise RunStopped(stop)
        finally:
            for pending in [*running, *([embedding] if embedding is not None else [])]:
                pending.cancel()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _awaitable(ref: Any) -> asyncio.Future[Any]:
    """A Ray ObjectRef as an asyncio future of this loop."""
    future: concurrent.futures.Future[Any] = ref.future()
    return asyncio.wrap_future(future)
