"""The batch journal: an append-only JSON Lines file, one line per photo, the single source of truth for resume.

A line is a photo's ``LocateResult`` JSON, or ``{"image": KEY, "error": MESSAGE}`` for a photo that failed;
``image`` comes first in both and is the photo's key. Each line is written with one ``write`` and fsynced
before the next photo's, so a crash (``kill -9``, power loss, Ctrl-C) leaves every finished photo on disk and
at most one torn last line, which opening cuts off (that photo is redone). Only newline-terminated lines count.

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
from geoagent.batch.inputs import BatchInputError
from geoagent.paths import display_path, os_error_reason

LINE_START = b'{"image":'  # how every journal line begins (LocateResult's first field, and failures by design)

try:
    import fcntl
except ImportError:  # Windows: no advisory lock; two batches on one journal are the user's to avoid
    fcntl = None  # type: ignore[assignment]


class Journal:
    """An open journal: what it holds (key -> whether the photo failed), appending and compaction.

    Open it with :meth:`open`; it holds an exclusive lock on the file until :meth:`close`, so two batches
    never write one journal.
    """

    def __init__(self, path: Path, fd: int, created: bool = False) -> None:
        self.path = path
        self._fd = fd
        self._created = created  # this open made the file (a failed run then leaves none behind)
        self._size = 0
        self._lines = 0
        self._last_line: dict[str, int] = {}  # key -> number (0-based) of its latest line: that line counts
        self._failed: set[str] = set()  # keys whose latest line is a failure
        self.superseded = 0  # lines a later line of the same key replaces (compaction drops them)
        self.torn_bytes = 0  # the size of the torn last line cut off when opening (0: none)
        self._write_lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> Journal:
        """Open or create the journal at ``path``, lock it, read what it holds and cut off a torn last line."""
        shown = display_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            created = not path.exists()
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except IsADirectoryError:
            raise BatchInputError(f"{shown}: a folder; --out names the file to write") from None
        except OSError as exc:
            raise BatchInputError(f"{shown}: cannot write the journal ({os_error_reason(exc)})") from None
        journal = cls(path, fd, created)
        try:
            journal._lock()
            if created:
                files.fsync_dir(path.parent)  # the new file's name survives a crash too
            journal._read()
        except BaseException:
            os.close(fd)
            raise
        return journal

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the lock
            self._fd = -1

    def discard_if_unused(self) -> bool:
        """Delete the file when this open created it and nothing was written to it (a run that failed before its
        first photo leaves no empty journal behind); True if it did."""
        if not self._created or self._size or self._fd < 0:
            return False
        self.path.unlink(missing_ok=True)
        files.fsync_dir(self.path.parent)
        self.close()
        return True

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
    def failures(self) -> int:
        return len(self._failed)

    @property
    def located(self) -> int:
        return len(self._last_line) - len(self._failed)

    def entries(self) -> Iterator[dict[str, Any]]:
        """Each photo's latest line, parsed, in file order (a superseded line is skipped)."""
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
        kept = (raw.decode("utf-8") for number, (key, raw, _entry) in enumerate(self._scan()) if self._last_line[key] == number)
        write_atomic(self.path, lambda fh: fh.writelines(kept))
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        os.close(self._fd)
        self._fd = fd
        self._lock()
        self._reset()
        self._read()
        return True

    # --- internals -------------------------------------------------------------------------------------

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
            if not (tail.startswith(LINE_START) or LINE_START.startswith(tail)):
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
                if note:
                    self._size += len(raw)
                    self._note(entry["image"], "error" in entry)
                yield entry["image"], raw, entry


def _parse(raw: bytes) -> dict[str, Any] | None:
    if not raw.startswith(LINE_START):
        return None
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("image"), str) else None


def write_atomic(target: Path, write: Callable[[IO[str]], object]) -> Path:
    """Write ``target`` through ``write(text_file)`` all or nothing (:func:`geoagent.files.write_atomic`)."""
    try:
        return files.write_atomic(target, write)
    except OSError as exc:
        raise BatchInputError(f"{display_path(target)}: cannot write ({os_error_reason(exc)})") from None


def failure_line(key: str, message: str) -> str:
    """The journal line of a photo that failed (compact, ``image`` first, as every journal line)."""
    return json.dumps({"image": key, "error": message}, ensure_ascii=False, separators=(",", ":"))
