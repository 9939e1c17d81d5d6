"""GeoAgent: where was this photo taken?

The public API is re-exported here. Heavy parts (torch, faiss, litellm) load on first use, so importing
``geoagent`` stays cheap.
"""

from __future__ import annotations

from geoagent.config import Settings, load_config
from geoagent.errors import AnswerError, BackendError, ConfigError, GeoAgentError, InputError, WeightsError

__version__ = "0.1.0"

_LAZY = {"GeoAgent": "geoagent.agent.controller", "LocateResult": "geoagent.types", "Candidate": "geoagent.types"}


def __getattr__(name: str) -> object:
    """GeoAgent pulls in torch and faiss: import it only when asked for."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'geoagent' has no attribute {name!r}")

__all__ = [
    "AnswerError",
    "BackendError",
    "Candidate",
    "ConfigError",
    "GeoAgent",
    "GeoAgentError",
    "InputError",
    "LocateResult",
    "Settings",
    "WeightsError",
    "__version__",
    "load_config",
]
