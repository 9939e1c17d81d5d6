"""GeoAgent.locate: retrieval, the country prior, reasoning and reranking, run concurrently, then aggregated."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from geoagent.agent.aggregate import confidence, fuse
from geoagent.agent.prior import country_prior
from geoagent.agent.reasoning import consensus, neighbour_block, reason
from geoagent.agent.rerank import STRATEGIES, Comparator, Photo
from geoagent.config import Settings, load_config
from geoagent.errors import GeoAgentError, InputError
from geoagent.geo import reverse_geocode
from geoagent.images import open_image
from geoagent.prompts import PromptSet
from geoagent.retrieval.retriever import Retriever
from geoagent.types import Candidate, CountryScore, Guess, LocateResult, LocateStats, Trace
from geoagent.vlm import CallStats, VLMPool

REFERENCE_PHOTO_CACHE = 512  # encoded reference photos kept across queries (references recur in batches)
SUBMAP_BOOST_POOL = 4  # with a submap weight, retrieve this many times top_k before re-weighting


class GeoAgent:
    """Locate photos. Use as ``async with GeoAgent.from_config(...) as agent: await agent.locate(path)``."""

    def __init__(self, settings: Settings, *, retriever: Retriever | None = None, pool: VLMPool | None = None) -> None:
        self.settings = settings
        self.prompts = PromptSet(settings.agent.prompts_dir)
        self.pool = pool or VLMPool(settings)
        self._retriever = retriever
        self._retriever_lock = asyncio.Lock()
        self._references: OrderedDict[str, Photo | None] = OrderedDict()

    @classmethod
    def from_config(cls, path: str | Path | None = None, **overrides: Any) -> GeoAgent:
        """Settings from a TOML file (default ./geoagent.toml), the environment and keyword overrides."""
        return cls(load_config(path, overrides))

    async def __aenter__(self) -> GeoAgent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def retriever(self) -> Retriever:
        """The embedder and candidate source, loaded once on first use (in a worker thread)."""
        async with self._retriever_lock:
            if self._retriever is None:
                self._retriever = await Retriever.load(self.settings.retrieval)
            return self._retriever

    async def preflight(self) -> list[GeoAgentError]:
        """Everything that would stop every photo, found at once: missing weights, unreachable servers, keys."""
        problems: list[GeoAgentError] = []

        async def attempt(coroutine: Any) -> None:
            try:
                await coroutine
            except GeoAgentError as exc:
                problems.append(exc)

        checks = [attempt(self.retriever())]
        if self.settings.agent.strategy != "none":
            agent = self.settings.agent
            tasks = ["pointwise" if agent.strategy == "pointwise" else "pairwise"]
            tasks += [task for task, on in (("prior", agent.country_prior), ("reasoning", agent.reasoning)) if on]
            checks += [attempt(self._check_backend(name)) for name in self.settings.routed_profiles(tuple(tasks))]
        await asyncio.gather(*checks)
        return problems

    async def _check_backend(self, name: str) -> None:
        await self.pool.client(name).backend.check()

    def locate_sync(self, photo: str | Path, *, explain: bool = False) -> LocateResult:
        """Blocking convenience wrapper (not from inside a running event loop)."""

        async def run() -> LocateResult:
            try:
                return await self.locate(photo, explain=explain)
            finally:
                await self.aclose()

        return asyncio.run(run())

    async def locate_many(
        self, photos: Sequence[str | Path], *, explain: bool = False
    ) -> AsyncIterator[tuple[str, LocateResult | GeoAgentError]]:
        """Results in input order, several photos in flight at once; a bad photo yields its error and the rest go on."""
        limit = asyncio.Semaphore(self.settings.agent.max_concurrent_photos)

        async def one(photo: str | Path) -> LocateResult | GeoAgentError:
            async with limit:
                try:
                    return await self.locate(photo, explain=explain)
                except GeoAgentError as exc:
                    if not exc.per_item:
                        raise  # a dead server or missing weights: not this photo's fault, stop the batch
                    return exc

        tasks = [asyncio.create_task(one(p)) for p in photos]
        try:
            for photo, task in zip(photos, tasks):
                yield str(photo), await task
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def locate(self, photo: str | Path, *, explain: bool = False) -> LocateResult:
        """Where was ``photo`` taken? Raises InputError for an unusable photo."""
        cfg = self.settings.agent
        started = time.perf_counter()
        timings: dict[str, float] = {}
        spent: dict[str, CallStats] = {"prior": CallStats(), "reasoning": CallStats()}
        trace = Trace(strategy=cfg.strategy)

        async def timed(name: str, coroutine: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await coroutine
            finally:
                timings[name] = round(time.perf_counter() - t0, 4)

        image = await asyncio.to_thread(open_image, photo)
        query = await asyncio.to_thread(Photo.of, image, cfg.max_image_side, str(photo))
        candidates, prior, guesses = await self._gather_evidence(image, query, spent, trace, timed)

        guess = consensus(guesses, cfg.reasoning_cluster_km)
        pool = list(candidates)
        if guess is not None:
            pool.append(await asyncio.to_thread(_guess_candidate, guess))
        prior_p = {entry.country: entry.p for entry in prior}
        weights = self._fusion_weights()
        votes: dict[str, float] = {}
        comparator = None
        if cfg.strategy != "none":
            evidence_only, _ = fuse(pool, {}, prior_p, guess, **{**weights, "w_votes": 0.0})
            comparator = Comparator(
                pairwise_client=self.pool.for_task("pairwise"),
                pointwise_client=self.pool.for_task("pointwise"),
                prompts=self.prompts,
                query=query,
                photos=await self._reference_photos(pool),
                base={c.id: c.score for c in evidence_only},
                layout=cfg.image_layout,
                view=cfg.view,
                debias=cfg.position_debias,
                max_side=cfg.max_image_side,
            )
            spent["pointwise" if cfg.strategy == "pointwise" else "pairwise"] = comparator.stats
            votes = await timed("rerank", STRATEGIES[cfg.strategy](pool, comparator, cfg.vote_model))
        ranked, terms = fuse(pool, votes, prior_p, guess, **weights)
        top = ranked[0]

        if explain:
            trace.pool = [c.id for c in pool]
            trace.guesses, trace.consensus_guess = guesses, guess
            if comparator is not None:
                trace.matches, trace.pointwise = comparator.matches, comparator.scores
            trace.fusion = terms
            trace.prompts = self.prompts.hashes()
            trace.timings_s = timings
        return LocateResult(
            image=str(photo),
            lat=top.lat,
            lon=top.lon,
            country=top.country,
            place=top.place,
            confidence=confidence(ranked, cfg.consensus_bandwidth_km),
            candidates=ranked,
            prior=prior,
            stats=_photo_stats(spent, time.perf_counter() - started),
            trace=trace if explain else None,
        )

    async def _gather_evidence(
        self, image: Any, query: Photo, spent: dict[str, CallStats], trace: Trace, timed: Any
    ) -> tuple[list[Candidate], list[CountryScore], list[Guess]]:
        """Retrieval (in threads) while the prior and reasoning are asked; a submap waits for what it needs."""
        cfg = self.settings.agent
        use_vlm = cfg.strategy != "none"
        retriever = await self.retriever()
        prior_task = reasoning_task = None
        if use_vlm and cfg.country_prior:
            client = self.pool.for_task("prior")
            prior_task = asyncio.create_task(
                timed("prior", country_prior(client, query.encoded, self.prompts, cfg.prior_samples, spent["prior"]))
            )
        if use_vlm and cfg.reasoning and cfg.reasoning_neighbours == 0:
            reasoning_task = asyncio.create_task(self._reason(query, spent["reasoning"], "", timed))
        prior: list[CountryScore] = []
        guesses: list[Guess] = []
        try:
            vector = await timed("embed", retriever.embed(image))
            if cfg.submap != "none" and prior_task is not None:
                prior = await prior_task
            if cfg.submap == "kmeans" and reasoning_task is not None:
                guesses = await reasoning_task
            candidates = await timed("retrieve", self._retrieve(retriever, vector, prior, guesses, trace))
            if use_vlm and cfg.reasoning and reasoning_task is None:  # the neighbour-augmented variant
                block = neighbour_block(self.prompts, candidates, cfg.reasoning_neighbours)
                reasoning_task = asyncio.create_task(self._reason(query, spent["reasoning"], block, timed))
            if prior_task is not None:
                prior = await prior_task
            if reasoning_task is not None:
                guesses = await reasoning_task
        except BaseException:
            for task in (prior_task, reasoning_task):
                if task is not None:
                    task.cancel()
            raise
        return candidates, prior, guesses

    def _fusion_weights(self) -> dict[str, float]:
        cfg = self.settings.agent
        return {
            "w_votes": cfg.fusion_votes,
            "w_retrieval": cfg.fusion_retrieval,
            "w_prior": cfg.fusion_prior,
            "w_proximity": cfg.fusion_proximity,
            "w_consensus": cfg.fusion_consensus,
            "bandwidth_km": cfg.consensus_bandwidth_km,
            "proximity_km": cfg.proximity_km,
        }

    async def _reason(self, query: Photo, stats: CallStats, neighbours: str, timed: Any) -> list[Guess]:
        cfg = self.settings.agent
        client = self.pool.for_task("reasoning")
        return await timed("reasoning", reason(client, query.encoded, self.prompts, cfg.reasoning_samples, stats, neighbours=neighbours))

    async def _retrieve(
        self, retriever: Retriever, vector: Any, prior: list[CountryScore], guesses: list[Guess], trace: Trace
    ) -> list[Candidate]:
        """Top-k candidates, inside (or boosted toward) the submap the prior and reasoning point at."""
        cfg = self.settings.agent
        k = cfg.top_k or self.settings.retrieval.top_k
        countries: set[str] | None = None
        clusters: set[int] | None = None
        if cfg.submap == "country" and prior:
            countries = {entry.country for entry in prior[: cfg.prior_countries]}
        elif cfg.submap == "kmeans":
            guess = consensus(guesses, cfg.reasoning_cluster_km)
            if guess is not None:
                clusters = set(retriever.table.nearest_clusters(guess.lat, guess.lon, cfg.submap_clusters))
            elif prior:
                wanted = {entry.country for entry in prior[: cfg.prior_countries]}
                clusters = {int(c) for c, country in zip(retriever.table.cluster, retriever.table.country) if country in wanted}
        if countries is None and clusters is None:
            return await retriever.search(vector, k)
        trace.submap = {"countries": sorted(countries or []), "clusters": [str(c) for c in sorted(clusters or [])]}
        if cfg.submap_weight is None:
            inside = await retriever.search(vector, k, countries, clusters)
            return inside or await retriever.search(vector, k)  # an empty submap falls back to the whole map
        wide = await retriever.search(vector, k * SUBMAP_BOOST_POOL)
        inside_ids = {c.id for c in await retriever.search(vector, k * SUBMAP_BOOST_POOL, countries, clusters)}
        boosted = sorted(wide, key=lambda c: -((c.retrieval_score or 0.0) + cfg.submap_weight * (c.id in inside_ids)))  # type: ignore[operator]
        return boosted[:k]

    async def _reference_photos(self, pool: list[Candidate]) -> dict[str, Photo | None]:
        """Each candidate's reference photo, loaded in threads and kept for later queries."""
        max_side = self.settings.agent.max_image_side

        def load(path: str) -> Photo | None:
            try:
                return Photo.of(open_image(path), max_side, path)
            except InputError:
                return None  # moved or deleted since indexing: the candidate is described by its coordinates

        wanted = [c.image_path for c in pool if c.image_path and c.image_path not in self._references]
        for path, photo in zip(wanted, await asyncio.gather(*(asyncio.to_thread(load, p) for p in wanted))):  # type: ignore[arg-type]
            self._references[path] = photo  # type: ignore[index]
        for c in pool:
            if c.image_path:
                self._references.move_to_end(c.image_path)
        while len(self._references) > REFERENCE_PHOTO_CACHE:
            self._references.popitem(last=False)
        return {c.id: self._references.get(c.image_path) if c.image_path else None for c in pool}


def _photo_stats(spent: dict[str, CallStats], wall_s: float) -> LocateStats:
    total = sum(spent.values(), CallStats())
    return LocateStats(
        vlm_calls=total.requests,
        cache_hits=total.cache_hits,
        asks=total.asks,
        wall_s=round(wall_s, 4),
        prompt_tokens=total.prompt_tokens,
        completion_tokens=total.completion_tokens,
        calls_by_task={task: stats.requests for task, stats in spent.items() if stats.asks},
    )


def _guess_candidate(guess: Guess) -> Candidate:
    country, place = reverse_geocode(guess.lat, guess.lon)[0]
    return Candidate(id="reasoning", lat=guess.lat, lon=guess.lon, country=guess.country or country, place=place, source="reasoning")
