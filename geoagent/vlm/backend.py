"""The one interface every VLM backend implements, and the name -> class registry.

A backend is one module in ``geoagent/vlm/backends/`` named after its ``kind`` and exposing ``Backend``:
adding one touches that file only. Backends do a single request each and classify failures; retries,
concurrency, caching and answer validation live in :mod:`geoagent.vlm.client`.
"""

from __future__ import annotations

import email.utils
import importlib
import pkgutil
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

from pydantic import BaseModel, Field

from geoagent.errors import AuthError, BackendError, ConfigError, ModelMissingError, UnreachableError, WrongServerError
from geoagent.vlm.types import ChatRequest, Completion, PullProgress

if TYPE_CHECKING:
    import httpx

    from geoagent.config import BackendProfile

T = TypeVar("T")

#: HTTP statuses worth another attempt: timeouts, conflicts, rate limits and server-side failures.
TRANSIENT_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))


class Health(BaseModel):
    """What a backend check found: a one-line summary, and what works but deserves a warning."""

    summary: str
    warnings: list[str] = Field(default_factory=list)


class TransientError(Exception):
    """A failure that another attempt may fix; ``retry_after`` is the server's requested wait in seconds;
    ``wrong_server``: a web page answered (a proxy's error page), which a check reports as a wrong base_url."""

    def __init__(self, message: str, retry_after: float | None = None, *, wrong_server: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.wrong_server = wrong_server


class VLMBackend(ABC):
    """Sends one chat request to one model and returns its raw text."""

    kind: ClassVar[str]
    default_url: ClassVar[str | None] = None

    def __init__(self, name: str, profile: BackendProfile) -> None:
        self.name = name
        self.profile = profile
        self.api_key = profile.api_key(name)

    @property
    def url(self) -> str:
        return self.profile.base_url or self.default_url or "(provider default)"

    @abstractmethod
    async def complete(self, request: ChatRequest) -> Completion:
        """One request. Raise TransientError to ask for a retry, BackendError to stop."""

    async def check(self, *, probe_chat: bool = False) -> Health:
        """A cheap reachability and model check (the preflight, ``geoagent check``); raises BackendError with
        the fix. ``probe_chat`` also sends a minimal chat request where the backend can (``geoagent check``)."""
        return Health(summary=f"configured for {self.profile.model} (this backend has no cheap health check; the first ask will tell)")

    async def model_identity(self) -> str | None:
        """What tells this model's weights apart from another's of the same name (a digest), or None if unknown.

        Part of the response-cache key, so a re-pulled model does not answer from the old one's cache.
        Raises BackendError, like :meth:`check`, when the server cannot be asked.
        """
        return None

    #: True when :meth:`pull` can fetch a missing model onto the server (``geoagent setup``).
    can_pull: ClassVar[bool] = False

    def pull(self) -> AsyncIterator[PullProgress]:
        """Fetch the profile's model onto the server, yielding its progress; raises BackendError worded for the user."""
        raise NotImplementedError(f"backend kind '{self.kind}' cannot pull models")

    async def download_size(self) -> int | None:
        """Bytes a :meth:`pull` would fetch, asked of the model's registry (None: unknown, or nothing to pull)."""
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    async def probe(self, call: Awaitable[T]) -> T:
        """Await a one-off question to the server (check, identity): nothing retries it, so no failure is transient."""
        try:
            return await call
        except TransientError as exc:
            failure = WrongServerError if exc.wrong_server else BackendError
            raise failure(f"backend '{self.name}': {self.url}: {exc}") from None

    # Shared classification so every backend words the same failure the same way.

    def auth_error(self, status: int) -> AuthError:
        if self.profile.api_key_env:
            hint = f"check the key in environment variable {self.profile.api_key_env}"
        else:
            hint = f"set api_key_env for backend '{self.name}' to the NAME of an environment variable holding the key"
        return AuthError(f"backend '{self.name}': {self.url} refused the credentials (HTTP {status}); {hint}")

    def unreachable_error(self, hint: str = "is the server running there?") -> UnreachableError:
        return UnreachableError(f"backend '{self.name}': cannot connect to {self.url}; {hint}")

    def wrong_server_error(self, content_type: str, api: str, hint: str = "is base_url right?") -> WrongServerError:
        """Something answered at the URL, but not the API: a proxy's page, a web app on that port."""
        return WrongServerError(f"backend '{self.name}': {self.url} answered with {describe_content(content_type)}, not {api}; {hint}")

    def page_error(self, status: int, content_type: str, api: str, hint: str = "is base_url right?") -> Exception:
        """A web page where ``api`` should answer, never quoted: the wrong server (a 2xx-4xx page, a 501 "method not
        implemented"), or a proxy's error page (other 5xx) while what is behind it restarts, which is retried."""
        if status in TRANSIENT_STATUSES and status != 501:
            return TransientError(
                f"HTTP {status}: {describe_content(content_type)} (a proxy's error page?), not {api}; {hint}",
                None,
                wrong_server=True,
            )
        return self.wrong_server_error(content_type, api, hint)

    def redact(self, text: str) -> str:
        """Servers sometimes echo what they were sent; a key must never reach a message or a log."""
        return text.replace(self.api_key, "[redacted]") if self.api_key else text

    def status_error(self, status: int, message: str, retry_after: float | None = None) -> Exception:
        """Map an HTTP status to TransientError or a BackendError worded for the user."""
        message = self.redact(message)
        if status in TRANSIENT_STATUSES:
            return TransientError(f"HTTP {status}: {message}", retry_after)
        if status in (401, 403):
            return self.auth_error(status)
        if status == 404:
            return ModelMissingError(f"backend '{self.name}': no model '{self.profile.model}' at {self.url} ({message})")
        return BackendError(f"backend '{self.name}': HTTP {status} from {self.url}: {message}")


HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def is_html(content_type: str) -> bool:
    return _media_type(content_type) in HTML_TYPES


def describe_content(content_type: str) -> str:
    """A reply's content type in words, for saying what answered instead of an API."""
    kind = _media_type(content_type)
    if kind in HTML_TYPES:
        return "an HTML page"
    if not kind:
        return "a reply without a content type"
    if kind.endswith("json"):
        return "JSON of another shape"
    return f"a {kind} reply"


@dataclass
class ResponseSeen:
    """What the HTTP response to a request said besides its body: clients that raise their own errors drop it."""

    status: int = 0
    content_type: str = ""
    retry_after: float | None = None

    @property
    def is_html(self) -> bool:
        return is_html(self.content_type)


_RESPONSE_SEEN: ContextVar[ResponseSeen | None] = ContextVar("geoagent_response_seen", default=None)


@contextmanager
def watch_response() -> Iterator[ResponseSeen]:
    """Collect, through :func:`record_response`, what the responses to requests sent inside the block said.

    httpx runs event hooks in the task that sends the request, so concurrent requests each fill their own.
    """
    seen = ResponseSeen()
    token = _RESPONSE_SEEN.set(seen)
    try:
        yield seen
    finally:
        _RESPONSE_SEEN.reset(token)


async def record_response(response: httpx.Response) -> None:
    """An httpx ``response`` event hook feeding the innermost :func:`watch_response` of the sending task."""
    seen = _RESPONSE_SEEN.get()
    if seen is not None:
        seen.status = response.status_code
        seen.content_type = response.headers.get("content-type", "")
        seen.retry_after = parse_retry_after(response.headers)


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if not headers:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def backend_kinds() -> list[str]:
    """Names of the available backends, found without importing them."""
    from geoagent.vlm import backends

    return sorted(m.name for m in pkgutil.iter_modules(backends.__path__) if not m.name.startswith("_"))


def create_backend(name: str, profile: BackendProfile) -> VLMBackend:
    """Instantiate the backend class for ``profile.kind``."""
    if profile.kind not in backend_kinds():
        raise ConfigError(f"backends.{name}.kind: unknown backend '{profile.kind}' (known: {', '.join(backend_kinds())})")
    module = importlib.import_module(f"geoagent.vlm.backends.{profile.kind}")
    backend_cls: type[VLMBackend] = module.Backend
    return backend_cls(name, profile)
