"""The servers of one backend profile: least-outstanding routing, take-out, and half-open probing.

A profile names one server or several (``base_url = [...]``, ``[[backends.NAME.servers]]``) of the same model;
a backend talks to one of them. Each server has a :class:`Breaker`, the one mechanism for a server that stops
answering: a refused connection (or, with several servers, ``take_out_after`` failures in a row) takes it
out; after a backoff one question is let through as a probe (half-open); its success puts the server back
for everyone, its failure doubles the backoff. While every server is out, questions wait for a probe to
succeed while the outage is younger than ``outage_wait_s`` (servers that were up before: an Ollama restart);
after that, or when no server has answered since the start, they fail at once, except one that finds a probe
due (it makes it) or in flight (it waits for its answer). A refused connection sent nothing, so failing over
from it costs no request of the question's budget; a request that was sent and failed is the client's to
retry (the one retry layer).
"""

from __future__ import annotations

import asyncio
import copy
import random
import time
from contextlib import AbstractAsyncContextManager, suppress
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from geoagent.errors import BackendError, ConfigError, GeoAgentError, UnreachableError
from geoagent.vlm.backend import Health, TransientError, VLMBackend, create_backend
from geoagent.vlm.types import ChatRequest, Completion

if TYPE_CHECKING:
    from geoagent.config import BackendProfile

PROBE_JITTER = 0.2  # probes of many processes (a Ray cluster) after one outage spread over +-20% of the backoff


class ServerStatus(BaseModel):
    """One server as a page or a health check shows it."""

    url: str
    up: bool = Field(description="In service (false: taken out, probed again with backoff).")
    problem: str | None = Field(default=None, description="Why it was taken out.")
    down_since: datetime | None = Field(default=None, description="When it was taken out (UTC).")
    back_since: datetime | None = Field(default=None, description="When it last came back after being taken out (UTC).")
    in_flight: int = 0
    answered: int = 0


def _utc(stamp: float | None) -> datetime | None:
    return datetime.fromtimestamp(stamp, timezone.utc) if stamp is not None else None


class Breaker:
    """Whether one server is in service; when out, when it may be probed again."""

    def __init__(self, backoff_s: float, backoff_max_s: float) -> None:
        self.error: GeoAgentError | None = None  # why the server is out; None: in service
        self.retry_at = 0.0  # monotonic time from which one question may probe it
        self.probing = False
        self.patient = True  # questions wait for it to come back (False: down since the start)
        self.down_since: float | None = None
        self.down_at = 0.0  # monotonic time it went out
        self.back_since: float | None = None
        self._initial, self._maximum = backoff_s, backoff_max_s
        self._delay = backoff_s

    @property
    def out(self) -> bool:
        return self.error is not None

    def due(self, now: float) -> bool:
        return self.out and not self.probing and now >= self.retry_at

    def trip(self, error: GeoAgentError, *, probe: bool, patient: bool) -> None:
        """Take the server out (the first failure), or after a failed ``probe`` wait longer before the next."""
        if self.out and not probe:
            return  # a request sent before it went out failed too: the backoff already runs
        if self.out:
            self._delay = min(self._delay * 2, self._maximum)
        else:
            self._delay, self.down_since, self.down_at, self.patient = self._initial, time.time(), time.monotonic(), patient
        self.error, self.probing = error, False
        self.retry_at = time.monotonic() + self._delay * random.uniform(1 - PROBE_JITTER, 1 + PROBE_JITTER)

    def reset(self) -> bool:
        """Back in service; True when it was out."""
        if self.error is None:
            return False
        self.error, self.probing, self.back_since = None, False, time.time()
        return True


class Server:
    """One server of a profile: its backend, its request slots, and how it has fared."""

    def __init__(self, name: str, profile: BackendProfile, slots: int) -> None:
        self.backend: VLMBackend = create_backend(name, profile)
        self.slots = slots
        #: Requests in flight here at once: any async context manager (the Ray engine puts a cluster-wide one
        #: here, so the limit holds across workers).
        self.limit: AbstractAsyncContextManager[Any] = asyncio.Semaphore(slots)
        self.breaker = Breaker(profile.probe_backoff_s, profile.probe_backoff_max_s)
        self.outstanding = 0  # questions routed here and not yet done (waiting for a slot included)
        self.answered = 0
        self.failures_in_a_row = 0
        self.seen_up = False  # answered a request or a check in this process

    @property
    def url(self) -> str:
        return self.backend.url

    def status(self) -> ServerStatus:
        b = self.breaker
        return ServerStatus(
            url=self.url, up=not b.out, problem=str(b.error) if b.error else None, down_since=_utc(b.down_since) if b.out else None,
            back_since=_utc(b.back_since), in_flight=self.outstanding, answered=self.answered,
        )  # fmt: skip


class ServerPool:
    """The servers of one profile, and the choice of one per request."""

    def __init__(self, name: str, profile: BackendProfile) -> None:
        self.name = name
        self.profile = profile
        self.servers = [Server(name, profile.for_server(url, slots), slots) for url, slots in profile.server_list()]
        self._changed = asyncio.Event()

    # --- sending ------------------------------------------------------------------------------------

    async def complete(self, request: ChatRequest, tried: list[Server]) -> Completion:
        """One request, on the server in service with the fewest outstanding requests per slot (not the one
        that failed this question last, ``tried[-1]``, while another serves). A refused connection takes its
        server out and the request goes to another, or waits for one to come back; raises UnreachableError
        when none does in time. Other failures are raised (a TransientError for the client to retry)."""
        while True:
            server, probe = await self._lease(tried[-1] if tried else None)
            tried.append(server)
            server.outstanding += 1
            try:
                async with server.limit:
                    completion = await server.backend.complete(request)
            except UnreachableError as exc:
                self.take_out(server, exc, probe=probe)
                continue
            except TransientError as exc:
                server.failures_in_a_row += 1
                if probe or (len(self.servers) > 1 and server.failures_in_a_row >= self.profile.take_out_after):
                    failure = BackendError(f"backend '{self.name}': {server.url}: {server.failures_in_a_row} failures in a row, last: {exc}")
                    self.take_out(server, failure, probe=probe)
                raise
            except BackendError:
                self.in_service(server)  # it answered: up, though it refused this question
                raise
            except BaseException:
                if probe:  # abandoned (cancelled): the next question probes instead
                    server.breaker.probing = False
                    self._notify()
                raise
            finally:
                server.outstanding -= 1
            server.answered += 1
            self.in_service(server)
            return completion

    async def _lease(self, avoid: Server | None) -> tuple[Server, bool]:
        """A server to send to, and whether the request is its probe. While every server is out it waits: for
        a probe in flight to tell, and while the outage is younger than ``outage_wait_s`` (servers that were
        up before), for the next probe; past that it gives up at once, but a question that finds a probe due
        still makes it, so the first question after the server is back is answered."""
        while True:
            now = time.monotonic()
            serving = [s for s in self.servers if not s.breaker.out]
            if serving:
                spare = len(serving) > 1
                return min(serving, key=lambda s: (spare and s is avoid, s.outstanding / s.slots, s.answered / s.slots)), False
            due = [s for s in self.servers if s.breaker.due(now)]
            if due:
                server = min(due, key=lambda s: s.breaker.retry_at)
                server.breaker.probing = True
                return server, True
            patient_until = max((s.breaker.down_at + self.profile.outage_wait_s for s in self.servers if s.breaker.patient), default=now)
            probing = any(s.breaker.probing for s in self.servers)
            if now >= patient_until and not probing:
                raise self._down_error()
            wake = min((s.breaker.retry_at for s in self.servers if not s.breaker.probing), default=patient_until)
            changed = self._changed
            with suppress(asyncio.TimeoutError):
                # past the patient time only a probe in flight is waited for: its answer wakes us
                timeout = None if now >= patient_until else max(0.0, min(wake, patient_until) - now)
                await asyncio.wait_for(changed.wait(), timeout)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _down_error(self) -> UnreachableError:
        out = [s for s in self.servers if s.breaker.error is not None]
        if len(out) == 1 and isinstance(out[0].breaker.error, UnreachableError):
            return copy.copy(out[0].breaker.error)  # a copy: each failed question carries its own stats
        reasons = "; ".join(str(s.breaker.error).removeprefix(f"backend '{self.name}': ") for s in out)
        return UnreachableError(f"backend '{self.name}': none of its {len(self.servers)} servers answers: {reasons}")

    # --- state --------------------------------------------------------------------------------------

    def take_out(self, server: Server, error: GeoAgentError, *, probe: bool = False) -> None:
        """Out of service until a probe succeeds; questions that find every server out wait if it was up before."""
        server.breaker.trip(error, probe=probe, patient=server.seen_up)
        self._notify()

    def in_service(self, server: Server) -> None:
        server.seen_up = True
        server.failures_in_a_row = 0
        if server.breaker.reset():
            self._notify()

    def status(self) -> list[ServerStatus]:
        return [server.status() for server in self.servers]

    # --- checks -------------------------------------------------------------------------------------

    async def check(self, *, probe_chat: bool = False) -> list[tuple[Server, Health | GeoAgentError]]:
        """Every server's check, at once; a server that passes is in service, an unreachable one is taken out."""

        async def one(server: Server) -> Health | GeoAgentError:
            try:
                health = await server.backend.check(probe_chat=probe_chat)
            except GeoAgentError as exc:
                if isinstance(exc, UnreachableError):
                    self.take_out(server, exc)
                return exc
            self.in_service(server)
            return health

        found = await asyncio.gather(*(one(server) for server in self.servers))
        return list(zip(self.servers, found))

    async def identity(self) -> str | None:
        """The model identity the servers in service report (None: none says); ConfigError when two differ,
        since their answers would share one cache key. Raises the first server's error when none can be asked."""
        serving = [s for s in self.servers if not s.breaker.out] or self.servers
        found = await asyncio.gather(*(s.backend.model_identity() for s in serving), return_exceptions=True)
        for outcome in found:
            if isinstance(outcome, BaseException) and not isinstance(outcome, GeoAgentError):
                raise outcome
        if all(isinstance(outcome, GeoAgentError) for outcome in found):
            raise found[0]  # type: ignore[misc]
        known = [(server, outcome) for server, outcome in zip(serving, found) if isinstance(outcome, str) and outcome]
        first, theirs = known[0] if known else (None, None)
        for server, other in known[1:]:
            if other != theirs:
                assert first is not None
                raise ConfigError(
                    f"backend '{self.name}': its servers serve different weights of {self.profile.model}: "
                    f"{first.url} reports {theirs}, {server.url} reports {other}; give every server of a profile the "
                    f"same model (the same pull or checkpoint), or make them two profiles"
                )
        return theirs

    async def aclose(self) -> None:
        await asyncio.gather(*(server.backend.aclose() for server in self.servers))
