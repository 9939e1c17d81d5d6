"""Near-duplicates: from what cosine similarity a reference is a copy of the query, measured per index.

A cosine threshold only means something for one CLIP model (random weights put every pair of photos above
0.99; a trained ViT puts different photos of one street near 0.9 and re-encoded copies near 0.99). So
``index build`` measures it on the gallery itself: for a sample of its photos it embeds copies made the way
photos get copied (re-encoded at JPEG quality 60; also halved in size; also cropped by 5% a side) and finds
each photo's most similar reference taken more than ``DISTINCT_KM`` away (one that would move the answer if
it were taken for a copy) — or, in a gallery of one place where no sampled photo has a reference that far, its most
similar other reference at any distance (a different photo of the same street is still not a copy). The threshold lies halfway between the highest such distinct similarity and the
lowest copy similarity of the kinds of copy that all scored above it. A kind whose copies overlap the
distinct pairs cannot be told apart by this model and is left out (``separated`` lists the kinds kept); when
none is kept, only copies closer than any measured distinct pair count (halfway from it to 1).

``agent.near_duplicate_similarity``: unset uses the index's threshold (an index built before calibration
counts only exact copies, ``EXACT_COPY_SIMILARITY``), a number overrides it, "off" disables the override.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import numpy as np
from PIL import Image
from pydantic import BaseModel

from geoagent.errors import InputError
from geoagent.geo import haversine_km
from geoagent.images import open_image

CALIBRATION_SAMPLE = 64  # gallery photos copied and compared at build time (192 extra embeddings at most)
CALIBRATION_SEED = 0
COPY_QUALITY = 60  # JPEG quality of the copies: what messengers and web uploads do to a photo
COPY_SCALE = 0.5
COPY_CROP = 0.05  # of each side
DISTINCT_KM = 1.0  # a reference at least this far away is a different photo whose coordinate would mislead
NEIGHBOURS_SEARCHED = 32  # nearest references looked through for the most similar distinct one
EXACT_COPY_SIMILARITY = 0.9999  # an index without calibration: only (almost) byte-identical copies count
SIMILARITY_DIGITS = 6  # similarities are stored rounded to this many decimals
MIN_DISTANCE = 1e-6  # 1 - similarity below this is float32 noise: the same picture

Setting = float | Literal["off"] | None


class ImageEmbedder(Protocol):
    """What calibration needs of a model: embeddings of a few open images (an Embedder, or a build's PhotoEmbedding)."""

    def embed_images_sync(self, images: list[Image.Image], batch_size: int = ...) -> np.ndarray: ...


def _reencoded(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=COPY_QUALITY)
    buffer.seek(0)
    with Image.open(buffer) as copy:
        return copy.convert("RGB")


def _halved(image: Image.Image) -> Image.Image:
    size = (max(1, round(image.width * COPY_SCALE)), max(1, round(image.height * COPY_SCALE)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _cropped(image: Image.Image) -> Image.Image:
    dx, dy = round(image.width * COPY_CROP), round(image.height * COPY_CROP)
    return image.crop((dx, dy, image.width - dx, image.height - dy))


#: The kinds of copy measured: every one re-encoded, as any copy that was saved again is.
COPIES: dict[str, Callable[[Image.Image], Image.Image]] = {
    "reencoded": _reencoded,
    "reencoded_half_size": lambda image: _reencoded(_halved(image)),
    "reencoded_cropped": lambda image: _reencoded(_cropped(image)),
}


class NearDuplicateCalibration(BaseModel):
    """What ``index build`` measured, stored in the index manifest."""

    threshold: float | None  # None: the gallery has no other photo to compare with (only exact copies count)
    sampled: int  # gallery photos copied
    copies: dict[str, list[float]]  # kind of copy -> each sampled photo's similarity to its copy
    distinct: list[float]  # each sampled photo's similarity to its most similar reference > distinct_km away
    distinct_km: float = DISTINCT_KM  # 0: no sampled photo had a reference this far; the nearest others were used
    distinct_bound: float | None = None  # how similar a different photo may plausibly get (beyond the sample)
    separated: list[str] = []  # kinds whose every copy lies above distinct_bound

    def describe(self) -> str:
        """One line for ``index build`` and ``index info``."""
        if self.threshold is None:
            return (
                f"no threshold can be set: no sampled photo has another reference to compare its copies with ({self.sampled} sampled); "
                f"only exact copies win, from similarity {EXACT_COPY_SIMILARITY}"
            )
        lowest = ", ".join(f"{kind} {min(values):.4f}" for kind, values in self.copies.items() if values)
        told = ", ".join(self.separated) or "none, so only exact copies"
        return (
            f"a reference is the answer from similarity {self.threshold:g} (lowest copy: {lowest}; different photos up to "
            f"{max(self.distinct):.4f}, plausibly {self.distinct_bound:.4f}; {self.sampled} photos sampled; copies told apart: {told})"
            + ("" if self.distinct_km else f"; no reference lies over {DISTINCT_KM:g} km from another, so different photos of one place were compared")
        )


def _distance(similarity: float) -> float:
    return max(1.0 - similarity, MIN_DISTANCE)


def choose_threshold(copies: dict[str, Sequence[float]], distinct: Sequence[float]) -> tuple[float | None, float | None, list[str]]:
    """(threshold, distinct bound, kinds of copy told apart) from measured similarities, on a log scale of
    distance (1 - similarity): a model crowds its similarities near 1, and what tells a copy from another photo
    is how many times closer it is.

    The bound extrapolates past the sample: as far beyond the most similar different photo as that one lies
    beyond the median one. A kind of copy is told apart when all its copies lie beyond the bound; the threshold
    is the geometric middle between the bound and the farthest copy of those kinds. When no kind is told apart,
    only copies beyond the bound and ``EXACT_COPY_SIMILARITY`` count.
    """
    if not distinct:
        return None, None, []
    nearest, typical = _distance(max(distinct)), _distance(float(np.median(distinct)))
    bound = nearest * nearest / typical
    separated = [kind for kind, values in copies.items() if values and _distance(min(values)) < bound]
    if separated:
        farthest_copy = max(_distance(min(copies[kind])) for kind in separated)
        threshold = 1.0 - math.sqrt(bound * farthest_copy)
    else:
        threshold = max(1.0 - bound, EXACT_COPY_SIMILARITY)
    return round(threshold, SIMILARITY_DIGITS), round(1.0 - bound, SIMILARITY_DIGITS), separated


def calibrate(
    vectors: np.ndarray,
    lat: np.ndarray,
    lon: np.ndarray,
    path_of: Callable[[int], str],
    embedder: ImageEmbedder,
    sample: int = CALIBRATION_SAMPLE,
    seed: int = CALIBRATION_SEED,
) -> NearDuplicateCalibration:
    """Measure copies of up to ``sample`` photos (rows of ``vectors``, their files at ``path_of(row)``) and
    their most similar distinct references (exact search over ``vectors``)."""
    import faiss

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(vectors), size=min(sample, len(vectors)), replace=False))
    images: list[Image.Image] = []
    kept: list[int] = []
    for row in rows:
        try:
            images.append(open_image(path_of(int(row))))
            kept.append(int(row))
        except InputError:
            continue  # moved or unreadable since it was embedded: sampled no more
    originals = np.ascontiguousarray(np.asarray(vectors[kept], dtype=np.float32)).reshape(len(kept), -1)
    copies: dict[str, list[float]] = {kind: [] for kind in COPIES}
    if images:  # one pass through the model for every kind
        embedded = embedder.embed_images_sync([make(image) for make in COPIES.values() for image in images])
        for kind, block in zip(COPIES, np.split(embedded, len(COPIES))):
            copies[kind] = [round(float(s), SIMILARITY_DIGITS) for s in (block * originals).sum(axis=1)]
    distinct: list[float] = []
    nearest_other: list[float] = []  # each photo's most similar other reference, whatever its distance
    if kept:
        scores, ids = faiss.knn(originals, np.ascontiguousarray(vectors, dtype=np.float32), min(NEIGHBOURS_SEARCHED, len(vectors)), faiss.METRIC_INNER_PRODUCT)
        for row, found, sims in zip(kept, ids, scores):
            valid = (found >= 0) & (found != row)
            far = haversine_km(lat[row], lon[row], lat[found[valid]], lon[found[valid]]) > DISTINCT_KM
            if far.any():
                distinct.append(round(float(sims[valid][far].max()), SIMILARITY_DIGITS))
            if valid.any():
                nearest_other.append(round(float(sims[valid].max()), SIMILARITY_DIGITS))
    distinct_km = DISTINCT_KM
    if not distinct:  # one place: every other photo is a different photo, however near
        distinct, distinct_km = nearest_other, 0.0
    threshold, bound, separated = choose_threshold(copies, distinct)
    return NearDuplicateCalibration(
        threshold=threshold, sampled=len(kept), copies=copies, distinct=distinct, distinct_km=distinct_km, distinct_bound=bound, separated=separated
    )


def resolve_threshold(setting: Setting, calibration: NearDuplicateCalibration | None, indexed: bool) -> float | None:
    """The similarity from which the top reference is the answer, or None for no override: ``setting`` when
    it is a number; none when it is "off" or the candidates are no photos (the gazetteer); else the index's
    calibrated threshold, or ``EXACT_COPY_SIMILARITY`` for an index built before calibration or one whose
    calibration could set no threshold (a gallery of one photo)."""
    if setting == "off" or not indexed:
        return None
    if setting is not None:
        return float(setting)
    if calibration is None or calibration.threshold is None:
        return EXACT_COPY_SIMILARITY
    return calibration.threshold
