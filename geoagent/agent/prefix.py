"""The opening every question about one photo shares, byte for byte: the instructions, then the query image.

Providers cache a repeated prompt prefix (OpenAI from 1,024 tokens, billed at a discount; Anthropic where it is
marked; vLLM and llama.cpp reuse its KV cache), so everything that depends on the task or the candidates comes
after it: the task's text and the candidates' images form the question's last message.
"""

from __future__ import annotations

from geoagent.prompts import PromptSet
from geoagent.vlm import ChatMessage, EncodedImage


def photo_prefix(prompts: PromptSet, query: EncodedImage | None) -> tuple[ChatMessage, ...]:
    """The system instructions (``instructions.txt``), then a user message holding the query image and its caption
    (``query.txt``); only the instructions where the query travels inside a composite (``query`` None)."""
    instructions = ChatMessage("system", prompts.render("instructions"))
    if query is None:
        return (instructions,)
    return instructions, ChatMessage("user", prompts.render("query"), (query,))
