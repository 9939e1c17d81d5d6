"""Retrieval: embed the query photo and search the reference index, or the gazetteer when there is none."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from geoagent.types import Candidate

if TYPE_CHECKING:
    from PIL import Image

    from geoagent.config import RetrievalConfig
    from geoagent.retrieval.embedder import Embedder
    from geoagent.retrieval.vectors import VectorTable


def vectors_cache_dir(config: RetrievalConfig) -> Path:
    """Where caches keyed by model and data (gazetteer vectors) live: ``[retrieval] vectors_cache``, else the
    user cache dir (``~/.cache/geoagent`` on Linux), so every working folder shares one copy."""
    if config.vectors_cache is not None:
        return config.vectors_cache
    import platformdirs

    return Path(platformdirs.user_cache_dir("geoagent", appauthor=False))


class CandidateSource(Protocol):
    table: VectorTable

    def candidate(self, row: int, score: float) -> Candidate: ...


class Retriever:
    """An embedder and the candidate source it searches. Torch and faiss work runs in worker threads."""

    def __init__(self, embedder: Embedder, source: CandidateSource) -> None:
        self.embedder, self.source = embedder, source

    @property
    def table(self) -> VectorTable:
        return self.source.table

    @classmethod
    def load_sync(
        cls, config: RetrievalConfig, cache_dir: Path | None = None, on_gazetteer_embed: Callable[[int], None] | None = None
    ) -> Retriever:
        """The configured index, or the gazetteer with its vectors cached in ``cache_dir``
        (default: :func:`vectors_cache_dir`, shared by every project on this machine)."""
        from geoagent.retrieval.embedder import Embedder

        if config.index is not None:
            from geoagent.retrieval.index import ReferenceIndex

            index = ReferenceIndex.open(config.index)  # opened first: a bad path fails before loading a model
            embedder = Embedder.load(config)
            index.check_embedder(embedder.spec)
            return cls(embedder, index)
        from geoagent.retrieval.gazetteer import Gazetteer

        embedder = Embedder.load(config)
        gazetteer = Gazetteer.load(
            embedder,
            cache_dir or vectors_cache_dir(config),
            min_population=config.gazetteer_min_population,
            prompt=config.gazetteer_prompt,
            kmeans_k=config.kmeans_k,
            on_embed=on_gazetteer_embed,
        )
        return cls(embedder, gazetteer)

    @classmethod
    async def load(
        cls, config: RetrievalConfig, cache_dir: Path | None = None, on_gazetteer_embed: Callable[[int], None] | None = None
    ) -> Retriever:
        return await asyncio.to_thread(cls.load_sync, config, cache_dir, on_gazetteer_embed)

    async def embed(self, image: Image.Image) -> np.ndarray:
        return (await self.embedder.embed_images([image]))[0]

    def search_sync(
        self, vector: np.ndarray, k: int, countries: set[str] | None = None, clusters: set[int] | None = None
    ) -> list[Candidate]:
        rows, scores = self.table.search(vector, k, self.table.submap(countries, clusters))
        return [self.source.candidate(int(r), float(s)) for r, s in zip(rows, scores)]

    async def search(
        self, vector: np.ndarray, k: int, countries: set[str] | None = None, clusters: set[int] | None = None
    ) -> list[Candidate]:
        return await asyncio.to_thread(self.search_sync, vector, k, countries, clusters)

    async def retrieve(self, image: Image.Image, k: int, countries: set[str] | None = None) -> list[Candidate]:
        return await self.search(await self.embed(image), k, countries)
