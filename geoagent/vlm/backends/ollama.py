"""Ollama's native ``/api/chat`` through ``ollama.AsyncClient``: base64 images, JSON-schema ``format``."""

from __future__ import annotations

from typing import Any

import httpx
import ollama

from geoagent.errors import BackendError, ModelMissingError
from geoagent.vlm.backend import TransientError, VLMBackend
from geoagent.vlm.types import ChatRequest, Completion, Usage


OLLAMA_NOT_RUNNING = "is `ollama serve` running there? (set base_url if Ollama listens elsewhere)"


class Backend(VLMBackend):
    kind = "ollama"
    default_url = "http://127.0.0.1:11434"

    def __init__(self, name: str, profile: Any) -> None:
        super().__init__(name, profile)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        # The client's default timeout is None (wait forever): always pass ours.
        self._client = ollama.AsyncClient(host=self.url, timeout=profile.timeout_s, headers=headers)

    def _not_pulled(self) -> ModelMissingError:
        return ModelMissingError(
            f"backend '{self.name}': model '{self.profile.model}' is not on the Ollama server at {self.url}; "
            f"run `ollama pull {self.profile.model}`"
        )

    async def check(self) -> str:
        try:
            await self._client.show(self.profile.model)
        except ollama.ResponseError as exc:
            if exc.status_code == 404:
                raise self._not_pulled() from None
            raise self.status_error(exc.status_code, str(exc.error)) from None
        except ConnectionError:
            raise self.unreachable_error(OLLAMA_NOT_RUNNING) from None
        except httpx.HTTPError as exc:
            raise BackendError(f"backend '{self.name}': {self.url} did not answer ({type(exc).__name__})") from None
        return f"ok: {self.profile.model} at {self.url}"

    async def complete(self, request: ChatRequest) -> Completion:
        messages: list[dict[str, Any]] = []
        for message in request.messages:
            entry: dict[str, Any] = {"role": message.role, "content": message.text}
            if message.images:
                entry["images"] = [image.b64 for image in message.images]
            messages.append(entry)
        try:
            response = await self._client.chat(
                model=self.profile.model,
                messages=messages,
                format=request.schema,
                options={"temperature": request.temperature, "seed": request.seed, "num_predict": request.max_tokens},
                stream=False,
            )
        except ollama.ResponseError as exc:
            if exc.status_code == 404 and "not found" in str(exc.error).lower():
                raise self._not_pulled() from None
            raise self.status_error(exc.status_code, str(exc.error)) from None
        except ConnectionError:  # the client's wrapping of httpx.ConnectError
            raise self.unreachable_error(OLLAMA_NOT_RUNNING) from None
        except httpx.TimeoutException:
            raise TransientError(f"no answer within {self.profile.timeout_s:g} s") from None
        except httpx.TransportError as exc:
            raise TransientError(f"connection failed: {type(exc).__name__}") from None
        usage = Usage(prompt_tokens=response.prompt_eval_count or 0, completion_tokens=response.eval_count or 0)
        return Completion(text=response.message.content or "", usage=usage)

    async def aclose(self) -> None:
        await self._client.close()
