"""Ollama's native ``/api/chat`` through ``ollama.AsyncClient``: base64 images, JSON-schema ``format``, a sized ``num_ctx``."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import httpx
import ollama

from geoagent.errors import BackendError, ModelMissingError, WrongServerError
from geoagent.vlm.backend import Health, TransientError, VLMBackend, record_response, watch_response
from geoagent.vlm.context import CONTEXT_FIXES, ContextWindow, ContextWindowWarning
from geoagent.vlm.types import ChatRequest, Completion, PullProgress, Usage

T = TypeVar("T")

OLLAMA_NOT_RUNNING = "is `ollama serve` running there? (set base_url if Ollama listens elsewhere)"
OLLAMA_API = "the Ollama API"
OLLAMA_REGISTRY = "registry.ollama.ai"  # where a model name without a host is pulled from
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
REGISTRY_TIMEOUT_S = 10.0


def _tagged(model: str) -> str:
    """``llava`` and ``llava:latest`` name the same model."""
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


def manifest_urls(model: str) -> list[str]:
    """Where the registry keeps ``model``'s manifest, as Ollama names models: ``[host/][namespace/]name[:tag]``
    (defaults registry.ollama.ai, library, latest). https first; http too, for a registry reached with --insecure."""
    path, last = model.rsplit("/", 1) if "/" in model else ("", model)
    name, _, tag = last.partition(":")
    parts = [p for p in path.split("/") if p]
    host = parts.pop(0) if len(parts) == 2 else OLLAMA_REGISTRY
    namespace = parts[0] if parts else "library"
    route = f"{host}/v2/{namespace}/{name}/manifests/{tag or 'latest'}"
    return [f"https://{route}", f"http://{route}"]


class Backend(VLMBackend):
    kind = "ollama"
    default_url = "http://127.0.0.1:11434"
    can_pull = True

    def __init__(self, name: str, profile: Any) -> None:
        super().__init__(name, profile)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        # The client's default timeout is None (wait forever): always pass ours. Its errors drop the response's
        # headers, so a hook keeps what Retry-After and Content-Type said (extra kwargs reach httpx.AsyncClient).
        self._client = ollama.AsyncClient(
            host=self.url, timeout=profile.timeout_s, headers=headers, event_hooks={"response": [record_response]}
        )
        self._window = ContextWindow(profile.model, profile.context_tokens)
        self._shown = False  # /api/show asked (once, lazily) for what sizes the window
        self._show_lock = asyncio.Lock()
        self._cut_reported = False

    def _not_pulled(self) -> ModelMissingError:
        return ModelMissingError(
            f"backend '{self.name}': model '{self.profile.model}' is not on the Ollama server at {self.url}; "
            f"run `ollama pull {self.profile.model}`"
        )

    async def _api(self, call: Awaitable[T]) -> T:
        """Await one client call, its failures worded as TransientError or BackendError."""
        with watch_response() as seen:
            try:
                return await call
            except ollama.ResponseError as exc:
                if seen.is_html:  # never quoted: the wrong server, or a proxy's error page (retried)
                    raise self.page_error(exc.status_code, seen.content_type, OLLAMA_API) from None
                if exc.status_code == 404 and "not found" in str(exc.error).lower():
                    raise self._not_pulled() from None
                raise self.status_error(exc.status_code, str(exc.error), seen.retry_after) from None
            except ConnectionError:  # the client's wrapping of httpx.ConnectError
                raise self.unreachable_error(OLLAMA_NOT_RUNNING) from None
            except httpx.TimeoutException:
                raise TransientError(f"no answer within {self.profile.timeout_s:g} s") from None
            except httpx.TransportError as exc:
                raise TransientError(f"connection failed: {type(exc).__name__}") from None
            except ValueError:  # not JSON, or JSON of another shape (pydantic's ValidationError is a ValueError)
                if not seen.status:  # raised before anything answered: not the server's doing
                    raise
                raise self.wrong_server_error(seen.content_type, OLLAMA_API) from None

    async def _show(self) -> Health:
        show = await self._api(self._client.show(self.profile.model))
        details = show.details.model_dump() if show.details else {}
        self._window.learn_model(self.profile.model, details, show.modelinfo or {}, show.parameters or "")
        self._shown = True
        return Health(summary=f"ok: {self.profile.model} at {self.url}")

    async def check(self, *, probe_chat: bool = False) -> Health:
        return await self.probe(self._show())

    async def pull(self) -> AsyncIterator[PullProgress]:
        """``ollama pull`` through the client's streaming API: each progress line as it comes. The client's timeout
        bounds every wait for the next line, so a stalled download fails instead of hanging."""
        try:
            async for part in await self._client.pull(self.profile.model, stream=True):
                yield PullProgress(status=part.status or "", digest=part.digest, total=part.total, completed=part.completed)
        except ollama.ResponseError as exc:  # a streamed {"error": ...} line, or an HTTP error status
            raise BackendError(
                f"backend '{self.name}': Ollama at {self.url} cannot pull '{self.profile.model}': {self.redact(str(exc.error))}"
            ) from None
        except (ConnectionError, httpx.ConnectError):  # streaming, the client lets httpx's own error through
            raise self.unreachable_error(OLLAMA_NOT_RUNNING) from None
        except httpx.TimeoutException:
            raise BackendError(f"backend '{self.name}': the pull of '{self.profile.model}' stalled: no progress within {self.profile.timeout_s:g} s") from None
        except httpx.TransportError as exc:
            raise BackendError(f"backend '{self.name}': the pull of '{self.profile.model}' broke off ({type(exc).__name__}); run setup again to resume it") from None
        except ValueError:  # a line that is not JSON: something else answers there
            raise WrongServerError(f"backend '{self.name}': {self.url} did not answer the pull as {OLLAMA_API} does; is base_url right?") from None

    async def download_size(self) -> int | None:
        """The manifest's layers summed; None when the registry cannot be reached. A model the registry does not
        know is a BackendError, as the pull itself would fail."""
        async with httpx.AsyncClient(timeout=REGISTRY_TIMEOUT_S, headers={"Accept": MANIFEST_TYPE}) as client:
            for url in manifest_urls(self.profile.model):
                try:
                    response = await client.get(url)
                except httpx.HTTPError:
                    continue  # https refused or unreachable: try plain http, then give up
                if response.status_code == 404:
                    raise BackendError(f"backend '{self.name}': the registry has no model '{self.profile.model}' ({url})")
                try:
                    manifest = response.raise_for_status().json()
                    blobs = [manifest["config"], *manifest["layers"]]
                    return sum(int(blob["size"]) for blob in blobs)
                except (httpx.HTTPError, ValueError, KeyError, TypeError):
                    return None  # an answer of another kind: the size is unknown, the pull will tell
        return None

    async def model_identity(self) -> str | None:
        listing = await self.probe(self._api(self._client.list()))
        wanted = _tagged(self.profile.model)
        return next((entry.digest or None for entry in listing.models if _tagged(entry.model or "") == wanted), None)

    async def _learn_model(self) -> None:
        """Ask /api/show once, for the window's estimate; a failure leaves the estimate to the model's name."""
        if self._shown or self._window.override is not None:
            return
        async with self._show_lock:
            if self._shown:
                return
            try:
                await self._show()
            except (BackendError, TransientError):
                pass  # the chat itself will say what is wrong
            self._shown = True

    async def complete(self, request: ChatRequest) -> Completion:
        messages: list[dict[str, Any]] = []
        for message in request.messages:
            entry: dict[str, Any] = {"role": message.role, "content": message.text}
            if message.images:
                # Raw bytes: the client base64-encodes them in C; given a base64 string it would try it as a
                # file path and decode it to validate, costing about 3x the request's own CPU.
                entry["images"] = [image.data for image in message.images]
            messages.append(entry)
        await self._learn_model()
        num_ctx = self._window.size_for(request)
        options = {"temperature": request.temperature, "seed": request.seed, "num_predict": request.max_tokens, "num_ctx": num_ctx}
        response = await self._api(
            self._client.chat(model=self.profile.model, messages=messages, format=request.schema, options=options, stream=False)
        )
        usage = Usage(input_tokens=response.prompt_eval_count or 0, output_tokens=response.eval_count or 0)
        if self._window.observe(request, num_ctx, usage.input_tokens) and not self._cut_reported:
            self._cut_reported = True
            warnings.warn(
                f"backend '{self.name}' ({self.profile.model}): a prompt filled the whole context of {num_ctx} tokens, "
                f"so Ollama cut it from the start (the query photo first) and the answer is a guess; {CONTEXT_FIXES} "
                f"(context_tokens in backend '{self.name}', or unset it to let GeoAgent size it)",
                ContextWindowWarning,
                stacklevel=2,
            )
        return Completion(text=response.message.content or "", usage=usage)

    async def aclose(self) -> None:
        await self._client.close()
