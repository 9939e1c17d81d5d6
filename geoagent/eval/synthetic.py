"""Synthetic geotagged scenes: pictures whose look depends on their place and country, and perturbed copies.

Used by the tests, the benchmarks and the simulated world. With random CLIP weights a perturbed copy of a
scene still lands near it in embedding space, which is what retrieval needs to be testable offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SCENE_SIZE = (256, 192)


def _colour(rng: np.random.Generator, base: np.ndarray | None = None, spread: int = 40) -> tuple[int, int, int]:
    if base is None:
        return tuple(int(c) for c in rng.integers(0, 256, 3))  # type: ignore[return-value]
    return tuple(int(np.clip(c + rng.integers(-spread, spread + 1), 0, 255)) for c in base)  # type: ignore[return-value]


def scene(seed: int, palette_seed: int | None = None, size: tuple[int, int] = SCENE_SIZE) -> Image.Image:
    """A picture of shapes over a gradient. ``palette_seed`` (e.g. the country) sets the colours, ``seed`` the rest."""
    rng = np.random.default_rng(seed)
    palette_rng = np.random.default_rng(10_000_019 + (palette_seed if palette_seed is not None else seed))
    palette = palette_rng.integers(0, 256, size=(4, 3))
    width, height = size
    top, bottom = np.array(_colour(rng, palette[0])), np.array(_colour(rng, palette[1]))
    ramp = np.linspace(0, 1, height)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp).repeat(width, axis=1)
    pixels += rng.normal(0, 6, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 13))):
        x0, y0 = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
        x1, y1 = x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))
        fill = _colour(rng, palette[int(rng.integers(0, 4))])
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif shape == 1:
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
    return image


def perturb(image: Image.Image, seed: int) -> Image.Image:
    """Another photo of the same scene: cropped, blurred, re-lit, partly occluded."""
    rng = np.random.default_rng(seed)
    width, height = image.size
    scale = rng.uniform(0.88, 0.97)
    cw, ch = int(width * scale), int(height * scale)
    x, y = int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1))
    out = image.crop((x, y, x + cw, y + ch)).resize((width, height), Image.Resampling.BILINEAR)
    out = out.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 1.5))))
    out = Image.fromarray(np.clip(np.asarray(out, dtype=np.float32) * rng.uniform(0.9, 1.1), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for _ in range(int(rng.integers(1, 3))):
        ow, oh = int(width * rng.uniform(0.05, 0.18)), int(height * rng.uniform(0.05, 0.18))
        ox, oy = int(rng.integers(0, width - ow)), int(rng.integers(0, height - oh))
        grey = int(rng.integers(0, 256))
        draw.rectangle([ox, oy, ox + ow, oy + oh], fill=(grey, grey, grey))
    return out


def _dms(value: float) -> tuple[float, float, float]:
    value = abs(value)
    degrees = int(value)
    minutes = int((value - degrees) * 60)
    return float(degrees), float(minutes), round((value - degrees - minutes / 60) * 3600, 4)


def save_with_gps(image: Image.Image, path: Path, lat: float, lon: float, **save_args: Any) -> None:
    """Save a JPEG (or other EXIF-capable format) with the coordinate in its EXIF GPS block."""
    exif = Image.Exif()
    exif.get_ifd(0x8825).update({1: "N" if lat >= 0 else "S", 2: _dms(lat), 3: "E" if lon >= 0 else "W", 4: _dms(lon)})
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=exif, **save_args)
