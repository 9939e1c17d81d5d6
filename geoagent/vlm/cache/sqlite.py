"""The embedded cache: one SQLite file in WAL mode, safe across coroutines, threads and processes of one machine.

Only the key (a sha256), the validated answer, token counts and the model name are stored: never API keys,
headers or URLs. Each write is one transaction, so a crash cannot leave a torn entry. SQLite's WAL mode needs
every process on one host: a cache several machines share belongs on Redis (``[cache] url``).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_random

from geoagent.errors import CacheError
from geoagent.vlm.cache.base import BATCH, CachedAnswer, CacheStats, ResponseCache, StoredEntry, StoredIdentity, expired
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
_COLUMNS = "key, kind, model, task, answer, prompt_tokens, completion_tokens, created"


def _entry(row: Sequence[Any]) -> StoredEntry:
    return StoredEntry(
        key=row[0], kind=row[1], model=row[2], task=row[3], answer=json.loads(row[4]),
        usage=Usage(input_tokens=row[5], output_tokens=row[6]), created=row[7],
    )


class SqliteCache(ResponseCache):
    """The SQLite file ``DIRECTORY/responses.sqlite3``; its calls run in worker threads, one at a time."""

    failures = (sqlite3.Error, OSError, ValueError)  # ValueError: a row that is not JSON

    def __init__(self, directory: str | Path, ttl_s: int | None = None) -> None:
        super().__init__(ttl_s)
        self.directory = Path(directory).expanduser()
        self.path = self.directory / CACHE_FILE
        self.label = str(self.path)
        self._lock = threading.Lock()  # one connection, used from worker threads one at a time
        self._conn: sqlite3.Connection | None = None

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                if self.directory.exists() and not self.directory.is_dir():
                    raise CacheError(
                        f"cache {self.directory}: [cache] dir names a file, not a folder; point it at a folder (or move the file away)"
                    )
                self.directory.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
                try:
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
                    if self.ttl_s is not None:
                        conn.execute("DELETE FROM responses WHERE created < ?", (time.time() - self.ttl_s,))
                except BaseException:
                    conn.close()
                    raise
                self._conn = conn
            yield self._conn

    def problem(self, exc: BaseException) -> str:
        corrupt = isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError)
        if corrupt or "malformed" in str(exc):
            return f"not a usable SQLite cache ({exc}); delete the file (it holds only cached answers, which are asked again)"
        return super().problem(exc)

    def _run(self, query: str, parameters: Sequence[Any] = ()) -> list[Any]:
        with self._connection() as conn:
            return conn.execute(query, parameters).fetchall()

    async def _thread(self, function: Any, *args: Any) -> Any:
        return await asyncio.to_thread(function, *args)

    # --- the store -----------------------------------------------------------------------------------------

    def _check_sync(self) -> None:
        self._run("SELECT key, created FROM responses LIMIT 1")  # reads a page: a file of random bytes fails here

    async def _check(self) -> None:
        await self._thread(self._check_sync)

    def _get_many_sync(self, keys: Sequence[str]) -> dict[str, CachedAnswer]:
        rows = self._run(
            f"SELECT key, answer, prompt_tokens, completion_tokens, created FROM responses WHERE key IN ({','.join('?' * len(keys))})",
            keys,
        )
        return {
            row[0]: CachedAnswer(answer=json.loads(row[1]), usage=Usage(input_tokens=row[2], output_tokens=row[3]))
            for row in rows
            if not expired(row[4], self.ttl_s)
        }

    async def _get_many(self, keys: Sequence[str]) -> dict[str, CachedAnswer]:
        return await self._thread(self._get_many_sync, keys)  # type: ignore[no-any-return]

    def _put_sync(self, entries: list[StoredEntry]) -> None:
        rows = [
            (e.key, e.kind, e.model, e.task, json.dumps(e.answer, ensure_ascii=False), e.usage.input_tokens, e.usage.output_tokens, e.created)
            for e in entries
        ]
        with self._connection() as conn:
            conn.execute("BEGIN")
            try:
                conn.executemany(f"INSERT OR REPLACE INTO responses ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    async def _put(self, entries: list[StoredEntry]) -> None:
        await self._thread(self._put_sync, entries)

    async def _has_answers(self, kind: str, model: str) -> bool:
        if not self.path.exists():
            return False
        rows = await self._thread(self._run, "SELECT 1 FROM responses WHERE kind = ? AND model = ? LIMIT 1", (kind, model))
        return bool(rows)

    async def _identity(self, kind: str, url: str, model: str) -> str | None:
        if not self.path.exists():
            return None
        rows = await self._thread(
            self._run, "SELECT identity FROM model_identities WHERE kind = ? AND url = ? AND model = ?", (kind, url, model)
        )
        return rows[0][0] if rows else None

    def _put_identities_sync(self, identities: list[StoredIdentity]) -> None:
        with self._connection() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO model_identities VALUES (?, ?, ?, ?, ?)",
                [(i.kind, i.url, i.model, i.identity, i.seen) for i in identities],
            )

    async def _put_identities(self, identities: list[StoredIdentity]) -> None:
        await self._thread(self._put_identities_sync, identities)

    async def _identities(self) -> list[StoredIdentity]:
        if not self.path.exists():
            return []
        rows = await self._thread(self._run, "SELECT kind, url, model, identity, seen FROM model_identities")
        return [StoredIdentity(kind=r[0], url=r[1], model=r[2], identity=r[3], seen=r[4]) for r in rows]

    def _stats_sync(self) -> CacheStats:
        if not self.path.exists():
            if self.directory.exists() and not self.directory.is_dir():
                self._check_sync()  # the folder is a file: say so
            return CacheStats(path=str(self.path), entries=0, size_bytes=0, by_task={}, by_model={})
        entries = self._run("SELECT COUNT(*) FROM responses")[0][0]
        by_task = dict(self._run("SELECT task, COUNT(*) FROM responses GROUP BY task"))
        by_model = dict(self._run("SELECT kind || ':' || model, COUNT(*) FROM responses GROUP BY 1"))
        size = sum(p.stat().st_size for p in self.directory.glob(CACHE_FILE + "*"))
        return CacheStats(path=str(self.path), entries=entries, size_bytes=size, by_task=by_task, by_model=by_model)

    async def _stats(self) -> CacheStats:
        return await self._thread(self._stats_sync)  # type: ignore[no-any-return]

    def _clear_sync(self) -> int:
        if not self.path.exists():
            return 0
        with self._connection() as conn:
            removed = conn.execute("DELETE FROM responses").rowcount
            conn.execute("VACUUM")
        return int(removed)

    async def _clear(self) -> int:
        return await self._thread(self._clear_sync)  # type: ignore[no-any-return]

    async def _entries(self) -> AsyncIterator[list[StoredEntry]]:
        if not self.path.exists():
            return
        last = 0
        while True:
            rows = await self._thread(
                self._run, f"SELECT rowid, {_COLUMNS} FROM responses WHERE rowid > ? ORDER BY rowid LIMIT ?", (last, BATCH)
            )
            if not rows:
                return
            last = rows[-1][0]
            yield [_entry(row[1:]) for row in rows]

    async def _aclose(self) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


#: Filesystem types (as /proc/mounts names them) on which SQLite's locking, and so its WAL mode, is unsafe.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
    "fuse.sshfs", "fuse.ceph", "fuse.cephfs", "fuse.glusterfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.rclone",
})


def filesystem_type(path: Path, mounts: str) -> str | None:
    """The type of the filesystem ``path`` (or its nearest existing parent) lies on, from /proc/mounts text;
    None when no mount covers it."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    path = path.resolve()
    best: tuple[int, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(fields[1].encode().decode("unicode_escape"))  # /proc/mounts writes a space as \040
        if (path == point or point in path.parents) and (best is None or len(point.parts) > best[0]):
            best = (len(point.parts), fields[2])
    return best[1] if best else None


def cache_filesystem(directory: Path) -> str | None:
    """The filesystem type of an SQLite cache folder on this machine (None: unknown, e.g. not Linux)."""
    try:
        mounts = Path("/proc/mounts").read_text(errors="replace")
    except OSError:
        return None
    return filesystem_type(directory, mounts)
