"""What a batch reads: a folder of photos (recursive), a CSV with a ``path`` column, or a text file of paths,
one line each. Read lazily, one item at a time, so the input's size never decides the memory used.

Every item carries a stable key, its absolute path as :func:`~geoagent.paths.display_path` shows it: the
journal names a photo by it, so a rerun knows which photos are done whatever the working folder.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from geoagent.errors import InputError
from geoagent.images import IMAGE_SUFFIXES
from geoagent.paths import display_path, is_displayable, os_error_reason

PATH_COLUMN = "path"
COMMENT = "#"  # a line of a text file of paths starting with it is skipped
SNIFF_BYTES = 8192  # how much of a text file is checked for NUL bytes (a binary file given by mistake)
NOT_UTF8_ROW = "not valid UTF-8 (save the CSV as UTF-8)"


class BatchInputError(InputError):
    """INPUT or --out cannot be used at all: a usage error (exit 2), unlike one bad photo inside INPUT."""

    exit_code = 2
    per_item = False


@dataclass(frozen=True)
class BatchItem:
    """One photo to locate: its journal key, its absolute path, and why it cannot be located when the input
    already says so (a CSV row without a path): such an item is journalled as failed, never located."""

    key: str
    path: Path | None
    problem: str | None = None

    @classmethod
    def of(cls, path: Path) -> BatchItem:
        absolute = Path(os.path.abspath(path))  # lexically: a symlink is its own photo, not its target
        return cls(display_path(absolute), absolute)

    @property
    def error(self) -> str:
        """The line the journal records for an item with a problem."""
        return f"{self.key}: {self.problem}"


class BatchInput:
    """INPUT, checked at once (it exists, it is a folder, a CSV with a path column, or text), read lazily."""

    def __init__(self, source: Path) -> None:
        self.source = source
        shown = display_path(source)
        if source.is_dir():
            self.kind = "folder"
        elif not source.exists():
            raise BatchInputError(f"{shown}: no such folder or file (INPUT: a folder of photos, a CSV with a path column, or a text file of paths)")
        elif not source.is_file():  # a FIFO or device: reading it could block forever, and it is read twice
            raise BatchInputError(f"{shown}: not a regular file (INPUT: a folder of photos, a CSV with a path column, or a text file of paths)")
        elif source.suffix.lower() in IMAGE_SUFFIXES:
            raise BatchInputError(f"{shown}: a photo; batch takes a folder, a CSV or a text file of paths (or use `geoagent locate`)")
        elif source.suffix.lower() == ".csv":
            self.kind = "csv"
            self._check_csv_header()
        else:
            self.kind = "list"
            self._check_text()

    def items(self) -> Iterator[BatchItem]:
        """The photos, in a stable order (a folder: sorted names, depth first)."""
        return {"folder": self._folder, "csv": self._csv, "list": self._list}[self.kind]()

    def count(self) -> int:
        """How many items :meth:`items` yields, counted without building them (for the progress bar's total)."""
        if self.kind == "folder":
            return sum(1 for _ in self._photo_files())
        if self.kind == "csv":
            with self._open_text() as fh:
                return sum(1 for _ in csv.reader(fh)) - 1
        with self._open_text() as fh:
            return sum(1 for line in fh if _listed(line))

    # --- folders ---------------------------------------------------------------------------------------

    def _photo_files(self) -> Iterator[Path | BatchItem]:
        """Photo files by suffix under the folder, or an item naming a subfolder that cannot be listed."""
        unlisted: list[OSError] = []
        for directory, subdirs, files in os.walk(self.source, onerror=unlisted.append):
            while unlisted:
                exc = unlisted.pop()
                where = Path(exc.filename) if exc.filename else Path(directory)
                yield BatchItem(display_path(os.path.abspath(where)), None, f"cannot list this folder ({os_error_reason(exc)})")
            subdirs.sort()
            for name in sorted(files):
                if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                    yield Path(directory, name)
        for exc in unlisted:  # the top folder itself
            yield BatchItem(display_path(os.path.abspath(self.source)), None, f"cannot list this folder ({os_error_reason(exc)})")

    def _folder(self) -> Iterator[BatchItem]:
        for entry in self._photo_files():
            yield entry if isinstance(entry, BatchItem) else BatchItem.of(entry)

    # --- CSV -------------------------------------------------------------------------------------------

    def _open_text(self) -> TextIO:
        try:
            # surrogateescape: a name that is not UTF-8 keeps its bytes (it is a valid file name on POSIX)
            return self.source.open(newline="" if self.kind == "csv" else None, encoding="utf-8-sig", errors="surrogateescape")
        except OSError as exc:
            raise BatchInputError(f"{display_path(self.source)}: cannot read ({os_error_reason(exc)})") from None

    def _check_csv_header(self) -> None:
        with self._open_text() as fh:
            try:
                header = next(csv.reader(fh), [])
            except csv.Error as exc:
                raise BatchInputError(f"{display_path(self.source)} line 1: not a readable CSV ({exc}); is it UTF-8 text?") from None
        if PATH_COLUMN not in (cell.strip() for cell in header):
            raise BatchInputError(f"{display_path(self.source)}: no '{PATH_COLUMN}' column (a CSV INPUT names its photos in a path column)")

    def _csv(self) -> Iterator[BatchItem]:
        base = self.source.parent
        with self._open_text() as fh:
            reader = csv.DictReader(fh)
            reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
            line = 1
            try:
                for cells in reader:
                    line = reader.line_num
                    where = f"{display_path(os.path.abspath(self.source))} line {line}"
                    value = (cells.get(PATH_COLUMN) or "").strip()
                    if not all(is_displayable(cell) for cell in cells.values() if isinstance(cell, str)):
                        yield BatchItem(where, None, NOT_UTF8_ROW)
                    elif not value:
                        yield BatchItem(where, None, f"no {PATH_COLUMN} in this row")
                    else:
                        yield BatchItem.of(base / value)
            except csv.Error as exc:
                raise BatchInputError(f"{display_path(self.source)} line {line}: not a readable CSV ({exc})") from None

    # --- text files of paths ---------------------------------------------------------------------------

    def _check_text(self) -> None:
        try:
            with self.source.open("rb") as fh:
                head = fh.read(SNIFF_BYTES)
        except OSError as exc:
            raise BatchInputError(f"{display_path(self.source)}: cannot read ({os_error_reason(exc)})") from None
        if b"\0" in head:
            raise BatchInputError(f"{display_path(self.source)}: not a text file of paths (it holds NUL bytes)")

    def _list(self) -> Iterator[BatchItem]:
        base = self.source.parent
        with self._open_text() as fh:
            for line in fh:
                if _listed(line):
                    yield BatchItem.of(base / line.strip())


def _listed(line: str) -> bool:
    """A line of a text file of paths that names a photo (not blank, not a comment)."""
    text = line.strip()
    return bool(text) and not text.startswith(COMMENT)
