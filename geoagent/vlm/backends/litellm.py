"""Hosted providers (Anthropic, Gemini, Bedrock, ...) and anything else litellm routes, via ``litellm.acompletion``.

litellm is imported once, in a worker thread, when the preflight checks the profile (or on the first ask): it
takes seconds to import, which would stall the event loop, and with ``LITELLM_LOCAL_MODEL_COST_MAP`` set it
never reaches the network while doing so.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import os
from typing import TYPE_CHECKING, Any

import openai

from geoagent.errors import ConfigError
from geoagent.vlm.backend import Health, VLMBackend
from geoagent.vlm.backends.openai import (
    classify_openai_error,
    image_details,
    json_schema_format,
    openai_messages,
    openai_usage,
)
from geoagent.vlm.types import ChatRequest, Completion

if TYPE_CHECKING:
    from geoagent.config import BackendProfile


#: litellm is an optional extra: a plain install stays lean, hosted models need it.
HOSTED_EXTRA_INSTALL = "pip install 'geoagent-vlm[hosted]'"
#: What names a credential among the variables litellm says a provider reads (not its URL variables).
SECRET_WORDS = ("KEY", "TOKEN", "SECRET")


def _require_litellm(user: str = "a backend of kind 'litellm'") -> None:
    """A one-line ConfigError naming the extra where litellm is not installed (cheap: no import)."""
    if importlib.util.find_spec("litellm") is None:
        raise ConfigError(f"{user} needs litellm, which is not installed: {HOSTED_EXTRA_INSTALL}")


@functools.lru_cache(maxsize=1)
def _litellm() -> Any:
    _require_litellm()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    return litellm


def litellm_model(model: str) -> str:
    """``ollama/`` flattens chats onto ``/api/generate``; ``ollama_chat/`` keeps ``/api/chat``."""
    return "ollama_chat/" + model.removeprefix("ollama/") if model.startswith("ollama/") else model


#: Anthropic caches a prompt's prefix only up to a block marked so (OpenAI caches without a mark; litellm drops it there).
CACHE_CONTROL = {"type": "ephemeral"}


def litellm_messages(request: ChatRequest, profile: BackendProfile) -> list[dict[str, Any]]:
    """OpenAI-shaped messages; with the profile's ``cache_control``, the last block of the prefix every question of
    a photo shares (the query image) carries Anthropic's cache mark."""
    return openai_messages(request, image_details(profile), mark_prefix=CACHE_CONTROL if profile.cache_control else None)


class Backend(VLMBackend):
    kind = "litellm"

    def __init__(self, name: str, profile: BackendProfile) -> None:
        _require_litellm(f"backends.{name} (kind 'litellm')")  # created in the preflight, so a missing extra stops the run before any photo
        super().__init__(name, profile)
        self._module: Any = None

    async def _imported(self) -> Any:
        """litellm, imported in a worker thread the first time (seconds of import would block the event loop)."""
        if self._module is None:
            self._module = await asyncio.to_thread(_litellm)
        return self._module

    async def check(self, *, probe_chat: bool = False) -> Health:
        """Imports litellm now, while the rest of the preflight runs, so the first photo does not wait for it; a
        provider reached without api_key_env needs its own key variable set (litellm names it; its value is never read
        here)."""
        litellm = await self._imported()
        if self.api_key is None and not self.profile.base_url:
            found = litellm.validate_environment(model=litellm_model(self.profile.model))
            missing = [str(name) for name in found.get("missing_keys") or [] if any(w in str(name) for w in SECRET_WORDS)]
            if missing:  # a missing API base (a local server's default URL) is no key: the first ask will tell
                raise ConfigError(
                    f"backend '{self.name}': no key for {self.profile.model} in the environment (litellm looks for "
                    f"{', '.join(missing)}); export it, or name the variable that holds your key in api_key_env"
                )
        return await super().check(probe_chat=probe_chat)

    def _key(self) -> str | None:
        # A local OpenAI-compatible server takes any key, but litellm insists on one; providers reached
        # without a base_url read their own variables (ANTHROPIC_API_KEY, ...) when none is passed.
        if self.api_key is None and self.profile.base_url and self.profile.model.startswith("openai/"):
            return "not-needed"
        return self.api_key

    async def complete(self, request: ChatRequest) -> Completion:
        litellm = await self._imported()
        try:
            response = await litellm.acompletion(
                model=litellm_model(self.profile.model),
                messages=litellm_messages(request, self.profile),
                response_format=json_schema_format(request),
                temperature=request.temperature,
                seed=request.seed,
                max_tokens=request.max_tokens,
                api_base=self.profile.base_url,
                api_key=self._key(),
                timeout=self.profile.timeout_s,
                drop_params=True,  # a provider without a parameter (Anthropic: seed) answers without it instead of refusing
                num_retries=0,  # geoagent's single retry layer decides
                max_retries=0,
            )
        except openai.OpenAIError as exc:  # litellm's exceptions subclass openai's
            if "Missing credentials" in str(exc) or "api_key" in str(exc).lower() and "missing" in str(exc).lower():
                raise self.auth_error(401) from None
            raise classify_openai_error(self, exc) from None
        return Completion(text=response.choices[0].message.content or "", usage=openai_usage(getattr(response, "usage", None)))
