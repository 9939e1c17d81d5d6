"""Retrieval: embed the query photo and search the reference index, or the gazetteer when there is none."""

from __future__ import annotations

import asyncio
import threading
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
    """An embedder and the candidate source it searches. Torch and faiss work runs in worker threads.

    ``embedder`` may be None with ``config`` given: the model is then loaded on the first photo to embed
    (a Ray worker, whose photos come embedded, never loads it)."""

    def __init__(self, embedder: Embedder | None, source: CandidateSource, config: RetrievalConfig | None = None) -> None:
        self._embedder, self.source, self._config = embedder, source, config
        self._loading = threading.Lock()

    @property
    def embedder(self) -> Embedder:
        """The CLIP model, loaded now if it was deferred (blocking: seconds)."""
        from geoagent.retrieval.embedder import Embedder

        with self._loading:
            if self._embedder is None:
                assert self._config is not None  # a deferred embedder always comes with its config
                self._embedder = Embedder.load(self._config)
            return self._embedder

    @property
    def table(self) -> VectorTable:
        return self.source.table

    @classmethod
    def load_sync(
        cls,
        config: RetrievalConfig,
        cache_dir: Path | None = None,
        on_gazetteer_embed: Callable[[int], None] | None = None,
        *,
        defer_embedder: bool = False,
    ) -> Retriever:
        """The configured index, or the gazetteer with its vectors cached in ``cache_dir``
        (default: :func:`vectors_cache_dir`, shared by every project on this machine).

        ``defer_embedder``: with an index, check it against the configured embedder's spec but load the model
        only when a photo needs embedding (the gazetteer needs the model at once, to embed its places)."""
        from geoagent.retrieval.embedder import Embedder, embedder_spec

        if config.index is not None:
            from geoagent.retrieval.index import ReferenceIndex

            index = ReferenceIndex.open(config.index)  # opened first: a bad path fails before loading a model
            if defer_embedder:
                index.check_embedder(embedder_spec(config))
                return cls(None, index, config)
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
        cls,
        config: RetrievalConfig,
        cache_dir: Path | None = None,
        on_gazetteer_embed: Callable[[int], None] | None = None,
        *,
        defer_embedder: bool = False,
    ) -> Retriever:
        return await asyncio.to_thread(lambda: cls.load_sync(config, cache_dir, on_gazetteer_embed, defer_embedder=defer_embedder))

    async def embed(self, image: Image.Image) -> np.ndarray:
        embedder = self._embedder or await asyncio.to_thread(lambda: self.embedder)
        return (await embedder.embed_images([image]))[0]

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
