"""What a batch reads: a folder of photos (recursive), a CSV with a ``path`` column, or a text file of paths,
one line each. Read lazily, one item at a time, so the input's size never decides the memory used.

Every item carries a stable key made from its absolute path, so a rerun knows which photos are done whatever the
working folder, and the path as :func:`~geoagent.paths.display_path` shows it (``image`` in every output). For
most names the two are the same text. A name whose shown form is not the name itself (bytes that are not UTF-8, a
control character, a backslash: ``a\xff.jpg`` is shown alike for the byte and for the four characters) is keyed
by its bytes instead, so no two photos ever share a key.
"""

from __future__ import annotations

import base64
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
RAW_KEY = "\0"  # starts the key of a photo keyed by its path's bytes (no shown path holds a NUL)
RAW_FIELD = "image_bytes"  # the journal field holding those bytes, base64 (URL-safe), after ``image``


def photo_key(path: str | os.PathLike[str]) -> str:
    """The journal key of a photo at ``path`` (absolute): the path itself when it is shown as it is, else
    :data:`RAW_KEY` and its bytes in base64, lossless whatever the name holds."""
    text = os.fspath(path)
    if display_path(text) == text and ("\\" not in text or os.sep == "\\"):
        return text
    return RAW_KEY + base64.urlsafe_b64encode(os.fsencode(text)).decode("ascii")


def raw_bytes(key: str) -> str | None:
    """The base64 path bytes a key holds (the journal's ``image_bytes``), None for a key that is the path."""
    return key[len(RAW_KEY) :] if key.startswith(RAW_KEY) else None


class BatchInputError(InputError):
    """INPUT or --out cannot be used at all: a usage error (exit 2), unlike one bad photo inside INPUT."""

    exit_code = 2
    per_item = False


@dataclass(frozen=True)
class BatchItem:
    """One photo to locate: its journal key, its absolute path, why it cannot be located when the input
    already says so (a CSV row without a path: such an item is journalled as failed, never located), and how
    outputs name it (``shown``; None: the key is the name)."""

    key: str
    path: Path | None
    problem: str | None = None
    shown: str | None = None

    @classmethod
    def of(cls, path: Path) -> BatchItem:
        absolute = Path(os.path.abspath(path))  # lexically: a symlink is its own photo, not its target
        return cls(photo_key(absolute), absolute, shown=display_path(absolute))

    @property
    def image(self) -> str:
        """The photo as outputs and messages name it."""
        return self.key if self.shown is None else self.shown

    @property
    def error(self) -> str:
        """The line the journal records for an item with a problem."""
        return f"{self.image}: {self.problem}"


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

    def nothing_to_do(self) -> str:
        """What to say when INPUT names no photo at all (a usage error: most likely the wrong folder or file)."""
        shown = display_path(self.source)
        if self.kind == "folder":
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            return f"{shown}: no photos in this folder or its subfolders (looked for {suffixes})"
        if self.kind == "csv":
            return f"{shown}: no rows (a CSV INPUT names its photos in a {PATH_COLUMN} column, one a row)"
        return f"{shown}: no paths (a text file of paths names one photo a line; # starts a comment)"

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
