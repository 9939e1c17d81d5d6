"""Receiving a photo: streamed to disk inside a per-request temporary folder, size-capped as it arrives, and
accepted only if Pillow identifies it as an image within the pixel limit (its content decides, never its name
or content type). Only the header is read here: the agent decodes the photo once, when it locates it."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from PIL import Image, UnidentifiedImageError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from geoagent.errors import GeoAgentError
from geoagent.paths import display_path

FIELD = "photo"  # the multipart field that carries the photo
FOLDER_PREFIX = "geoagent-upload-"
FORM_OVERHEAD_BYTES = 64 * 1024  # boundaries, part headers and small fields allowed beyond the photo itself
DISCARD_AT_MOST_BYTES = 128 * 1024 * 1024  # an oversized body is read and dropped up to this much, so the client
# reads the 413 instead of a reset connection; past it the connection is simply closed
MAX_NAME_CHARS = 200  # the client's file name is kept as a label only, cut to this length
STORED_NAME = "photo"  # the name the upload gets inside its folder (the client's name never touches the disk)


class UploadError(Exception):
    """A request the server refuses: an HTTP status and a message fit to show the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    """The received photo: where it lies (inside the request's folder) and the name the client gave it."""

    path: Path
    name: str


@asynccontextmanager
async def upload_folder() -> AsyncIterator[Path]:
    """A fresh temporary folder for one request, removed with everything in it on the way out (errors and
    cancellation included)."""
    folder = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=FOLDER_PREFIX))
    try:
        yield folder
    finally:  # shielded: a cancelled request still removes its files
        await asyncio.shield(asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True))


@dataclass
class _FormReader:
    """python-multipart callbacks: the ``photo`` part is written to ``target``, every other part dropped."""

    target: Path
    max_bytes: int
    name: str | None = None  # the photo's client-side file name, once its part began
    received: int = 0
    too_large: bool = False
    _headers: dict[str, str] = field(default_factory=dict)
    _field: bytes = b""
    _value: bytes = b""
    _file: IO[bytes] | None = None
    _in_photo: bool = False

    def parser(self, boundary: bytes) -> MultipartParser:
        return MultipartParser(boundary, {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._data, "on_part_end": self._part_end,
        })  # fmt: skip

    def _part_begin(self) -> None:
        self._headers, self._field, self._value = {}, b"", b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value.decode("utf-8", "replace")
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get("content-disposition", ""))
        self._in_photo = params.get(b"name") == FIELD.encode() and self.name is None
        if self._in_photo:
            self.name = params.get(b"filename", b"").decode("utf-8", "replace") or STORED_NAME
            self._file = self.target.open("wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if not self._in_photo or self.too_large or self._file is None:
            return
        self.received += end - start
        if self.received > self.max_bytes:
            self.too_large = True
            self._file.close()
            self.target.unlink(missing_ok=True)
            return
        self._file.write(data[start:end])

    def _part_end(self) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._in_photo = False


def _limit_text(max_bytes: int) -> str:
    return f"the photo is larger than the {max_bytes / 1e6:g} MB upload limit"


async def receive_photo(request: Request, folder: Path, max_bytes: int) -> Upload:
    """The multipart field ``photo`` of ``request``, written to ``folder`` as it streams in; UploadError when the
    request is not a form, has no photo, is too large (checked while it arrives) or is not an image."""
    kind, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UploadError(415, f"send the photo as multipart/form-data in the field '{FIELD}'")
    body_limit = max_bytes + FORM_OVERHEAD_BYTES
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DISCARD_AT_MOST_BYTES:
        raise UploadError(413, _limit_text(max_bytes))  # too big to even read and drop: answer at once
    reader = _FormReader(folder / STORED_NAME, max_bytes)
    parser = reader.parser(boundary)
    read = 0
    try:
        async for chunk in request.stream():
            read += len(chunk)
            if read > DISCARD_AT_MOST_BYTES:
                break
            if read <= body_limit and not reader.too_large:
                await asyncio.to_thread(parser.write, chunk)
        else:
            if read <= body_limit and not reader.too_large:
                await asyncio.to_thread(parser.finalize)
    except ClientDisconnect:
        raise UploadError(400, "the upload was interrupted") from None
    except ValueError as exc:  # python-multipart's malformed-body errors derive from ValueError
        raise UploadError(400, f"malformed multipart form ({exc})") from None
    finally:
        await asyncio.to_thread(reader.close)
    if reader.too_large or read > body_limit:
        raise UploadError(413, _limit_text(max_bytes))
    if reader.name is None:
        raise UploadError(400, f"no photo: the form has no file in the field '{FIELD}'")
    name = _label(reader.name)
    if reader.received == 0:
        raise UploadError(400, f"{name}: empty file")
    await asyncio.to_thread(_check_image, reader.target, name)
    return Upload(reader.target, name)


def _label(client_name: str) -> str:
    """The client's file name as a printable label: its last component only, never used as a path."""
    base = client_name.replace("\\", "/").rsplit("/", 1)[-1] or STORED_NAME
    return display_path(base)[:MAX_NAME_CHARS]


def _check_image(path: Path, name: str) -> None:
    """Accept what Pillow identifies (header only, no pixels decoded) within the pixel limit: 415 for what is
    not an image, 422 for an image refused for its size (a decompression bomb), however Pillow or GeoAgent
    says so. A corrupt body past the header is the agent's to find when it decodes (also a 422)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UploadError(415, f"{name}: not an image (its content is checked, not its name or content type)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, GeoAgentError):  # Pillow's refusal, or ours
        raise UploadError(422, _too_many_pixels(name)) from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise UploadError(422, _too_many_pixels(name, f"{width}x{height}, over the limit of {limit:,} pixels"))


def _too_many_pixels(name: str, detail: str = "") -> str:
    return f"{name}: refused: too many pixels (possible decompression bomb{'; ' + detail if detail else ''})"
