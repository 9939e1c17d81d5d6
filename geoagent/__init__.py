"""GeoAgent: where was this photo taken?

The public API is re-exported here. Heavy parts (torch, faiss, litellm) load on first use, so importing
``geoagent`` stays cheap.
"""

from __future__ import annotations

from geoagent.config import Settings, load_config
from geoagent.errors import AnswerError, BackendError, ConfigError, GeoAgentError, InputError, WeightsError

__version__ = "0.1.0"

__all__ = [
    "AnswerError",
    "BackendError",
    "ConfigError",
    "GeoAgentError",
    "InputError",
    "Settings",
    "WeightsError",
    "__version__",
    "load_config",
]
