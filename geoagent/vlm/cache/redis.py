"""The shared cache: a Redis server (``[cache] url = "redis://host:6379/0"``) through redis-py's asyncio client.

Layout (``P`` is ``[cache] key_prefix``, ``geoagent:`` by default):

- ``P answer:<sha256>``: one JSON string per answer (the same fields and key as a row of the SQLite file, so
  ``geoagent cache copy`` moves entries either way), expiring after ``ttl_s`` when set;
- ``P models``: a set of ``[kind, model]`` pairs with answers, for the preflight's "is the cache enough while
  the server is down" question;
- ``P identities``: a hash of the model identities servers last reported.

Lookups are one ``MGET`` per batch of coalesced questions; writes are pipelined. Every command has a timeout
(``[cache] timeout_s``) and at most one reconnection attempt, so a dead server costs seconds, not minutes.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

from geoagent.errors import CacheError
from geoagent.vlm.cache.base import BATCH, CachedAnswer, CacheStats, ResponseCache, StoredEntry, StoredIdentity

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import AuthenticationError, RedisError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError:  # pragma: no cover - the extra is missing: open_cache says how to install it
    aioredis = None


def redact(url: str) -> str:
    """The URL without credentials (a user name is replaced too: it can be half a secret)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _encode(entry: StoredEntry) -> bytes:
    return json.dumps(entry.model_dump(mode="json", exclude={"key"}), ensure_ascii=False, separators=(",", ":")).encode()


def _decode(key: str, raw: bytes) -> StoredEntry:
    return StoredEntry.model_validate({**json.loads(raw), "key": key})


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc``, if one is in its chain of causes."""
    seen: BaseException | None = exc
    for _ in range(8):  # a bounded walk: chains can loop
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class RedisCache(ResponseCache):
    """Answers on a Redis server several processes and machines share."""

    failures = (OSError, ValueError, asyncio.TimeoutError) + ((RedisError,) if aioredis is not None else ())

    def __init__(self, url: str, *, password: str | None, timeout_s: float, ttl_s: int | None, prefix: str) -> None:
        if aioredis is None:
            raise CacheError(f"cache {redact(url)}: a Redis cache needs the redis extra: pip install 'geoagent-vlm[redis]'")
        super().__init__(ttl_s)
        self.url = url
        self.label = redact(url)
        self.prefix = prefix
        self._password = password
        self._timeout_s = timeout_s
        self._clients: dict[asyncio.AbstractEventLoop, Any] = {}  # the asyncio client belongs to one loop

    def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            self._clients[loop] = aioredis.Redis.from_url(
                self.url,
                password=self._password,
                socket_timeout=self._timeout_s,
                socket_connect_timeout=self._timeout_s,
                retry=Retry(NoBackoff(), 1),
            )
        return self._clients[loop]

    def _answer_key(self, key: str) -> str:
        return f"{self.prefix}answer:{key}"

    def problem(self, exc: BaseException) -> str:
        if isinstance(exc, AuthenticationError) or "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            return "the server refused the password (set [cache] password_env to the variable that holds it)"
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)):
            tls_error = _ssl_error(exc)  # redis-py < 5.1 keeps a TLS failure only in the exception's context
            reason = super().problem(tls_error if tls_error is not None else exc)
            tls = self._tls_problem(reason)
            if tls:
                return tls
            return f"cannot reach the Redis server ({reason}); start it, or unset [cache] url to use the local SQLite cache"
        return super().problem(exc)

    def _tls_problem(self, reason: str) -> str | None:
        """What to do when the connection failed over TLS, or a plain connection met a TLS server."""
        ca = parse_qs(urlsplit(self.url).query).get("ssl_ca_certs", [None])[0]
        if "CERTIFICATE_VERIFY_FAILED" in reason:
            where = f"the CA file {ca} does not sign it" if ca else "name the CA that signed it in the URL: ?ssl_ca_certs=/path/to/ca.pem"
            return f"the Redis server's TLS certificate is not trusted ({reason}); {where}"
        if ca and not Path(ca).expanduser().is_file():
            return f"the CA file the URL names (ssl_ca_certs) does not exist: {ca}"
        plain = not self.url.lower().startswith("rediss://")
        if plain and not self.reached and ("reset by peer" in reason or "closed by server" in reason):
            return f"the Redis server closed the connection ({reason}); if it speaks TLS, use a rediss:// URL"
        return None

    async def _check(self) -> None:
        client = self._client()
        await client.ping()
        await client.get(f"{self.prefix}check")  # a read: a server that needs a password refuses it here

    async def _get_many(self, keys: Sequence[str]) -> dict[str, CachedAnswer]:
        values = await self._client().mget([self._answer_key(key) for key in keys])
        found: dict[str, CachedAnswer] = {}
        for key, raw in zip(keys, values):
            if raw is not None:
                entry = _decode(key, raw)
                found[key] = CachedAnswer(answer=entry.answer, usage=entry.usage)
        return found

    async def _put(self, entries: list[StoredEntry]) -> None:
        async with self._client().pipeline(transaction=False) as pipe:
            for entry in entries:
                ttl = None if self.ttl_s is None else max(1, int(entry.created + self.ttl_s - time.time()))
                pipe.set(self._answer_key(entry.key), _encode(entry), ex=ttl)
            pipe.sadd(f"{self.prefix}models", *{json.dumps([e.kind, e.model]) for e in entries})
            await pipe.execute()

    async def _has_answers(self, kind: str, model: str) -> bool:
        return bool(await self._client().sismember(f"{self.prefix}models", json.dumps([kind, model])))

    async def _identity(self, kind: str, url: str, model: str) -> str | None:
        raw = await self._client().hget(f"{self.prefix}identities", json.dumps([kind, url, model]))
        return StoredIdentity.model_validate_json(raw).identity if raw is not None else None

    async def _put_identities(self, identities: list[StoredIdentity]) -> None:
        await self._client().hset(f"{self.prefix}identities", mapping={json.dumps([i.kind, i.url, i.model]): i.model_dump_json() for i in identities})

    async def _identities(self) -> list[StoredIdentity]:
        raw = await self._client().hgetall(f"{self.prefix}identities")
        return [StoredIdentity.model_validate_json(value) for value in raw.values()]

    async def _keys(self) -> AsyncIterator[list[str]]:
        """The answers' keys (sha256s), in batches of up to ``BATCH``."""
        pattern = self._answer_key("*")
        cursor: int | bytes = 0
        while True:
            cursor, found = await self._client().scan(cursor=cursor, match=pattern, count=BATCH)
            if found:
                yield [name.decode()[len(pattern) - 1 :] for name in found]
            if int(cursor) == 0:
                return

    async def _entries(self) -> AsyncIterator[list[StoredEntry]]:
        async for keys in self._keys():
            values = await self._client().mget([self._answer_key(key) for key in keys])
            batch = [_decode(key, raw) for key, raw in zip(keys, values) if raw is not None]
            if batch:
                yield batch

    async def _stats(self) -> CacheStats:
        entries = size = 0
        by_task: dict[str, int] = {}
        by_model: dict[str, int] = {}
        async for keys in self._keys():
            values = await self._client().mget([self._answer_key(key) for key in keys])
            for raw in values:
                if raw is None:  # expired between SCAN and MGET
                    continue
                fields = json.loads(raw)
                entries += 1
                size += len(raw)
                by_task[fields["task"]] = by_task.get(fields["task"], 0) + 1
                label = f"{fields['kind']}:{fields['model']}"
                by_model[label] = by_model.get(label, 0) + 1
        return CacheStats(path=self.label, entries=entries, size_bytes=size, by_task=by_task, by_model=by_model)

    async def _clear(self) -> int:
        removed = 0
        async for keys in self._keys():
            removed += await self._client().unlink(*(self._answer_key(key) for key in keys))
        await self._client().unlink(f"{self.prefix}models")
        return removed

    async def _aclose(self) -> None:
        clients, self._clients = self._clients, {}
        loop = asyncio.get_running_loop()
        for owner, client in clients.items():
            if owner is loop:
                await client.aclose()

