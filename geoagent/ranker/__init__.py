"""GeoRanker: a Qwen2-VL reward model (LoRA adapter + value head) that scores (query photo, candidate) pairs.

This package's ``__init__`` stays light (no torch, transformers or peft): the configuration and the CLI import
from it. The model lives in :mod:`geoagent.ranker.model`, the batching service in :mod:`geoagent.ranker.service`.
"""

from __future__ import annotations

import importlib.util

from geoagent.errors import ConfigError

#: The libraries of the optional extra ``ranker`` (torch is a core dependency already).
EXTRA_MODULES = ("transformers", "peft", "safetensors")
EXTRA_INSTALL = "pip install 'geoagent-vlm[ranker]'"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules (set to None)
        return False


def require_extra(purpose: str = "strategy 'georanker'") -> None:
    """Raise ConfigError (exit 2) naming the extra when one of its libraries is not installed."""
    missing = [name for name in EXTRA_MODULES if not _installed(name)]
    if missing:
        raise ConfigError(f"{purpose} needs the optional extra 'ranker' (missing: {', '.join(missing)}); {EXTRA_INSTALL}")
