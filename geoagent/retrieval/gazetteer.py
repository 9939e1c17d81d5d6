"""Candidates without reference photos: GeoNames cities embedded as CLIP text prompts, cached on disk."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from geoagent.geo import Place, country_name, world_places
from geoagent.retrieval.vectors import VectorTable, build_faiss, geo_kmeans
from geoagent.types import Candidate

if TYPE_CHECKING:
    from geoagent.retrieval.embedder import Embedder

log = logging.getLogger(__name__)


def place_prompt(template: str, place: Place) -> str:
    return template.format(place=place.name, country=country_name(place.country))


class Gazetteer:
    """World places as a searchable table; text embeddings are computed once per embedder and cached."""

    def __init__(self, places: list[Place], table: VectorTable) -> None:
        self.places, self.table = places, table

    @classmethod
    def load(
        cls,
        embedder: Embedder,
        cache_dir: Path,
        *,
        min_population: int,
        prompt: str,
        kmeans_k: int = 100,
        on_embed: Callable[[int], None] | None = None,
    ) -> Gazetteer:
        places = world_places(min_population).places
        key = hashlib.sha256(f"{embedder.spec.model_dump_json()}|{min_population}|{prompt}".encode()).hexdigest()[:20]
        path = cache_dir.expanduser() / "gazetteer" / f"{key}.npy"
        vectors = _load_vectors(path, len(places))
        if vectors is None:
            log.info("embedding %d gazetteer places as CLIP text prompts, once (cached in %s)", len(places), path.parent)
            if on_embed:
                on_embed(len(places))
            vectors = embedder.embed_texts_sync([place_prompt(prompt, p) for p in places])
            _save_atomic(path, vectors)
        lat = np.array([p.lat for p in places])
        lon = np.array([p.lon for p in places])
        clusters, centroids = geo_kmeans(lat, lon, kmeans_k)
        table = VectorTable(
            vectors=vectors,
            index=build_faiss(vectors, "flat"),
            lat=lat,
            lon=lon,
            country=np.array([p.country for p in places]),
            cluster=clusters,
            centroids=centroids,
        )
        return cls(places, table)

    def candidate(self, row: int, score: float) -> Candidate:
        place = self.places[row]
        return Candidate(
            id=f"geonames:{place.geonameid}", lat=place.lat, lon=place.lon, country=place.country,
            place=place.name, source="gazetteer", retrieval_score=float(score),
        )


def _load_vectors(path: Path, rows: int) -> np.ndarray | None:
    try:
        vectors = np.load(path)
    except (OSError, ValueError):
        return None
    return vectors if vectors.ndim == 2 and len(vectors) == rows else None


def _save_atomic(path: Path, vectors: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, vectors)
    os.replace(tmp, path)
