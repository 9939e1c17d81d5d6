"""The response cache: one interface (:class:`ResponseCache`), a store per URL scheme, chosen by ``[cache] url``.

``sqlite`` (unset url, or ``sqlite:///FOLDER``) is the embedded default; ``redis``/``rediss`` is a server
several processes and machines share. Both keep the same keys, so ``geoagent cache copy`` moves a cache
from one to the other and a run reads it there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from geoagent.errors import ConfigError
from geoagent.vlm.cache.base import CachedAnswer, CacheStats, CacheWarning, ResponseCache, StoredEntry, StoredIdentity, cache_key
from geoagent.vlm.cache.sqlite import CACHE_FILE, SqliteCache

if TYPE_CHECKING:
    from geoagent.config import CacheConfig

__all__ = [
    "CACHE_FILE",
    "CacheStats",
    "CacheWarning",
    "CachedAnswer",
    "ResponseCache",
    "SqliteCache",
    "StoredEntry",
    "StoredIdentity",
    "cache_key",
    "open_cache",
    "sqlite_folder",
]


def sqlite_folder(config: CacheConfig) -> Path | None:
    """The folder of the SQLite file the config names (None: the cache is elsewhere, on Redis)."""
    if config.url is None:
        return config.dir
    scheme, _, rest = config.url.partition("://")
    return Path(rest).expanduser() if scheme.lower() == "sqlite" else None


def open_cache(config: CacheConfig, url: str | None = None) -> ResponseCache:
    """The store ``url`` names (default: the config's): a bare path or ``sqlite:///FOLDER`` is an SQLite folder.

    Opening connects to nothing: the first use does (a run), or :meth:`ResponseCache.check` (a preflight)."""
    if url is not None:
        from pydantic import ValidationError

        from geoagent.config import validation_message

        try:  # the same rules as in a config file
            config = type(config).model_validate({**config.model_dump(), "url": url if "://" in url else f"sqlite://{url}"})
        except ValidationError as err:
            raise ConfigError(f"cache URL: {validation_message(err.errors()[0])}") from None
    folder = sqlite_folder(config)
    if folder is not None:
        return SqliteCache(folder, ttl_s=config.ttl_s)
    from geoagent.vlm.cache.redis import RedisCache

    assert config.url is not None
    return RedisCache(config.url, password=config.password(), timeout_s=config.timeout_s, ttl_s=config.ttl_s, prefix=config.key_prefix)
