"""Safe image loading: guard against junk, honour EXIF orientation, normalise mode, downscale, encode once."""

from __future__ import annotations

import hashlib
import io
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from geoagent.errors import InputError
from geoagent.paths import display_path, os_error_reason
from geoagent.vlm.types import EncodedImage

# Pillow's warnings about a file are ours to report (a bomb is refused with an InputError below) or to ignore
# (complaints about optional EXIF). Filters are process-wide and warnings.catch_warnings is not thread-safe
# (photos are opened in worker threads; overlapping ones can leave "ignore everything" installed), so the
# filters are installed once, here.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")

try:  # HEIC/HEIF photos, where the optional pillow-heif is installed.
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:  # pragma: no cover - optional
    pass

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".heic", ".heif"})
JPEG_QUALITY = 90


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
    """Open a photo fully decoded, upright and in RGB; InputError naming the file if it is unusable."""
    path = Path(path)
    shown = display_path(path)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            raise InputError(f"{shown}: not a regular file")
        if info.st_size == 0:
            raise InputError(f"{shown}: empty file")
        with Image.open(path) as raw:
            if Image.MAX_IMAGE_PIXELS is not None and raw.width * raw.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{raw.width}x{raw.height}")
            raw.load()
            upright = ImageOps.exif_transpose(raw)
            return to_rgb(upright)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{shown}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{shown}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise InputError(f"{shown}: not an image (or a format Pillow cannot read)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{shown}: refused: too many pixels (possible decompression bomb)") from None
    except OSError as exc:
        if exc.errno is not None:  # the file itself: permission denied, symlink loop, ...
            raise InputError(f"{shown}: {os_error_reason(exc, path)}") from None
        raise InputError(f"{shown}: unreadable image ({exc})") from None
    except (ValueError, SyntaxError) as exc:  # Pillow raises these for some corrupt headers
        raise InputError(f"{shown}: corrupt image ({exc})") from None


def downscale(image: Image.Image, max_side: int) -> Image.Image:
    """Shrink so the longer side is at most ``max_side``; aspect kept (panoramas are never cropped)."""
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def encode_image(image: Image.Image, max_side: int, label: str = "") -> EncodedImage:
    """JPEG-encode once; the content hash identifies the image in cache keys."""
    image = downscale(to_rgb(image), max_side)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    data = buffer.getvalue()
    return EncodedImage(
        data=data, sha256=hashlib.sha256(data).hexdigest(), width=image.width, height=image.height, label=label
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
