"""The batch journal: an append-only JSON Lines file, one line per photo, the single source of truth for resume.

A line is a photo's ``LocateResult`` JSON, or ``{"image": PATH, "error": MESSAGE}`` for a photo that failed;
``image`` comes first in both. A photo's key is its ``image``, or, for a name that is not shown as it is (see
:mod:`geoagent.batch.inputs`), the bytes of its path in ``image_bytes``, the second field. Each line is written
with one ``write`` and fsynced before the next photo's, so a crash (``kill -9``, power loss, Ctrl-C) leaves every
finished photo on disk and at most one torn last line — or a zero-filled tail, where a filesystem grew the file
but lost the data on power loss — which opening cuts off (that photo is redone). Only newline-terminated lines
count. The file is created with its first line: a batch that fails before any leaves no journal behind.

A later line for the same key supersedes an earlier one (``--retry-failed`` appends the new outcome of a photo
that had failed); :meth:`Journal.compact` then rewrites the file atomically with one line per photo.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from geoagent import files
from geoagent.batch.inputs import RAW_FIELD, RAW_KEY, BatchInputError, raw_bytes
from geoagent.paths import display_path, os_error_reason

LINE_START = b'{"image":'  # how every journal line begins (LocateResult's first field, and failures by design)
ZERO_CHUNK = 1 << 16  # bytes read at a time when checking that a tail is all zeros

try:
    import fcntl
except ImportError:  # Windows: no advisory lock; two batches on one journal are the user's to avoid
    fcntl = None  # type: ignore[assignment]


class Journal:
    """An open journal: what it holds (key -> whether the photo failed), appending and compaction.

    Open it with :meth:`open`; it holds an exclusive lock on the file until :meth:`close`, so two batches
    never write one journal. A journal that does not exist yet is created (and locked) by its first line.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._size = 0
        self._lines = 0
        self._last_line: dict[str, int] = {}  # key -> number (0-based) of its latest line: that line counts
        self._failed: set[str] = set()  # keys whose latest line is a failure
        self._legacy: set[str] = set()  # keys of lines an older GeoAgent keyed by a shown path that may not be the name
        self._claimed: set[str] = set()  # legacy keys a photo of this run was matched to
        self.superseded = 0  # lines a later line of the same key replaces (compaction drops them)
        self.torn_bytes = 0  # the size of the torn last line cut off when opening (0: none)
        self._write_lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> Journal:
        """Open the journal at ``path``, lock it, read what it holds and cut off a torn last line; a journal not
        there yet is only checked to be writable (its first :meth:`record` creates it)."""
        shown = display_path(path)
        if path.is_dir():
            raise BatchInputError(f"{shown}: a folder; --out names the file to write")
        if not os.path.lexists(path):
            _check_creatable(path)
            return cls(path, -1)
        if path.exists() and not path.is_file():  # a FIFO or a device: reading it could block for ever
            raise BatchInputError(f"{shown}: not a regular file; --out names the journal file to write")
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except OSError as exc:
            raise BatchInputError(f"{shown}: cannot write the journal ({os_error_reason(exc)})") from None
        journal = cls(path, fd)
        try:
            journal._lock()
            journal._read()
        except BaseException:
            os.close(fd)
            raise
        return journal

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the lock
            self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what it holds ---------------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self._last_line

    def __len__(self) -> int:
        return len(self._last_line)

    def failed(self, key: str) -> bool:
        return key in self._failed

    @property
    def failed_keys(self) -> frozenset[str]:
        return frozenset(self._failed)

    def key_for(self, key: str, image: str) -> str:
        """The key under which the journal holds the photo keyed ``key`` and shown as ``image``: ``key``, or
        the shown path for a line written before photos were keyed by their bytes (each such line is matched to
        the first photo of this run claiming it: the one the older run located, the next it counted as named
        twice)."""
        if key in self._last_line or raw_bytes(key) is None or image not in self._legacy or image in self._claimed:
            return key
        self._claimed.add(image)
        return image

    def drop(self, keys: set[str] | frozenset[str]) -> None:
        """Forget these photos (their lines go at the next :meth:`compact`)."""
        for key in keys & self._last_line.keys():
            del self._last_line[key]
            self._failed.discard(key)
            self.superseded += 1

    @property
    def failures(self) -> int:
        return len(self._failed)

    @property
    def located(self) -> int:
        return len(self._last_line) - len(self._failed)

    def entries(self) -> Iterator[dict[str, Any]]:
        """Each photo's latest line, parsed, in file order (a superseded or dropped line is skipped), read as
        they are used: the journal is never held in memory whole."""
        if self._fd < 0:
            return
        for number, (key, _raw, entry) in enumerate(self._scan()):
            if self._last_line.get(key) == number:
                yield entry

    # --- writing ---------------------------------------------------------------------------------------

    def record(self, key: str, line: str, failed: bool) -> None:
        """Append one photo's line and fsync it (blocking: call it from a worker thread in async code).

        A write that fails half-way (disk full) is cut back, so the next line never lands glued to a torn one.
        """
        data = line.encode("utf-8") + b"\n"
        if not data.startswith(LINE_START) or data.count(b"\n") != 1:
            raise ValueError(f"not a journal line: {line[:80]!r}")
        with self._write_lock:
            if self._fd < 0:
                self._create()
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
                os.fsync(self._fd)
            except OSError as exc:
                os.ftruncate(self._fd, self._size)
                raise BatchInputError(f"{display_path(self.path)}: cannot write the journal ({os_error_reason(exc)})") from None
            self._size += len(data)
            self._note(key, failed)

    def compact(self) -> bool:
        """Rewrite the journal with each photo's latest line only (atomically: a temp file, fsynced, replaces
        it). True when there was something to drop."""
        if not self.superseded:
            return False
        kept = (raw.decode("utf-8") for number, (key, raw, _entry) in enumerate(self._scan()) if self._last_line.get(key) == number)
        write_atomic(self.path, lambda fh: fh.writelines(kept))
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        os.close(self._fd)
        self._fd = fd
        self._lock()
        self._reset()
        self._read()
        return True

    # --- internals -------------------------------------------------------------------------------------

    def _create(self) -> None:
        """Create the file for its first line (never over one another batch created meanwhile) and lock it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except FileExistsError:
            raise BatchInputError(f"{display_path(self.path)}: another geoagent batch is writing this journal") from None
        except OSError as exc:
            raise BatchInputError(f"{display_path(self.path)}: cannot write the journal ({os_error_reason(exc)})") from None
        self._fd = fd
        self._lock()
        files.fsync_dir(self.path.parent)  # the new file's name survives a crash too

    def _lock(self) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BatchInputError(f"{display_path(self.path)}: another geoagent batch is writing this journal") from None

    def _reset(self) -> None:
        self._size = self._lines = self.superseded = 0
        self._last_line.clear()
        self._failed.clear()
        self._legacy.clear()

    def _note(self, key: str, failed: bool) -> None:
        if key in self._last_line:
            self.superseded += 1
        self._last_line[key] = self._lines
        self._lines += 1
        (self._failed.add if failed else self._failed.discard)(key)

    def _read(self) -> None:
        """Learn what the journal holds; cut off a torn last line (one not ended by a newline)."""
        for _ in self._scan(note=True):
            pass
        end = os.fstat(self._fd).st_size
        if end > self._size:
            with open(self.path, "rb") as fh:
                fh.seek(self._size)
                tail = fh.read(len(LINE_START))
                fh.seek(self._size)
                zeros = _all_zeros(fh)
            if not (tail.startswith(LINE_START) or LINE_START.startswith(tail) or zeros):
                raise BatchInputError(
                    f"{display_path(self.path)} line {self._lines + 1}: not a geoagent batch journal (--out names a journal to resume, or a new file)"
                )
            os.fsync(self._fd)
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
            self.torn_bytes = end - self._size

    def _scan(self, note: bool = False) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
        """(key, raw line, entry) for every complete line, in order; a line that is not a journal line is an error
        naming it. With ``note``, what the journal holds is learnt on the way."""
        with open(self.path, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                if not raw.endswith(b"\n"):
                    return  # a torn last line: not part of the journal
                entry = _parse(raw)
                if entry is None:
                    raise BatchInputError(
                        f"{display_path(self.path)} line {number}: not a geoagent batch journal line "
                        "(--out names a journal to resume, or a new file)"
                    )
                key = entry_key(entry)
                if note:
                    self._size += len(raw)
                    self._note(key, "error" in entry)
                    if RAW_FIELD not in entry and "\\" in key:
                        self._legacy.add(key)
                yield key, raw, entry


def _parse(raw: bytes) -> dict[str, Any] | None:
    if not raw.startswith(LINE_START):
        return None
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not isinstance(entry.get(RAW_FIELD, ""), str):
        return None
    return entry


def entry_key(entry: dict[str, Any]) -> str:
    """The key of a parsed journal line: its path's bytes where it keeps them, else its ``image``."""
    raw = entry.get(RAW_FIELD)
    return entry["image"] if raw is None else RAW_KEY + raw


def keyed_line(key: str, body: str) -> str:
    """A journal line from ``body`` (a JSON object whose first field is ``image``): ``body`` itself, or with
    ``image_bytes`` second when ``key`` holds the path's bytes."""
    raw = raw_bytes(key)
    if raw is None:
        return body
    entry = json.loads(body)
    return json.dumps({"image": entry.pop("image"), RAW_FIELD: raw, **entry}, ensure_ascii=False, separators=(",", ":"))


def _all_zeros(fh: IO[bytes]) -> bool:
    """True when the rest of ``fh`` is NUL bytes only: space a filesystem gave the file, data lost on power loss."""
    while chunk := fh.read(ZERO_CHUNK):
        if chunk.count(0) != len(chunk):
            return False
    return True


def _check_creatable(path: Path) -> None:
    """Fail now, not at the first photo, when the journal could not be created: its nearest existing folder
    is no folder or cannot be written."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise BatchInputError(f"{display_path(path)}: cannot write the journal ({display_path(folder)} is not a folder)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BatchInputError(f"{display_path(path)}: cannot write the journal (permission denied)")


def write_atomic(target: Path, write: Callable[[IO[str]], object]) -> Path:
    """Write ``target`` through ``write(text_file)`` all or nothing (:func:`geoagent.files.write_atomic`)."""
    try:
        return files.write_atomic(target, write)
    except OSError as exc:
        raise BatchInputError(f"{display_path(target)}: cannot write ({os_error_reason(exc)})") from None


def failure_line(key: str, message: str, image: str | None = None) -> str:
    """The journal line of a photo that failed (compact, ``image`` first, as every journal line; ``image``
    defaults to the key)."""
    return keyed_line(key, json.dumps({"image": key if image is None else image, "error": message}, ensure_ascii=False, separators=(",", ":")))
