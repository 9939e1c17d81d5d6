"""The response cache's interface: what every store (SQLite, Redis) provides, and what a run does when one fails.

Two kinds of use, two ways to fail:

- a *run* (locate, batch, serve) reads and writes answers: when the store fails mid-run (Redis gone, an
  SQLite error), the run goes on without caching, with one warning; answers are still used and what was
  written stays written;
- *administration* (the preflight's check, ``cache stats|clear|copy``) raises :class:`CacheError`: one line
  naming the store and the fix, exit 2.

Lookups are coalesced: every ``get`` issued in one turn of the event loop (a tournament round's matches, a
photo's questions started together) is answered by one ``get_many``, one round trip to the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from pydantic import BaseModel

from geoagent.errors import CacheError
from geoagent.vlm.types import Usage

#: Keys per round trip of a lookup or a copy (SQLite binds at most 32766 variables; Redis is happy either way).
BATCH = 500


class CachedAnswer(BaseModel):
    answer: dict[str, Any]
    usage: Usage


class StoredEntry(BaseModel):
    """One cached answer as stored, with what stats group it by: what ``cache copy`` moves."""

    key: str
    kind: str
    model: str
    task: str
    answer: dict[str, Any]
    usage: Usage
    created: float


class StoredIdentity(BaseModel):
    """The model identity (an Ollama digest, say) a server last reported, kept for while it is down."""

    kind: str
    url: str
    model: str
    identity: str
    seen: float


class CacheStats(BaseModel):
    path: str
    entries: int
    size_bytes: int
    by_task: dict[str, int]
    by_model: dict[str, int]


class CacheWarning(UserWarning):
    """The cache failed mid-run: the run goes on without it."""


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 over a canonical JSON rendering of everything that determines an answer (the same in every store)."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def expired(created: float, ttl_s: int | None, now: float | None = None) -> bool:
    return ttl_s is not None and created < (now if now is not None else time.time()) - ttl_s


class ResponseCache(ABC):
    """Answers keyed by request content. Subclasses implement the ``_``-methods; this class coalesces lookups
    and turns the store's failures (``failures``) into a degraded run or a :class:`CacheError`."""

    #: Where the answers are, for messages: a file path, or a URL without credentials.
    label: str
    #: The store's own exceptions: a failure of the store, never a bug to show as a traceback.
    failures: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, ttl_s: int | None = None) -> None:
        self.ttl_s = ttl_s
        #: Set once the store failed in this run: every later read misses and every write is skipped.
        self.stopped: str | None = None
        #: Set once the store answered in this run: a failure after that is a lost store, not a wrong address.
        self.reached = False
        #: Round trips made by lookups (one per coalesced batch): what pipelining saves, shown by tests.
        self.lookups = 0
        self._waiting: dict[str, list[asyncio.Future[CachedAnswer | None]]] = {}
        self._flushing: set[asyncio.Task[None]] = set()

    # --- a run: failures degrade to no caching --------------------------------------------------------------

    async def get(self, key: str) -> CachedAnswer | None:
        """The answer cached under ``key``; lookups started in the same loop turn share one round trip."""
        if self.stopped:
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[CachedAnswer | None] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._flush)
        self._waiting.setdefault(key, []).append(future)
        return await future

    def _flush(self) -> None:
        batch, self._waiting = self._waiting, {}
        task = asyncio.ensure_future(self._answer(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _answer(self, batch: dict[str, list[asyncio.Future[CachedAnswer | None]]]) -> None:
        try:
            found = await self.get_many(list(batch))
        except BaseException as exc:  # a bug (or cancellation): every waiting asker sees it
            for futures in batch.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
            raise
        for key, futures in batch.items():
            for future in futures:
                if not future.done():
                    future.set_result(found.get(key))

    async def get_many(self, keys: Sequence[str]) -> dict[str, CachedAnswer]:
        """The answers cached under ``keys`` (absent: not cached), one round trip per ``BATCH`` keys."""
        found: dict[str, CachedAnswer] = {}
        for start in range(0, len(keys), BATCH):
            if self.stopped:
                break
            self.lookups += 1
            found.update(await self._guarded(self._get_many(keys[start : start + BATCH]), {}))
        return found

    async def put(self, key: str, *, kind: str, model: str, task: str, entry: CachedAnswer) -> None:
        if not self.stopped:
            stored = StoredEntry(key=key, kind=kind, model=model, task=task, answer=entry.answer, usage=entry.usage, created=time.time())
            await self._guarded(self._put([stored]), None)

    async def has_answers(self, kind: str, model: str) -> bool:
        """Whether any answer of this backend kind and model is cached (a down server may still be enough)."""
        return False if self.stopped else bool(await self._guarded(self._has_answers(kind, model), False))

    async def identity(self, kind: str, url: str, model: str) -> str | None:
        """The model identity last seen at ``url``, for keying answers while its server is down."""
        return None if self.stopped else await self._guarded(self._identity(kind, url, model), None)

    async def remember_identity(self, kind: str, url: str, model: str, identity: str) -> None:
        if not self.stopped:
            await self._guarded(self._put_identities([StoredIdentity(kind=kind, url=url, model=model, identity=identity, seen=time.time())]), None)

    async def _guarded(self, work: Any, fallback: Any) -> Any:
        try:
            result = await work
        except (*self.failures, CacheError) as exc:
            self.stop(exc)
            return fallback
        self.reached = True
        return result

    def stop(self, exc: BaseException, *, quiet: bool = False) -> None:
        """Stop caching for the rest of the run; the first time, say so (unless ``quiet``: already reported)."""
        if self.stopped is None:
            self.stopped = self.problem(exc)
            if not quiet:
                warnings.warn(CacheWarning(self.stopped_warning()), stacklevel=2)

    def stopped_warning(self) -> str:
        """The one line that says caching stopped (the Ray driver says it for its workers, whose output it hides)."""
        return (
            f"cache {self.label}: {self.stopped}; caching stopped for the rest of this run "
            "(answers are still used; what was cached stays cached)"
        )

    # --- administration: failures are one-line CacheErrors ------------------------------------------------

    async def check(self) -> None:
        """Open the store and read from it: a CacheError naming it and the fix when it cannot be used.

        A failed check also stops caching quietly (the preflight reports it; no warning follows it)."""
        try:
            await self._admin(self._check())
        except CacheError as exc:
            self.stop(exc, quiet=True)
            raise

    async def stats(self) -> CacheStats:
        return await self._admin(self._stats())  # type: ignore[no-any-return]

    async def clear(self) -> int:
        """Delete every answer (model identities stay); returns how many there were."""
        return await self._admin(self._clear())  # type: ignore[no-any-return]

    async def entries(self) -> AsyncIterator[list[StoredEntry]]:
        """Every answer, in batches."""
        batches = self._entries()
        while True:
            try:
                batch = await self._admin(anext(batches))
            except StopAsyncIteration:
                return
            yield batch

    async def identities(self) -> list[StoredIdentity]:
        return await self._admin(self._identities())  # type: ignore[no-any-return]

    async def add(self, entries: Iterable[StoredEntry] = (), identities: Iterable[StoredIdentity] = ()) -> None:
        """Store entries as they are (their ``created`` kept: a TTL counts from the first answer)."""
        kept = [entry for entry in entries if not expired(entry.created, self.ttl_s)]
        if kept:
            await self._admin(self._put(kept))
        if identities := list(identities):
            await self._admin(self._put_identities(identities))

    async def _admin(self, work: Any) -> Any:
        try:
            result = await work
        except self.failures as exc:
            raise CacheError(f"cache {self.label}: {self.problem(exc)}") from None
        self.reached = True
        return result

    def problem(self, exc: BaseException) -> str:
        """One line saying what went wrong and what to do; subclasses name their own fixes."""
        if isinstance(exc, CacheError):
            return str(exc).removeprefix(f"cache {self.label}: ")
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]

    async def aclose(self) -> None:
        for task in list(self._flushing):
            task.cancel()
        await self._aclose()

    # --- what a store implements ------------------------------------------------------------------------

    @abstractmethod
    async def _check(self) -> None: ...

    @abstractmethod
    async def _get_many(self, keys: Sequence[str]) -> dict[str, CachedAnswer]: ...

    @abstractmethod
    async def _put(self, entries: list[StoredEntry]) -> None: ...

    @abstractmethod
    async def _has_answers(self, kind: str, model: str) -> bool: ...

    @abstractmethod
    async def _identity(self, kind: str, url: str, model: str) -> str | None: ...

    @abstractmethod
    async def _put_identities(self, identities: list[StoredIdentity]) -> None: ...

    @abstractmethod
    async def _identities(self) -> list[StoredIdentity]: ...

    @abstractmethod
    async def _stats(self) -> CacheStats: ...

    @abstractmethod
    async def _clear(self) -> int: ...

    @abstractmethod
    def _entries(self) -> AsyncIterator[list[StoredEntry]]: ...

    @abstractmethod
    async def _aclose(self) -> None: ...
