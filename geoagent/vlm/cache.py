"""The response cache: SQLite in WAL mode, safe across coroutines, threads and processes.

Only the key (a sha256), the validated answer, token counts and the model name are stored: never
API keys, headers or URLs. Each write is one transaction, so a crash cannot leave a torn entry.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_random

from geoagent.vlm.types import Usage

CACHE_FILE = "responses.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    task TEXT NOT NULL,
    answer TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_model ON responses (kind, model);
CREATE TABLE IF NOT EXISTS model_identities (
    kind TEXT NOT NULL,
    url TEXT NOT NULL,
    model TEXT NOT NULL,
    identity TEXT NOT NULL,
    seen REAL NOT NULL,
    PRIMARY KEY (kind, url, model)
)
"""


class CachedAnswer(BaseModel):
    answer: dict[str, Any]
    usage: Usage


class CacheStats(BaseModel):
    path: str
    entries: int
    size_bytes: int
    by_task: dict[str, int]
    by_model: dict[str, int]


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 over a canonical JSON rendering of everything that determines an answer."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """Answers keyed by request content. Async methods run SQLite in worker threads."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        self.path = self.directory / CACHE_FILE
        self._lock = threading.Lock()  # one connection, used from worker threads one at a time
        self._conn: sqlite3.Connection | None = None

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
                # Switching to WAL can answer "locked" without waiting while another process holds the file.
                for attempt in Retrying(
                    retry=retry_if_exception_type(sqlite3.OperationalError),
                    stop=stop_after_delay(60),
                    wait=wait_random(0.01, 0.2),
                    reraise=True,
                ):
                    with attempt:
                        conn.execute("PRAGMA journal_mode=WAL")
                        conn.executescript(_SCHEMA)
                conn.execute("PRAGMA synchronous=NORMAL")
                self._conn = conn
            yield self._conn

    def get_sync(self, key: str) -> CachedAnswer | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT answer, prompt_tokens, completion_tokens FROM responses WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        return CachedAnswer(answer=json.loads(row[0]), usage=Usage(prompt_tokens=row[1], completion_tokens=row[2]))

    def put_sync(self, key: str, *, kind: str, model: str, task: str, entry: CachedAnswer) -> None:
        row = (
            key,
            kind,
            model,
            task,
            json.dumps(entry.answer, ensure_ascii=False),
            entry.usage.prompt_tokens,
            entry.usage.completion_tokens,
            time.time(),
        )
        with self._connection() as conn:
            conn.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)

    def has_answers_sync(self, kind: str, model: str) -> bool:
        """Whether any answer of this backend kind and model is cached (a down server may still be enough)."""
        if not self.path.exists():
            return False
        with self._connection() as conn:
            row = conn.execute("SELECT 1 FROM responses WHERE kind = ? AND model = ? LIMIT 1", (kind, model)).fetchone()
        return row is not None

    def identity_sync(self, kind: str, url: str, model: str) -> str | None:
        """The model identity (e.g. an Ollama digest) last seen at ``url``, for keying answers while it is down."""
        if not self.path.exists():
            return None
        with self._connection() as conn:
            row = conn.execute(
                "SELECT identity FROM model_identities WHERE kind = ? AND url = ? AND model = ?", (kind, url, model)
            ).fetchone()
        return row[0] if row else None

    def remember_identity_sync(self, kind: str, url: str, model: str, identity: str) -> None:
        with self._connection() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO model_identities VALUES (?, ?, ?, ?, ?)", (kind, url, model, identity, time.time())
            )

    async def get(self, key: str) -> CachedAnswer | None:
        return await asyncio.to_thread(self.get_sync, key)

    async def put(self, key: str, *, kind: str, model: str, task: str, entry: CachedAnswer) -> None:
        await asyncio.to_thread(self.put_sync, key, kind=kind, model=model, task=task, entry=entry)

    def stats(self) -> CacheStats:
        if not self.path.exists():
            return CacheStats(path=str(self.path), entries=0, size_bytes=0, by_task={}, by_model={})
        with self._connection() as conn:
            entries = conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            by_task = dict(conn.execute("SELECT task, COUNT(*) FROM responses GROUP BY task").fetchall())
            by_model = dict(conn.execute("SELECT kind || ':' || model, COUNT(*) FROM responses GROUP BY 1").fetchall())
        size = sum(p.stat().st_size for p in self.directory.glob(CACHE_FILE + "*"))
        return CacheStats(path=str(self.path), entries=entries, size_bytes=size, by_task=by_task, by_model=by_model)

    def clear(self) -> int:
        """Delete every entry; returns how many there were."""
        if not self.path.exists():
            return 0
        with self._connection() as conn:
            removed = conn.execute("DELETE FROM responses").rowcount
            conn.execute("VACUUM")
        return removed

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
