"""A machine-readable marker drawn into test images, so the stand-in server can tell what it was shown.

A band of 16 stripes across the top: guards (white, black), 12 bits of id, guards (black, white).
It survives downscaling and JPEG, and reads as "no marker" on ordinary photos.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

BITS = 12
MAX_ID = (1 << BITS) - 1
_GUARD_HEAD = (1, 0)
_GUARD_TAIL = (0, 1)
BAND = 0.1  # fraction of the height the band covers: thin, so it barely sways CLIP retrieval


def _stripes(marker_id: int) -> list[int]:
    bits = [(marker_id >> (BITS - 1 - i)) & 1 for i in range(BITS)]
    return [*_GUARD_HEAD, *bits, *_GUARD_TAIL]


def draw_marker(image: Image.Image, marker_id: int) -> Image.Image:
    """Return a copy of ``image`` with ``marker_id`` (0..4095) drawn across its top band."""
    if not 0 <= marker_id <= MAX_ID:
        raise ValueError(f"marker id {marker_id} out of range 0..{MAX_ID}")
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    stripes = _stripes(marker_id)
    width, height = out.size
    band = max(4, int(height * BAND))
    for i, bit in enumerate(stripes):
        x0, x1 = round(i * width / len(stripes)), round((i + 1) * width / len(stripes))
        draw.rectangle([x0, 0, x1 - 1, band - 1], fill=(255, 255, 255) if bit else (0, 0, 0))
    return out


def read_marker(image: Image.Image) -> int | None:
    """The id drawn by :func:`draw_marker`, or None when the image carries no marker."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    height, width = gray.shape
    band = max(4, int(height * BAND))
    rows = gray[int(band * 0.25) : max(int(band * 0.75), 1)]
    n = BITS + len(_GUARD_HEAD) + len(_GUARD_TAIL)
    values = []
    for i in range(n):
        x0, x1 = i * width / n, (i + 1) * width / n
        core = rows[:, int(x0 + (x1 - x0) * 0.25) : max(int(x1 - (x1 - x0) * 0.25), int(x0) + 1)]
        mean = float(core.mean())
        if 70 < mean < 185:  # neither clearly black nor clearly white: not a marker
            return None
        values.append(1 if mean >= 128 else 0)
    if tuple(values[:2]) != _GUARD_HEAD or tuple(values[-2:]) != _GUARD_TAIL:
        return None
    return int("".join(str(b) for b in values[2:-2]), 2)


def marked_scene(marker_id: int, size: tuple[int, int] = (320, 240), seed: int | None = None) -> Image.Image:
    """A noisy test picture carrying ``marker_id``."""
    rng = np.random.default_rng(marker_id if seed is None else seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return draw_marker(Image.fromarray(pixels), marker_id)
