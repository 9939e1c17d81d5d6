"""Safe image loading: guard against junk, honour EXIF orientation, normalise mode, downscale, encode once."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, ParamSpec, TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from geoagent.errors import InputError
from geoagent.paths import display_path, os_error_reason
from geoagent.vlm.types import EncodedImage, ImageRole

# Pillow's complaints about optional TIFF/EXIF tags are noise to a user (the photo still opens). Filters are
# process-wide and warnings.catch_warnings is not thread-safe, so this one is installed once, here. Pillow's
# DecompressionBombWarning is NOT filtered: every decode path here refuses such an image itself, naming it.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")

try:  # HEIC/HEIF photos, where the optional pillow-heif is installed.
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:  # pragma: no cover - optional
    pass

#: Pillow's own default limit (1024 * 1024 * 1024 // 4 // 3 pixels), captured before anything changes it.
PILLOW_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
#: Full-resolution decodes running at once in this process (each may need a few hundred MB): the pixel limit
#: bounds one decode, this bounds how many. Async callers queue on DECODE_POOL; any thread waits on the slots.
DECODE_SLOTS = 2
_slots = threading.BoundedSemaphore(DECODE_SLOTS)
DECODE_POOL = ThreadPoolExecutor(DECODE_SLOTS, thread_name_prefix="geoagent-decode")
_max_pixels: int = PILLOW_MAX_PIXELS or 0
_P = ParamSpec("_P")
_R = TypeVar("_R")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".heic", ".heif"})
JPEG_QUALITY = 90
REDUCING_GAP = 3.0  # see downscale


class PixelLimitError(InputError):
    """An image whose header declares more pixels than ``images.max_pixels``: refused before any decoding."""


def set_pixel_limit(max_pixels: int) -> None:
    """Every decode in this process refuses images over ``max_pixels`` (``images.max_pixels``), checked by
    :func:`check_pixels` with the size in the message. Pillow's own guard (``Image.MAX_IMAGE_PIXELS``,
    process-wide by Pillow's design) is raised with it, never lowered: at twice its value Pillow refuses in
    ``Image.open`` itself, before our check could say how large the image is."""
    global _max_pixels
    _max_pixels = max_pixels
    Image.MAX_IMAGE_PIXELS = max(max_pixels, PILLOW_MAX_PIXELS or 0)


def pixel_limit() -> int:
    """The pixel limit in force (:func:`set_pixel_limit`; Pillow's default until set)."""
    return _max_pixels


async def in_decode_pool(fn: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
    """``fn(*args, **kwargs)`` on the decode pool (DECODE_SLOTS threads): photos waiting for a decode hold a
    queue entry, not a thread of the default pool nor any pixels."""
    return await asyncio.get_running_loop().run_in_executor(DECODE_POOL, functools.partial(fn, *args, **kwargs))


def open_regular(path: str | Path) -> BinaryIO:
    """``path`` opened for reading only if it is a regular, non-empty file. The open is non-blocking and the
    type is checked on the open descriptor, so a FIFO (or a device, or a file swapped for one) is refused at
    once instead of blocking forever. Raises InputError naming the file."""
    shown = display_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(f"{shown}: no such file") from None
    except OSError as exc:
        raise InputError(f"{shown}: {os_error_reason(exc, Path(path))}") from None
    except ValueError:  # a NUL byte in the path
        raise InputError(f"{shown}: not a valid path (it holds a NUL byte)") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InputError(f"{shown}: is a directory, not an image")
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{shown}: not a regular file (a FIFO, socket or device is never read)")
        if info.st_size == 0:
            raise InputError(f"{shown}: empty file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_pixels(image: Image.Image, shown: str) -> None:
    """PixelLimitError when the header of a lazily opened image declares more pixels than the limit."""
    limit = pixel_limit()
    if limit and image.width * image.height > limit:
        raise PixelLimitError(
            f"{shown}: refused: {image.width}x{image.height} is {image.width * image.height:,} pixels, over the "
            f"{limit:,} pixel limit (images.max_pixels; possible decompression bomb)"
        )


@contextmanager
def open_header(path: str | Path) -> Iterator[Image.Image]:
    """The image opened lazily (header parsed, no pixels decoded) from a regular file, its size checked
    against the pixel limit. Raises InputError (PixelLimitError for too many pixels) naming the file."""
    shown = display_path(path)
    with _image_errors(shown, Path(path)), open_regular(path) as fh, Image.open(fh) as image:
        check_pixels(image, shown)
        yield image


def header_problem(path: str | Path) -> str | None:
    """Why the photo cannot be opened, found from its header alone (no pixel decoded: cheap enough to check
    every photo before any model loads), or None."""
    try:
        with open_header(path):
            return None
    except InputError as exc:
        return str(exc).removeprefix(f"{display_path(path)}: ")


@contextmanager
def _image_errors(shown: str, path: Path) -> Iterator[None]:
    """Pillow's many exceptions for an unusable file, as one InputError naming it."""
    try:
        yield
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{shown}: not an image (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError:  # Pillow's guard in Image.open, at twice its limit: before ours
        raise PixelLimitError(
            f"{shown}: refused: over twice the {Image.MAX_IMAGE_PIXELS:,} pixel limit (images.max_pixels; possible decompression bomb)"
        ) from None
    except MemoryError:
        raise InputError(f"{shown}: refused: not enough memory to decode it") from None
    except OSError as exc:
        if exc.errno is not None:  # the file itself: permission denied, symlink loop, ...
            raise InputError(f"{shown}: {os_error_reason(exc, path)}") from None
        raise InputError(f"{shown}: unreadable image ({exc})") from None
    except (ValueError, SyntaxError) as exc:  # Pillow raises these for some corrupt headers
        raise InputError(f"{shown}: corrupt image ({exc})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB 8-bit: alpha composited on white, 16-bit and float rescaled, palette and CMYK converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def open_image(path: str | Path) -> Image.Image:
    """Open a photo fully decoded, upright and in RGB; InputError naming the file if it is unusable.

    Only a regular file is opened, its header size is checked against the pixel limit before any pixel is
    decoded, and the decode itself waits for one of DECODE_SLOTS (blocking: call it from a worker thread,
    best :func:`in_decode_pool`)."""
    shown = display_path(path)
    with _image_errors(shown, Path(path)), open_regular(path) as fh:
        raw = Image.open(fh)
        check_pixels(raw, shown)
        with _slots:  # one full-resolution copy at a time: turned upright in place, converted only if not RGB
            raw.load()
            ImageOps.exif_transpose(raw, in_place=True)
            return to_rgb(raw)


def downscale(image: Image.Image, max_side: int) -> Image.Image:
    """Shrink so the longer side is at most ``max_side``; aspect kept (panoramas are never cropped)."""
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # Over REDUCING_GAP times the target, Pillow first shrinks by an integer factor (box averaging) and resamples
    # the rest: a 10000x8000 photo in a tenth of the time, indistinguishable; photos under about 4600 pixels
    # (every common camera at max_side 768) resample exactly as without it.
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)


def encode_image(image: Image.Image, max_side: int, label: str = "", role: ImageRole = "query") -> EncodedImage:
    """JPEG-encode once; the content hash identifies the image in cache keys. ``role``: the query photo or a candidate's."""
    image = downscale(to_rgb(image), max_side)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    data = buffer.getvalue()
    return EncodedImage(
        data=data, sha256=hashlib.sha256(data).hexdigest(), width=image.width, height=image.height, label=label, role=role
    )


COMPOSITE_LABEL_HEIGHT = 28
COMPOSITE_PAD = (32, 32, 32)


def composite(panels: list[tuple[Image.Image, str]], max_side: int) -> Image.Image:
    """Panels side by side in equal square boxes (letterboxed, never cropped), each labelled underneath.

    For models that take a single image (LLaVA 1.5): query | A | B in one picture.
    """
    side = max(64, max_side // max(1, len(panels)))
    sheet = Image.new("RGB", (side * len(panels), side + COMPOSITE_LABEL_HEIGHT), COMPOSITE_PAD)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (image, label) in enumerate(panels):
        fitted = to_rgb(image).copy()
        fitted.thumbnail((side, side), Image.Resampling.LANCZOS)
        sheet.paste(fitted, (i * side + (side - fitted.width) // 2, (side - fitted.height) // 2))
        width = draw.textlength(label, font=font)
        draw.text((i * side + (side - width) / 2, side + 8), label, fill=(255, 255, 255), font=font)
    return sheet


def load_image(path: str | Path, max_side: int) -> EncodedImage:
    """Open, orient, downscale and encode a photo (blocking: call it from a worker thread)."""
    return encode_image(open_image(path), max_side, label=display_path(path))
