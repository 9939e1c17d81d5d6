"""Values that cross the VLM layer's boundary: requests, raw completions, validated answers, accounting."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

AnswerT = TypeVar("AnswerT", bound=BaseModel)
ImageRole = Literal["query", "candidate"]


@dataclass(frozen=True)
class EncodedImage:
    """An image already oriented, downscaled and encoded: built once, sent in many calls."""

    data: bytes
    sha256: str
    width: int
    height: int
    mime: str = "image/jpeg"
    label: str = field(default="", compare=False)
    #: What the image is to the question: the query photo, or a candidate's (a backend may send them at another detail).
    role: ImageRole = field(default="query", compare=False)

    @cached_property
    def b64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")

    @cached_property
    def data_url(self) -> str:
        return f"data:{self.mime};base64,{self.b64}"


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    text: str
    images: tuple[EncodedImage, ...] = ()


@dataclass(frozen=True)
class ChatRequest:
    """What a backend is asked: messages (images in order) and the JSON schema the answer must follow."""

    messages: tuple[ChatMessage, ...]
    schema_name: str
    schema: dict[str, Any]
    temperature: float
    seed: int
    max_tokens: int
    #: How many leading messages every question about the same photo shares byte for byte (instructions, then
    #: the query image): a provider's prefix cache reuses them, and a backend may mark their end (cache_control).
    prefix_messages: int = 0


class Usage(BaseModel):
    """Tokens one request read and wrote. ``input_tokens`` counts every prompt token, the ``cached_input_tokens``
    a provider served from its prefix cache (billed at its cached rate) included."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0


class Completion(BaseModel):
    """A backend's raw reply, before validation."""

    text: str
    usage: Usage = Field(default_factory=Usage)


class CallStats(BaseModel):
    """Accounting for one or many asks. ``requests`` counts HTTP requests actually sent."""

    model_config = ConfigDict(validate_assignment=False)

    asks: int = 0
    requests: int = 0
    cache_hits: int = 0
    repairs: int = 0
    failures: int = 0
    input_tokens: int = 0  # every prompt token, cached ones included
    cached_input_tokens: int = 0  # of those, read from the provider's prefix cache (billed at its cached rate)
    output_tokens: int = 0
    latency_s: float = 0.0
    cost_usd: float = 0.0  # of the requests whose model has a known price
    unpriced_requests: int = 0  # requests to a model without one

    def __add__(self, other: CallStats) -> CallStats:
        return CallStats(**{name: getattr(self, name) + getattr(other, name) for name in CallStats.model_fields})

    def add(self, other: CallStats) -> None:
        """Accumulate in place (for running totals)."""
        for name in CallStats.model_fields:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class Answer(BaseModel, Generic[AnswerT]):
    """A validated answer and what it cost."""

    value: AnswerT
    stats: CallStats
    cached: bool = False


class PullProgress(BaseModel):
    """One line of a model pull's progress, as Ollama streams it: a status, and for a layer its digest and bytes."""

    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None
