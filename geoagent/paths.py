"""User-supplied paths: shown safely whatever bytes their names hold, and what is wrong with them in words.

A file name is bytes on POSIX; Python decodes the bytes that are not UTF-8 to lone surrogates, which
cannot be printed or written as JSON. :func:`display_path` is the one way a path reaches output.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

NOT_UTF8_NAME = "file name is not valid UTF-8 (rename the file)"
NUL_IN_PATH = "not a valid path (it holds a NUL byte)"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0 and C1 control characters: they would break a line


def display_path(path: str | os.PathLike[str]) -> str:
    """``path`` as printable, JSON-safe text on one line: bytes that are not UTF-8 appear as ``\\xNN`` and
    control characters (a newline in a name, say) as escapes; every other name is unchanged."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode(), text)


def is_displayable(path: str | os.PathLike[str]) -> bool:
    """True when the name is valid UTF-8, so it round-trips through JSON and the terminal as it is."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def os_error_reason(exc: OSError, path: Path | None = None) -> str:
    """A short, path-free reason for a failed file operation ("permission denied", "symlink loop", ...)."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno == errno.ENOENT:
        return "broken symlink (its target is missing)" if path is not None and path.is_symlink() else "file not found"
    if exc.errno == errno.EISDIR:
        return "a folder, not a photo"
    return (exc.strerror or type(exc).__name__).lower()


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a photo, or None when it is a regular file with a printable name."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return os_error_reason(exc, path)
    if stat.S_ISDIR(mode):
        return "a folder, not a photo"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return None if is_displayable(path) else NOT_UTF8_NAME


def photo_problem(path: Path) -> str | None:
    """Why ``path`` cannot be opened as a photo, found without decoding it (cheap: checked before any model
    loads), or None. A name that is not UTF-8 is no problem here: the photo is shown with :func:`display_path`."""
    problem = file_problem(path)
    if problem is not None and problem != NOT_UTF8_NAME:
        return problem
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with path.open("rb"):
            pass
    except OSError as exc:
        return os_error_reason(exc, path)
    return None


def resolve(path: Path) -> tuple[Path | None, str | None]:
    """``path`` made absolute with links followed, or None and why not (a symlink loop, say)."""
    try:
        return path.resolve(), None
    except RuntimeError:  # Python < 3.13 raises RuntimeError on a symlink loop
        return None, "symlink loop"
    except OSError as exc:
        return None, os_error_reason(exc, path)
    except ValueError:
        return None, NUL_IN_PATH
