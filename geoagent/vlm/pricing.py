"""What a request costs in US dollars: a profile's own prices, else litellm's bundled price table, read offline.

The table is the JSON file shipped inside the litellm package, read directly (litellm itself is not imported,
and nothing is fetched): installed with the ``[hosted]`` extra; without it only the profile's prices count.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from geoagent.config import BackendProfile

PRICE_TABLE = "model_prices_and_context_window_backup.json"
PER_1K = 1000


class Price(BaseModel):
    """US dollars per token; ``cached``: per input token read from the provider's prefix cache (None: full price)."""

    prompt: float
    completion: float
    cached: float | None = None

    def cost(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> float:
        """``input_tokens`` counts every prompt token; the ``cached_input_tokens`` among them cost the cached rate."""
        cached = min(cached_input_tokens, input_tokens)
        cached_rate = self.prompt if self.cached is None else self.cached
        return (input_tokens - cached) * self.prompt + cached * cached_rate + output_tokens * self.completion


@lru_cache(maxsize=1)
def _price_table() -> dict[str, Any]:
    spec = importlib.util.find_spec("litellm")  # finds the package without importing it
    if spec is None or spec.origin is None:
        return {}
    try:
        return json.loads((Path(spec.origin).parent / PRICE_TABLE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def table_price(model: str) -> Price | None:
    """The price litellm's table lists for ``model`` ("gpt-4o-mini", "openai/gpt-4o-mini", ...), if any."""
    table = _price_table()
    for name in (model, model.split("/", 1)[-1]):
        entry = table.get(name)
        if isinstance(entry, dict) and entry.get("input_cost_per_token") is not None:
            cached = entry.get("cache_read_input_token_cost")
            return Price(
                prompt=float(entry["input_cost_per_token"]),
                completion=float(entry.get("output_cost_per_token") or 0.0),
                cached=None if cached is None else float(cached),
            )
    return None


def price_for(profile: BackendProfile) -> Price | None:
    """The profile's price per token: its own ``price_per_1k_*`` keys win; None when unknown (a local model)."""
    if profile.price_per_1k_prompt_tokens is not None or profile.price_per_1k_completion_tokens is not None:
        cached = profile.price_per_1k_cached_input_tokens
        return Price(
            prompt=(profile.price_per_1k_prompt_tokens or 0.0) / PER_1K,
            completion=(profile.price_per_1k_completion_tokens or 0.0) / PER_1K,
            cached=None if cached is None else cached / PER_1K,
        )
    if profile.kind == "ollama":
        return None  # a local server: no bill, and its model names are not the table's
    return table_price(profile.model)
