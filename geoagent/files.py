"""Files written whole or not at all: a temporary file beside the target, fsynced, renamed over it, the folder
fsynced. A crash leaves the old file or the new one, never half of one (and no stray temporary file on errors).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO

NEW_FILE_MODE = 0o666  # before the umask, as open() creates files: outputs are as readable as any other file


def write_atomic(target: Path, content: bytes | str | Callable[[IO[str]], object]) -> Path:
    """Write ``target`` all or nothing: ``content`` as bytes, as UTF-8 text, or written by ``content(text_file)``.

    Raises OSError; callers name the file in their own words.
    """
    temp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
    try:
        if isinstance(content, bytes):
            with os.fdopen(fd, "wb") as binary:
                binary.write(content)
                binary.flush()
                os.fsync(binary.fileno())
        else:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as text:
                if isinstance(content, str):
                    text.write(content)
                else:
                    content(text)
                text.flush()
                os.fsync(text.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def fsync_dir(directory: Path) -> None:
    """Make a folder's entries (a new or renamed file) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
