"""The VLM layer: ask models questions about images, get validated answers. Knows nothing of geography."""

from geoagent.vlm.backend import TransientError, VLMBackend, backend_kinds, create_backend
from geoagent.vlm.cache import ResponseCache
from geoagent.vlm.client import VLMClient, VLMPool
from geoagent.vlm.types import Answer, CallStats, ChatMessage, ChatRequest, Completion, EncodedImage, Usage

__all__ = [
    "Answer",
    "CallStats",
    "ChatMessage",
    "ChatRequest",
    "Completion",
    "EncodedImage",
    "ResponseCache",
    "TransientError",
    "Usage",
    "VLMBackend",
    "VLMClient",
    "VLMPool",
    "backend_kinds",
    "create_backend",
]
