"""Training data for a GeoRanker-style reward model, drawn from the user's own geotagged photos and index.

Each query (a photo with known coordinates) becomes a :class:`TrainExample`: its ``k`` nearest index entries by
CLIP similarity (the query's own entry excluded, when the query is itself in the index) plus ``negatives`` entries
drawn at random from the whole index, each with its great-circle distance to the query's true coordinates.

Only the query list (paths and coordinates) is held in memory; photos are opened a batch at a time as the
examples are built. Every draw is seeded by ``(seed, epoch)`` or ``(seed, query ordinal)``, so the n-th example
of a run is the same whether the run was interrupted before it or not.

:func:`train` is the command's entry point: cheap checks here, torch and the models only after them (the loop
itself is :mod:`geoagent.ranker.trainer`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from geoagent.errors import ConfigError, InputError
from geoagent.eval.datasets import EvalItem, load_dataset
from geoagent.geo import haversine_km
from geoagent.images import open_image
from geoagent.paths import display_path
from geoagent.ranker import recipe

if TYPE_CHECKING:
    from PIL import Image

    from geoagent.config import Settings
    from geoagent.ranker.trainer import StepReport, TrainReport
    from geoagent.retrieval.embedder import Embedder
    from geoagent.retrieval.index import ReferenceIndex

log = logging.getLogger(__name__)

#: Extra neighbours searched beyond ``k``, so that ``k`` remain once the query's own entry is dropped.
SELF_SLACK = 2
#: Streams of the seeded generators, kept apart so that changing one draw never shifts another.
ORDER_STREAM, NEGATIVE_STREAM = 0, 1

#: Options that decide which examples a step sees: a checkpoint resumes only under the same values.
DATA_OPTIONS = ("queries", "images", "index", "seed", "batch_queries", "accumulate", "candidates", "negatives")


class TrainOptions(BaseModel):
    """What ``geoagent ranker train`` was asked to do (flags, validated)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: Path
    queries: Path
    out: Path
    images: Path | None = None
    lambda1: float = Field(recipe.LAMBDA1, ge=0.0, le=1.0)
    top: int | None = Field(recipe.TOP, ge=1)
    steps: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(recipe.LR, gt=0)
    batch_queries: int = Field(recipe.BATCH_QUERIES, ge=1)
    candidates: int = Field(recipe.CANDIDATES, ge=1)
    negatives: int = Field(recipe.NEGATIVES, ge=0)
    accumulate: int = Field(recipe.ACCUMULATE, ge=1)
    checkpoint_every: int = Field(recipe.CHECKPOINT_EVERY, ge=1)
    seed: int = 0
    resume: bool = True

    def total_steps(self, queries: int) -> int:
        """``steps`` when given, else enough optimizer steps to see every query ``epochs`` times."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * queries / (self.batch_queries * self.accumulate)))

    def data_key(self) -> dict[str, str]:
        """The :data:`DATA_OPTIONS` as text (paths absolute), as a checkpoint records them."""
        values = {name: getattr(self, name) for name in DATA_OPTIONS}
        return {name: os.path.abspath(v) if isinstance(v, Path) else str(v) for name, v in values.items()}


@dataclass(frozen=True)
class TrainCandidate:
    """An index entry offered as a candidate location for a query, its photo, and how far it lies from the truth."""

    id: str
    lat: float
    lon: float
    path: Path
    photo: Image.Image | None  # None when the file cannot be opened: scored with the coordinates alone
    distance_km: float
    negative: bool = False  # drawn at random from the index rather than retrieved


@dataclass(frozen=True)
class TrainExample:
    """One query photo, with its candidates (retrieved first, then the random negatives)."""

    ordinal: int  # position in the run's stream of queries (epochs concatenated)
    query: EvalItem
    image: Image.Image
    candidates: tuple[TrainCandidate, ...]


def read_queries(source: Path, images: Path | None = None) -> list[EvalItem]:
    """The usable queries of a CSV (``path,lat,lon`` or ``IMG_ID,LAT,LON`` with ``images``) or a folder of photos
    with EXIF GPS; paths and coordinates only, no photo is opened. No usable row is an InputError."""
    dataset = load_dataset(source, images)
    for name, reason in dataset.skipped[:3]:
        log.info("queries: skipped %s: %s", name, reason)
    if not dataset.items:
        raise InputError(f"{display_path(source)}: no usable query (each needs a photo path and a valid lat/lon)")
    return dataset.items


def query_stream(queries: Sequence[EvalItem], seed: int, start: int = 0) -> Iterator[tuple[int, EvalItem]]:
    """``(ordinal, query)`` for ever: each epoch a seeded permutation of the queries, epochs one after another;
    begins at ordinal ``start`` without reading anything before it (a resumed run skips what it has seen)."""
    count = len(queries)
    epoch, offset = divmod(start, count)
    while True:
        order = np.random.default_rng([seed, ORDER_STREAM, epoch]).permutation(count)
        for position in range(offset, count):
            yield epoch * count + position, queries[int(order[position])]
        epoch, offset = epoch + 1, 0


class ExampleBuilder:
    """Turns queries into examples: embed their photos, search the index, add seeded negatives, measure distances."""

    def __init__(self, index: ReferenceIndex, embedder: Embedder, k: int, negatives: int, seed: int) -> None:
        self.index, self.embedder, self.k, self.negatives, self.seed = index, embedder, k, negatives, seed

    def build(self, batch: Sequence[tuple[int, EvalItem]]) -> list[TrainExample]:
        """Examples for a batch of ``(ordinal, query)``; a query whose photo cannot be opened is logged and left out."""
        opened: list[tuple[int, EvalItem, Image.Image]] = []
        for ordinal, query in batch:
            try:
                opened.append((ordinal, query, open_image(query.path)))
            except InputError as exc:
                log.warning("skipped query %s", exc)
        if not opened:
            return []
        vectors = self.embedder.embed_images_sync([image for _, _, image in opened])
        rows, _ = self.index.table.search_many(vectors, self.k + SELF_SLACK)
        return [self._example(ordinal, query, image, found) for (ordinal, query, image), found in zip(opened, rows)]

    def _example(self, ordinal: int, query: EvalItem, image: Image.Image, found: np.ndarray) -> TrainExample:
        own = os.path.realpath(query.path)
        hits = [int(row) for row in found if row >= 0]
        itself = {row for row in hits if self._real_path(row) == own}
        near = [row for row in hits if row not in itself][: self.k]
        excluded = set(near) | itself
        far = self._negatives(ordinal, excluded)
        entries = [self.index.entries[row] for row in near + far]
        lat, lon = np.array([e.lat for e in entries]), np.array([e.lon for e in entries])
        distances = haversine_km(query.lat, query.lon, lat, lon)
        candidates = tuple(
            TrainCandidate(e.id, e.lat, e.lon, Path(e.path), _open_or_none(Path(e.path)), float(d), negative=i >= len(near))
            for i, (e, d) in enumerate(zip(entries, distances))
        )
        return TrainExample(ordinal, query, image, candidates)

    def _real_path(self, row: int) -> str:
        """The entry's photo with links followed (as the query's is), to recognise the query's own entry."""
        return os.path.realpath(self.index.entries[row].path)

    def _negatives(self, ordinal: int, excluded: set[int]) -> list[int]:
        """``negatives`` distinct rows outside ``excluded``, drawn uniformly with a generator seeded by the query's
        ordinal (fewer when the index holds fewer)."""
        total = len(self.index.table)
        wanted = min(self.negatives, total - len(excluded))
        if wanted <= 0:
            return []
        rng = np.random.default_rng([self.seed, NEGATIVE_STREAM, ordinal])
        picked: list[int] = []
        seen = set(excluded)
        while len(picked) < wanted:
            row = int(rng.integers(total))
            if row not in seen:
                seen.add(row)
                picked.append(row)
        return picked


def _open_or_none(path: Path) -> Image.Image | None:
    """A candidate's photo, or None (logged) when it cannot be opened: the candidate is then scored without it."""
    try:
        return open_image(path)
    except InputError as exc:
        log.warning("candidate without its photo: %s", exc)
        return None


def train(options: TrainOptions, settings: Settings, on_step: Callable[[StepReport], None] | None = None) -> TrainReport:
    """``geoagent ranker train``: what is cheap to check (the output folder, the queries, the base model's folder,
    the index) is checked before torch, CLIP or the base model load; then the loop of :mod:`.trainer`.
    ``[ranker]`` gives the base model, device, dtype and image size; ``[retrieval]`` the CLIP model the index was
    built with."""
    from geoagent.ranker.weights import resolve_base_model
    from geoagent.retrieval.index import ReferenceIndex

    if options.out.exists() and not options.out.is_dir():
        raise ConfigError(f"--out: {display_path(options.out)} is a file; give the adapter folder to write")
    queries = read_queries(options.queries, options.images)
    config = settings.ranker
    base = resolve_base_model(config.base_model)
    index = ReferenceIndex.open(options.index)

    from geoagent.ranker.model import RewardModel
    from geoagent.ranker.trainer import run_training
    from geoagent.retrieval.embedder import Embedder

    retrieval = settings.retrieval.model_copy()
    retrieval.index = options.index  # validated on assignment (~ expanded)
    embedder = Embedder.load(retrieval)
    index.check_embedder(embedder.spec)
    builder = ExampleBuilder(index, embedder, options.candidates, options.negatives, options.seed)

    def load(adapter: Path | None) -> RewardModel:
        return RewardModel.load(
            base, adapter, device=config.device, dtype=config.dtype, max_side=config.max_image_side, trainable=True, seed=options.seed
        )

    return run_training(options, builder, queries, load, config.base_model, on_step)
