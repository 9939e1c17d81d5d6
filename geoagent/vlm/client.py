"""Ask a VLM a question and get a validated answer: cache -> retry -> server pool (routing, each server's
concurrency limit, take-out and probing: :mod:`geoagent.vlm.pool`) -> backend.

This is the only retry layer in GeoAgent; the clients' own retries are turned off in the backends. A question
costs at most ``1 + max_retries`` requests, its repair re-ask included; a refused connection sends nothing and
costs none (the pool fails over from it, or waits for a server to come back).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from geoagent.errors import AnswerError, BackendError, ConfigError, GeoAgentError, UnreachableError
from geoagent.vlm.backend import Health, TransientError, VLMBackend
from geoagent.vlm.cache import CachedAnswer, ResponseCache, cache_key, open_cache
from geoagent.vlm.parsing import AnswerParseError, AnswerT, parse_answer
from geoagent.vlm.pool import Server, ServerPool, ServerStatus
from geoagent.vlm.pricing import Price, price_for
from geoagent.vlm.types import Answer, CallStats, ChatMessage, ChatRequest, Completion, EncodedImage
from geoagent.words import count

if TYPE_CHECKING:
    from geoagent.config import BackendProfile, Settings

REPAIR_PROMPT = (
    "Your previous reply could not be used: {error}. Reply again with only one JSON object that follows "
    "this JSON schema, and nothing else:\n{schema}"
)

#: Failures another attempt may fix. A refused connection is not among them: the server pool fails over from it,
#: or waits for a server to come back (it sent nothing, so it costs no attempt).
RETRYABLE = (TransientError,)


class _WaitRetryAfter:
    """Exponential backoff with jitter, but never shorter than the server's Retry-After, itself capped.

    The cap matters: a server asking for an hour would otherwise stall the run (the openai SDK caps it too).
    """

    def __init__(self, initial: float, maximum: float, retry_after_max: float) -> None:
        self._backoff = wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial)
        self._retry_after_max = retry_after_max

    def __call__(self, state: RetryCallState) -> float:
        wait = self._backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        return max(wait, min(retry_after, self._retry_after_max)) if retry_after is not None else wait


@functools.lru_cache(maxsize=64)
def _json_schema(schema: type[BaseModel]) -> dict[str, Any]:
    """An answer type's JSON schema, built once (pydantic builds it anew on every call). Read-only: shared."""
    return schema.model_json_schema()


@dataclass
class _Shared:
    """One request in flight and how many asks wait on it: the last one to give up cancels it."""

    task: asyncio.Task[Answer[Any]]
    waiting: int = 0


class VLMClient:
    """One backend profile: bounded concurrency, one retry layer, cache, answer repair and accounting."""

    def __init__(self, name: str, profile: BackendProfile, cache: ResponseCache | None = None) -> None:
        self.name = name
        self.profile = profile
        self.cache = cache
        #: The profile's servers (one, or several of the same model), each with its own request slots.
        self.servers = ServerPool(name, profile)
        self.totals = CallStats()
        self._inflight: dict[str, _Shared] = {}
        self._identity: asyncio.Future[str] | None = None
        self._identity_found: str | None = None
        self._price: Price | None = None
        self._priced = False

    @property
    def backend(self) -> VLMBackend:
        """The first server's backend (the only one, for a profile of one server)."""
        return self.servers.servers[0].backend

    async def check(self, *, probe_chat: bool = False) -> list[tuple[Server, Health | GeoAgentError]]:
        """Every server's check (see :meth:`ServerPool.check`)."""
        return await self.servers.check(probe_chat=probe_chat)

    def status(self) -> list[ServerStatus]:
        return self.servers.status()

    async def identity(self) -> str:
        """What the servers say the model is (an Ollama digest, say), so a re-pulled model misses the old answers;
        the same whichever server answers (servers that disagree are refused: ConfigError).

        Asked once, by a task every asker awaits: they all resume together, so their cache lookups share one
        round trip. While the servers are down, the identity last reported (kept in the cache) stands in.
        """
        if self._identity_found is not None:
            return self._identity_found
        if self._identity is None or self._identity.get_loop() is not asyncio.get_running_loop():
            self._identity = asyncio.ensure_future(self._find_identity())
        finding = self._identity
        try:
            self._identity_found = await asyncio.shield(finding)
        except BaseException:
            if finding.done() and (finding.cancelled() or finding.exception() is not None):
                self._identity = None  # the next question asks again
            raise
        return self._identity_found

    async def _find_identity(self) -> str:
        kind, url, model = self.profile.kind, self.backend.url, self.profile.model
        try:
            found = await self.servers.identity()
        except ConfigError:
            raise
        except GeoAgentError:
            found = await self.cache.identity(kind, url, model) if self.cache else None
        else:
            if found and self.cache is not None:
                await self.cache.remember_identity(kind, url, model, found)
        return found or ""

    async def price(self) -> Price | None:
        """The model's price per token (the profile's, else litellm's bundled table), None when unknown."""
        if not self._priced:
            self._price = await asyncio.to_thread(price_for, self.profile)  # the table is a 3 MB JSON file
            self._priced = True
        return self._price

    def key_for(self, request: ChatRequest, sample: int, identity: str = "") -> str:
        return cache_key(
            {
                "kind": self.profile.kind,
                "model": self.profile.model,
                **({"identity": identity} if identity else {}),
                "messages": [
                    {"role": m.role, "text": m.text, "images": [image.sha256 for image in m.images]}
                    for m in request.messages
                ],
                "schema": request.schema,
                "temperature": request.temperature,
                "seed": request.seed,
                "max_tokens": request.max_tokens,
                "sample": sample,
            }
        )

    async def ask(
        self,
        prompt: str,
        images: Sequence[EncodedImage],
        schema: type[AnswerT],
        *,
        task: str = "",
        sample: int = 0,
        system: str | None = None,
        prefix: Sequence[ChatMessage] = (),
    ) -> Answer[AnswerT]:
        """Ask one question about ``images`` (sent in order) and return an answer valid for ``schema``.

        ``prefix``: messages that open every question about the same photo, byte for byte (the instructions,
        then the query image), sent before the question's own; a provider's prefix cache reuses them.
        ``sample`` distinguishes repeated samples of the same question (self-consistency): each has its own
        seed and cache entry. Identical questions in flight at once share one request; cancelling one asker
        leaves the others waiting. Raises BackendError or AnswerError with a message fit for a user.
        """
        opening = ((ChatMessage("system", system),) if system else ()) + tuple(prefix)
        request = ChatRequest(
            messages=(*opening, ChatMessage("user", prompt, tuple(images))),
            schema_name=schema.__name__,
            schema=_json_schema(schema),
            temperature=self.profile.temperature,
            seed=self.profile.seed + sample,
            max_tokens=self.profile.max_tokens,
            prefix_messages=len(opening) if prefix else 0,
        )
        key = self.key_for(request, sample, await self.identity())
        shared = self._inflight.get(key)
        owner = shared is None
        if shared is None:
            shared = _Shared(asyncio.create_task(self._answer(key, request, schema, task or schema.__name__)))
            self._inflight[key] = shared
            shared.task.add_done_callback(lambda done: self._settled(key, done))
        shared.waiting += 1
        try:
            answer = await asyncio.shield(shared.task)
        except asyncio.CancelledError:
            if not shared.task.done():  # this asker was cancelled, not the request: others may still wait on it
                shared.waiting -= 1
                if shared.waiting == 0:
                    shared.task.cancel()
            raise
        if owner:
            return answer
        stats = CallStats(asks=1, cache_hits=1)
        self.totals.add(stats)
        return Answer[schema](value=answer.value, stats=stats, cached=True)  # type: ignore[valid-type]

    def _settled(self, key: str, done: asyncio.Task[Answer[Any]]) -> None:
        self._inflight.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here: every asker that still waits gets it from the task itself

    async def _answer(self, key: str, request: ChatRequest, schema: type[AnswerT], task: str) -> Answer[AnswerT]:
        stats = CallStats(asks=1)
        started = time.perf_counter()
        try:
            if self.cache is not None:
                hit = await self.cache.get(key)
                if hit is not None:
                    stats.cache_hits = 1
                    return Answer[schema](value=schema.model_validate(hit.answer), stats=stats, cached=True)  # type: ignore[valid-type]
            completion = await self._complete(request, stats)
            try:
                value = parse_answer(completion.text, schema)
            except AnswerParseError as first:
                stats.repairs += 1
                if stats.requests >= self._budget:
                    raise AnswerError(
                        f"backend '{self.name}' ({self.profile.model}): invalid {request.schema_name} answer "
                        f"and no request left for a repair re-ask (max_retries = {self.profile.max_retries}): {first}"
                    ) from None
                repair = dataclasses.replace(  # the same question, its prefix included, and the re-ask after it
                    request,
                    messages=(
                        *request.messages,
                        ChatMessage("assistant", completion.text),
                        ChatMessage("user", REPAIR_PROMPT.format(error=first, schema=request.schema)),
                    ),
                )
                completion = await self._complete(repair, stats)
                try:
                    value = parse_answer(completion.text, schema)
                except AnswerParseError as second:
                    raise AnswerError(
                        f"backend '{self.name}' ({self.profile.model}): invalid {request.schema_name} answer "
                        f"after a repair re-ask: {second}"
                    ) from None
            if self.cache is not None:
                entry = CachedAnswer(answer=value.model_dump(mode="json"), usage=completion.usage)
                await self.cache.put(key, kind=self.profile.kind, model=self.profile.model, task=task, entry=entry)
            return Answer[schema](value=value, stats=stats)  # type: ignore[valid-type]
        except BaseException as exc:
            stats.failures = 1
            if isinstance(exc, GeoAgentError):
                exc.stats = stats
            raise
        finally:
            stats.latency_s = time.perf_counter() - started
            self.totals.add(stats)

    @property
    def _budget(self) -> int:
        """Requests one question may cost, its repair re-ask included."""
        return 1 + self.profile.max_retries

    async def _complete(self, request: ChatRequest, stats: CallStats) -> Completion:
        """Send with retries from the question's remaining budget; each attempt waits for a server's request slot,
        backoff sleeps hold none. A retry goes to another server where the profile has several."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._budget - stats.requests),
            wait=_WaitRetryAfter(self.profile.retry_backoff_s, self.profile.retry_backoff_max_s, self.profile.retry_after_max_s),
            retry=retry_if_exception_type(RETRYABLE),
            reraise=True,
        )
        tried: list[Server] = []
        try:
            async for attempt in retrying:
                with attempt:
                    sent = True
                    try:
                        completion = await self.servers.complete(request, tried)
                    except UnreachableError:
                        sent = False  # no server took the connection: nothing was sent
                        raise
                    finally:
                        stats.requests += sent
                    usage = completion.usage
                    stats.input_tokens += usage.input_tokens
                    stats.cached_input_tokens += usage.cached_input_tokens
                    stats.output_tokens += usage.output_tokens
                    price = await self.price()
                    if price is None:
                        stats.unpriced_requests += 1
                    else:
                        stats.cost_usd += price.cost(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens)
                    return completion
        except TransientError as exc:
            where = tried[-1].url if tried else self.backend.url
            raise BackendError(
                f"backend '{self.name}' ({self.profile.model} at {where}): gave up after "
                f"{count(stats.requests, 'attempt')}: {exc}"
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        await self.servers.aclose()


class VLMPool:
    """The clients a run needs, one per backend profile, looked up by task."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = open_cache(settings.cache) if settings.cache.enabled else None
        self._clients: dict[str, VLMClient] = {}

    def for_task(self, task: str) -> VLMClient:
        return self.client(self.settings.tasks.profile_for(task))

    def client(self, name: str) -> VLMClient:
        """The client of backend profile ``name``, created on first use."""
        if name not in self._clients:
            self._clients[name] = VLMClient(name, self.settings.backends[name], self.cache)
        return self._clients[name]

    def totals(self) -> CallStats:
        return sum((client.totals for client in self._clients.values()), CallStats())

    def server_status(self) -> dict[str, list[ServerStatus]]:
        """Each profile in use and its servers: up, or taken out (since when, why) and probed again."""
        return {name: client.status() for name, client in self._clients.items()}

    def server_status_json(self) -> dict[str, list[dict[str, Any]]]:
        """:meth:`server_status` as JSON data, for a page that says "model server down" and "back"."""
        return {name: [server.model_dump(mode="json") for server in servers] for name, servers in self.server_status().items()}

    async def aclose(self) -> None:
        await asyncio.gather(*(client.aclose() for client in self._clients.values()))
        if self.cache is not None:
            await self.cache.aclose()
