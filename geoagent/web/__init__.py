"""``geoagent serve``: a local web page and JSON API over one shared GeoAgent (the ``web`` extra).

Importing this package needs nothing beyond the core; :func:`require_web` says what to install when the
extra is missing, before any of its modules are imported.
"""

from __future__ import annotations

import importlib.util

from geoagent.errors import ConfigError

#: Import name -> distribution of every module the web extra brings.
WEB_MODULES = {"starlette": "starlette", "uvicorn": "uvicorn", "python_multipart": "python-multipart", "sse_starlette": "sse-starlette"}


def require_web() -> None:
    """ConfigError naming the missing module and the extra to install, if any module of the extra is missing."""
    for module, distribution in WEB_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules (tests do that) or a broken one
            found = False
        if not found:
            raise ConfigError(f"geoagent serve needs {distribution}, which is not installed: pip install 'geoagent-vlm[web]'")
