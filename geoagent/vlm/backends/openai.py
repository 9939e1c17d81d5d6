"""Any OpenAI-compatible server (OpenAI, vLLM, llama.cpp server, LM Studio) through ``openai.AsyncOpenAI``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import openai
from openai.types import Model

from geoagent.errors import AuthError, BackendError, ModelMissingError, UnreachableError, WrongServerError
from geoagent.vlm.backend import Health, TransientError, VLMBackend, is_html, parse_retry_after
from geoagent.vlm.context import CONTEXT_FIXES
from geoagent.vlm.types import ChatRequest, Completion, Usage

OPENAI_API = "an OpenAI-compatible API"
OPENAI_URL_HINT = "is base_url right? (it usually ends in /v1)"
#: How servers say a prompt does not fit: vLLM and OpenAI, llama.cpp's server, hosted providers via litellm.
CONTEXT_OVERFLOW = re.compile(
    r"maximum context length|context[_ ]length[_ ]exceeded|exceeds? the available context|exceed_context_size"
    r"|prompt is too long|input length exceeds|context window",
    re.IGNORECASE,
)
#: litellm's wording for a 200 it could not read, quoting the body: here, a web page.
LITELLM_HTML_REPLY = re.compile(r"invalid response from LLM endpoint.*<(!doctype )?html", re.IGNORECASE | re.DOTALL)


def openai_messages(
    request: ChatRequest, detail: Mapping[str, str | None] | None = None, *, mark_prefix: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Chat messages in OpenAI's shape, in order: each message's text, then its ``image_url`` data URLs.

    Consecutive user messages (the photo's query message, then the task's) become one message whose parts keep
    their order: the prefix stays identical, and chat templates that insist on alternating roles (Gemma 3,
    Mistral on vLLM) accept it. ``detail``: ``image_url.detail`` per image role ("query", "candidate"); a role
    without one sends none. ``mark_prefix``: set on the last part of the shared prefix (Anthropic's cache_control).
    """
    messages: list[dict[str, Any]] = []
    for index, message in enumerate(request.messages):
        parts: list[dict[str, Any]] = [{"type": "text", "text": message.text}] if message.text or not message.images else []
        for image in message.images:
            url: dict[str, Any] = {"url": image.data_url}
            if detail and detail.get(image.role):
                url["detail"] = detail[image.role]
            parts.append({"type": "image_url", "image_url": url})
        if mark_prefix and index == request.prefix_messages - 1:
            parts[-1] = {**parts[-1], "cache_control": dict(mark_prefix)}
        if messages and message.role == "user" and messages[-1]["role"] == "user":
            messages[-1]["content"] += parts
        else:
            messages.append({"role": message.role, "content": parts})
    for entry in messages:  # a message of one text part goes as a plain string, as it always did
        only = entry["content"][0] if len(entry["content"]) == 1 else None
        if only is not None and only["type"] == "text" and "cache_control" not in only:
            entry["content"] = only["text"]
    return messages


def image_details(profile: Any) -> dict[str, str | None]:
    """The profile's ``image_url.detail`` per image role."""
    return {"query": profile.query_detail, "candidate": profile.candidate_detail}


def openai_usage(usage: Any) -> Usage:
    """Tokens from an OpenAI-shaped ``usage`` (the openai client's, or litellm's): cached input tokens from
    ``prompt_tokens_details.cached_tokens``, else Anthropic's ``cache_read_input_tokens`` (litellm passes it on);
    both are part of ``prompt_tokens``."""
    if usage is None:
        return Usage()
    prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    if not cached:
        cached = getattr(usage, "cache_read_input_tokens", None)
    return Usage(
        input_tokens=prompt,
        cached_input_tokens=min(int(cached or 0), prompt),
        output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
    )


def json_schema_format(request: ChatRequest) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": request.schema_name, "schema": request.schema}}


class Backend(VLMBackend):
    kind = "openai"
    default_url = "https://api.openai.com/v1"

    def __init__(self, name: str, profile: Any) -> None:
        super().__init__(name, profile)
        # Local OpenAI-compatible servers take any key; the client insists on one.
        # max_retries=0: geoagent's single retry layer decides, so attempts do not multiply.
        self._client = openai.AsyncOpenAI(
            base_url=self.profile.base_url,
            api_key=self.api_key or "not-needed",
            timeout=profile.timeout_s,
            max_retries=0,
        )
        self._structured = True  # send response_format until the server refuses it

    @property
    def url(self) -> str:
        return str(self._client.base_url).rstrip("/") if hasattr(self, "_client") else super().url

    def _expect_json(self, content_type: str) -> None:
        if "json" not in content_type.lower():
            raise self.wrong_server_error(content_type, OPENAI_API, OPENAI_URL_HINT)

    async def _models(self) -> list[Model]:
        try:
            raw = await self._client.models.with_raw_response.list()
        except openai.OpenAIError as exc:
            raise classify_openai_error(self, exc) from None
        self._expect_json(raw.headers.get("content-type", ""))
        return list(raw.parse().data or [])  # JSON of another shape lists nothing

    async def check(self, *, probe_chat: bool = False) -> Health:
        """The model listing, trusted less than a chat request: engines list nothing until a model is loaded
        (transformers serve) or fail on the listing (no model cache folder) while chat works. When the listing
        does not vouch for the model (or ``probe_chat``), a minimal chat request decides."""
        try:
            models = [model.id for model in await self.probe(self._models())]
        except (UnreachableError, AuthError, WrongServerError):
            raise
        except BackendError as exc:
            listing: str | None = f"the model listing failed ({exc})"
        else:
            listing = None if self.profile.model in models else (
                f"the model listing does not name '{self.profile.model}' (it lists: {', '.join(models[:8]) or 'nothing'})"
            )
        if listing is None and not probe_chat:
            return Health(summary=f"ok: {self.profile.model} at {self.url}")
        try:
            await self.probe(self._create([{"role": "user", "content": "Reply with OK."}], max_tokens=1))
        except (UnreachableError, AuthError, WrongServerError, ModelMissingError):
            raise
        except BackendError as exc:
            if listing is None:
                raise
            raise ModelMissingError(
                f"backend '{self.name}': no model '{self.profile.model}' at {self.url}? {listing}, and a chat request failed: {exc}"
            ) from None
        if listing is None:
            return Health(summary=f"ok: {self.profile.model} listed at {self.url}, and a chat request worked")
        return Health(
            summary=f"ok: a chat request to {self.profile.model} at {self.url} worked",
            warnings=[f"backend '{self.name}': {listing}; a chat request worked, so the run goes on"],
        )

    async def model_identity(self) -> str | None:
        """The listing's ``root``: vLLM names the weights it serves there; OpenAI itself says nothing more."""
        try:
            listed = await self.probe(self._models())
        except (UnreachableError, AuthError, WrongServerError):
            raise
        except BackendError:
            return None  # a listing that fails says nothing of the weights; chat may still work
        for model in listed:
            if model.id == self.profile.model:
                root = (model.model_extra or {}).get("root")
                return str(root) if root else None
        return None

    async def _create(self, messages: list[dict[str, Any]], **options: Any) -> Completion:
        """One chat completion request, classified: TransientError, BackendError, or the completion."""
        try:
            raw = await self._client.chat.completions.with_raw_response.create(  # type: ignore[call-overload]
                model=self.profile.model, messages=messages, **options
            )
        except openai.OpenAIError as exc:
            if self._structured and "response_format" in options and _rejects_response_format(exc):
                # Some engines refuse structured output; the prompt itself asks for the JSON shape.
                self._structured = False
                raise TransientError("the server does not take response_format; asking again without it", retry_after=0) from None
            raise classify_openai_error(self, exc) from None
        self._expect_json(raw.headers.get("content-type", ""))
        response = raw.parse()
        if not response.choices:
            raise TransientError("the server returned no choices")
        return Completion(text=response.choices[0].message.content or "", usage=openai_usage(response.usage))

    async def complete(self, request: ChatRequest) -> Completion:
        options: dict[str, Any] = {"temperature": request.temperature, "seed": request.seed, "max_tokens": request.max_tokens}
        if self._structured:
            options["response_format"] = json_schema_format(request)
        return await self._create(openai_messages(request, image_details(self.profile)), **options)

    async def aclose(self) -> None:
        await self._client.close()


def classify_openai_error(backend: VLMBackend, exc: openai.OpenAIError) -> Exception:
    """TransientError or BackendError for an openai-client exception (litellm's subclass these too)."""
    if _refused(exc):  # checked first: litellm reports a refused connection as a 500
        return backend.unreachable_error()
    if isinstance(exc, openai.APITimeoutError):
        return TransientError(f"no answer within {backend.profile.timeout_s:g} s")
    if isinstance(exc, openai.APIConnectionError):
        return TransientError(f"connection failed: {exc}")
    if isinstance(exc, openai.APIStatusError):
        response = getattr(exc, "response", None)  # litellm raises some (unsupported parameters) before any response
        headers = getattr(exc, "litellm_response_headers", None) or (response.headers if response is not None else {})
        message = _error_message(exc)
        content_type = response.headers.get("content-type", "") if response is not None else ""
        if is_html(content_type):  # never quoted: the wrong server, or a proxy's error page (retried)
            return backend.page_error(exc.status_code, content_type, OPENAI_API, OPENAI_URL_HINT)
        if LITELLM_HTML_REPLY.search(message):
            return backend.wrong_server_error("text/html", OPENAI_API, OPENAI_URL_HINT)
        if exc.status_code in (400, 413) and CONTEXT_OVERFLOW.search(f"{message} {getattr(exc, 'code', None) or ''}"):
            return BackendError(
                f"backend '{backend.name}': the prompt does not fit the model's context at {backend.url} "
                f"({backend.redact(message)}); {CONTEXT_FIXES} (on the server: vLLM --max-model-len, llama.cpp --ctx-size)"
            )
        return backend.status_error(exc.status_code, message, parse_retry_after(headers))
    return backend.status_error(0, str(exc))


def _refused(exc: BaseException) -> bool:
    import httpx

    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, httpx.ConnectError | ConnectionRefusedError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _error_message(exc: openai.APIStatusError) -> str:
    body = exc.body  # the client already unwrapped {"error": {...}}
    if isinstance(body, dict):
        for key in ("message", "detail"):  # OpenAI and vLLM say "message", FastAPI servers "detail"
            if isinstance(body.get(key), str):
                return body[key]
    return exc.message


RESPONSE_FORMAT_REFUSED = re.compile(r"response_format|json_schema|structured output|guided_json", re.IGNORECASE)


def _rejects_response_format(exc: openai.OpenAIError) -> bool:
    return isinstance(exc, openai.APIStatusError) and exc.status_code in (400, 422) and bool(
        RESPONSE_FORMAT_REFUSED.search(_error_message(exc))
    )
