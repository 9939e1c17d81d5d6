"""GeoAgent.locate: retrieval, the country prior, reasoning and reranking, run concurrently, then aggregated."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from geoagent.agent.aggregate import confidence, fuse
from geoagent.agent.calibration import Calibrator, abstain, features
from geoagent.agent.events import AgentEvent, CandidatesRetrieved, Done, GuessesReady, OnEvent, PriorReady, RerankStarted
from geoagent.agent.prior import country_prior
from geoagent.agent.questions import QuestionLog
from geoagent.agent.reasoning import consensus, neighbour_block, reason
from geoagent.agent.rerank import MODEL_STRATEGIES, STRATEGIES, Comparator, Photo
from geoagent.config import Settings, load_config
from geoagent.errors import ConfigError, GeoAgentError, InputError, PhotoError, RunStopped, UnreachableError
from geoagent.exif import ExifGPS, ExifInfo, has_gps, read_exif
from geoagent.geo import haversine_km, reverse_geocode
from geoagent.images import in_decode_pool, open_image, set_pixel_limit
from geoagent.loads import ThreadLoads
from geoagent.paths import display_path
from geoagent.prompts import PromptSet
from geoagent.retrieval.duplicates import EXACT_COPY_SIMILARITY, resolve_threshold
from geoagent.retrieval.embedder import check_model_files
from geoagent.retrieval.retriever import Retriever
from geoagent.types import Candidate, CountryScore, Guess, LocateResult, LocateStats, Trace
from geoagent.vlm import CallStats, VLMPool

if TYPE_CHECKING:
    from geoagent.ranker.service import ModelVotes, Ranker
    from geoagent.retrieval.index import ReferenceIndex

REFERENCE_PHOTO_CACHE = 512  # encoded reference photos kept across queries (references recur in batches)
SUBMAP_BOOST_POOL = 4  # with a submap weight, retrieve this many times top_k before re-weighting
MIN_PHOTOS_IN_FLIGHT = 2  # even against a one-slot server: one photo's retrieval overlaps another's questions
PHOTOS_PER_SLOT = 2  # photos in flight per request slot when max_concurrent_photos is unset
#: locate_many: photos started ahead of the next result to yield, per photo in flight (in input order, a slow photo
#: holds back those that finished after it: this bounds how many)
REORDER_WINDOW = 4
UNREACHABLE_PHOTOS_BEFORE_STOP = 3  # photos in a row lost to an unreachable server before the run stops
EXIF_CONFIDENCE = 1.0  # an answer from the photo's own GPS is as sure as its metadata is honest
ANSWERED_FROM_EXIF = "answered from the photo's EXIF GPS (agent.use_exif)"

T = TypeVar("T")


@dataclass
class Readiness:
    """What the preflight found: problems that stop every photo, and warnings the run can live with."""

    problems: list[GeoAgentError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def tell(self, warn: Callable[[str], None], error: Callable[[str], None]) -> int:
        """Pass every warning and problem on, in that order; the exit code the problems call for (0: none)."""
        for warning in self.warnings:
            warn(warning)
        for problem in self.problems:
            error(str(problem))
        return max((p.exit_code for p in self.problems), default=0)


@dataclass
class RunGuard:
    """When a run over many photos must stop: at the first failure that is not the photo's own (credentials
    refused, model missing), or after ``UNREACHABLE_PHOTOS_BEFORE_STOP`` photos in a row lost to an unreachable
    server. Shared by :meth:`GeoAgent.locate_many` and the batch engines."""

    unreachable_in_a_row: int = 0

    def stop_reason(self, outcome: LocateResult | GeoAgentError) -> str | None:
        """Record one photo's outcome (in the order photos finish); why the run must stop now, or None."""
        if not isinstance(outcome, GeoAgentError):
            self.unreachable_in_a_row = 0
            return None
        if not outcome.per_item:
            return f"stopped: {outcome}"
        if isinstance(outcome, PhotoError) and isinstance(outcome.cause, UnreachableError):
            self.unreachable_in_a_row += 1
            if self.unreachable_in_a_row >= UNREACHABLE_PHOTOS_BEFORE_STOP:
                return f"stopped after {self.unreachable_in_a_row} photos in a row could not be answered: {outcome.cause}"
        return None

    @staticmethod
    def keeps(outcome: LocateResult | GeoAgentError) -> bool:
        """False for a failure that belongs to the run, not the photo: the photo was never really tried."""
        return not isinstance(outcome, GeoAgentError) or outcome.per_item


class GeoAgent:
    """Locate photos. Use as ``async with GeoAgent.from_config(...) as agent: await agent.locate(path)``."""

    def __init__(self, settings: Settings, *, retriever: Retriever | None = None, pool: VLMPool | None = None) -> None:
        self.settings = settings
        set_pixel_limit(settings.images.max_pixels)  # process-wide, as Pillow's own limit is
        self.prompts = PromptSet(settings.agent.prompts_dir)
        self.pool = pool or VLMPool(settings)
        self._retriever = retriever
        self._retriever_lock = asyncio.Lock()
        self._ranker: Ranker | None = None
        self._ranker_lock = asyncio.Lock()
        self._references = ThreadLoads(self._load_reference, REFERENCE_PHOTO_CACHE)
        self._sync_loop: asyncio.AbstractEventLoop | None = None
        self._calibrator: Calibrator | None = None

    def calibrator(self) -> Calibrator | None:
        """The fitted calibrator ``agent.calibration`` names (read once); None: confidence stays uncalibrated."""
        path = self.settings.agent.calibration
        if path is not None and self._calibrator is None:
            self._calibrator = Calibrator.load(path)
            if self._calibrator.confidence_km != self.settings.agent.confidence_km:
                raise ConfigError(
                    f"{path}: fitted for confidence_km = {self._calibrator.confidence_km:g}, but agent.confidence_km = "
                    f"{self.settings.agent.confidence_km:g}; refit it or set the same distance"
                )
        return self._calibrator

    def setup_key(self) -> tuple[str, str, str | None]:
        """(model, strategy, index) a calibrator is fitted for: the pairwise profile's model, the strategy, the index."""
        _, profile = self.settings.profile("pairwise")
        index = self.settings.retrieval.index
        return profile.model, self.settings.agent.strategy, str(index) if index is not None else None

    @classmethod
    def from_config(cls, path: str | Path | None = None, **overrides: Any) -> GeoAgent:
        """Settings from a TOML file (default ./geoagent.toml), the environment and keyword overrides."""
        return cls(load_config(path, overrides))

    async def __aenter__(self) -> GeoAgent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self) -> GeoAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def aclose(self) -> None:
        await self.pool.aclose()

    def close(self) -> None:
        """Release connections after :meth:`locate_sync` calls (``with GeoAgent.from_config() as agent:``)."""
        if self._sync_loop is not None:
            self._sync_loop.run_until_complete(self.aclose())
            self._sync_loop.close()
            self._sync_loop = None

    def locate_sync(self, photo: str | Path, *, explain: bool = False) -> LocateResult:
        """Blocking convenience wrapper (not from inside a running event loop); call it as often as you like.

        The calls share one private event loop, so the connections and the concurrency limits carry over;
        :meth:`close` (or a ``with`` block) releases them.
        """
        if self._sync_loop is None:
            self._sync_loop = asyncio.new_event_loop()
        return self._sync_loop.run_until_complete(self.locate(photo, explain=explain))

    async def retriever(self) -> Retriever:
        """The embedder and candidate source, loaded once on first use (in a worker thread)."""
        async with self._retriever_lock:
            if self._retriever is None:
                self._retriever = await Retriever.load(self.settings.retrieval)
            return self._retriever

    async def ranker(self) -> Ranker:
        """The trained ranker of a model strategy (georanker), loaded once on first use (in a worker thread)."""
        async with self._ranker_lock:
            if self._ranker is None:
                from geoagent.ranker.service import Ranker

                self._ranker = await Ranker.load(self.settings.ranker)
            return self._ranker

    async def preflight(self, photos: Sequence[str | Path] = ()) -> Readiness:
        """Everything that would stop every photo, found at once: missing weights, unset keys, unusable servers.

        Two rounds: the cheap checks first (backends reachable, keys set, models present, a checkpoint file
        there), then the heavy loads (CLIP, the gazetteer, a ranker). A problem found in the first round is
        reported without importing PyTorch: a down server is told in a second, not after the model loads.

        A server that is down (or refuses us) is only a warning while the cache holds answers of its model: a
        rerun is answered from the cache, and only the questions it cannot answer fail. With ``use_exif``, when
        every one of ``photos`` carries EXIF GPS nothing is needed (no model will run), so nothing is checked.
        """
        readiness = Readiness()
        if photos and self.settings.agent.use_exif and all(await asyncio.gather(*(in_decode_pool(has_gps, p) for p in photos))):
            return readiness

        async def attempt(coroutine: Any) -> None:
            try:
                await coroutine
            except GeoAgentError as exc:
                readiness.problems.append(exc)

        if self.pool.cache is not None:  # first: the backends' checks read it
            await attempt(self.pool.cache.check())
        cheap = [attempt(asyncio.to_thread(check_model_files, self.settings.retrieval)), attempt(self._check_calibration(readiness))]
        heavy: list[Callable[[], Awaitable[Any]]] = [lambda: self._check_retriever(readiness)]
        if self.settings.agent.strategy != "none":
            agent = self.settings.agent
            by_model = agent.strategy in MODEL_STRATEGIES
            tasks = [] if by_model else ["pointwise" if agent.strategy == "pointwise" else "pairwise"]
            tasks += [task for task, on in (("prior", agent.country_prior), ("reasoning", agent.reasoning)) if on]
            if by_model:  # the rerank task is the ranker's: its weights, not a VLM backend
                heavy.append(self.ranker)
            cheap += [attempt(self._check_backend(name, readiness)) for name in self.settings.routed_profiles(tuple(tasks))]
        await asyncio.gather(*cheap)
        if not readiness.problems:  # otherwise every photo would fail: say so before loading any model
            await asyncio.gather(*(attempt(load()) for load in heavy))
        return readiness

    async def _check_calibration(self, readiness: Readiness) -> None:
        calibrator = await asyncio.to_thread(self.calibrator)
        if calibrator is not None and (mismatch := calibrator.mismatch(*self.setup_key())):
            readiness.warnings.append(f"{display_path(self.settings.agent.calibration)}: {mismatch}")
        if calibrator is None and self.settings.agent.min_confidence is not None:
            readiness.warnings.append(
                "agent.min_confidence applies to the uncalibrated score (no agent.calibration): it is no probability; "
                "fit one with geoagent eval ... --calibrate FILE"
            )

    async def _check_retriever(self, readiness: Readiness) -> None:
        await self.retriever()
        index = self._reference_index()
        if index is not None and index.manifest.near_duplicates is None and self.settings.agent.near_duplicate_similarity is None:
            readiness.warnings.append(
                f"{display_path(index.directory)}: built before near-duplicate calibration, so only exact copies of a reference "
                f"(similarity from {EXACT_COPY_SIMILARITY}) win outright; rebuild it (embeddings are reused) to calibrate"
            )

    def _reference_index(self) -> ReferenceIndex | None:
        """The loaded reference index (None: not loaded yet, or the gazetteer stands in)."""
        from geoagent.retrieval.index import ReferenceIndex

        source = self._retriever.source if self._retriever is not None else None
        return source if isinstance(source, ReferenceIndex) else None

    def near_duplicate_threshold(self) -> float | None:
        """The similarity from which the top reference is the answer (None: never), once the retriever is loaded."""
        index = self._reference_index()
        calibration = index.manifest.near_duplicates if index is not None else None
        return resolve_threshold(self.settings.agent.near_duplicate_similarity, calibration, indexed=index is not None)

    async def _check_backend(self, name: str, readiness: Readiness) -> None:
        """Every server of the profile. One that is down is taken out (probed again as the run goes) while another
        serves; when none serves, the run goes on only if the cache holds answers of the model. Servers that
        refuse us while others serve, or that report different weights, stop the run."""
        client = self.pool.client(name)
        found = await client.check()
        failed = [(server, outcome) for server, outcome in found if isinstance(outcome, GeoAgentError)]
        for problem in (outcome for _, outcome in failed if isinstance(outcome, ConfigError)):
            raise problem
        for _, outcome in found:
            if not isinstance(outcome, GeoAgentError):
                readiness.warnings += outcome.warnings
        if len(failed) < len(found):
            for _, outcome in failed:
                if not isinstance(outcome, UnreachableError):
                    raise outcome
                readiness.warnings.append(f"{outcome}; taken out of the run, probed again as it goes")
            await client.identity()  # servers reporting different weights are refused here, before any photo
            return
        cache = self.pool.cache
        cached = cache is not None and await cache.has_answers(client.profile.kind, client.profile.model)
        if not cached:
            raise failed[0][1]
        for server, outcome in failed:
            client.servers.take_out(server, outcome)  # questions the cache cannot answer fail at once (still probed)
            readiness.warnings.append(f"{outcome}; answering from the cache, questions it cannot answer will fail")

    def photos_in_flight(self) -> int:
        """``max_concurrent_photos``, or two photos per request slot of the busiest routed backend: a photo keeps
        one or two questions in flight on average (a tournament's later rounds, an adaptive match's second ask
        waiting for its first), so two per slot keep the server saturated up to the batch's last photos."""
        if self.settings.agent.max_concurrent_photos is not None:
            return self.settings.agent.max_concurrent_photos
        slots = max(self.settings.backends[name].total_concurrency() for name in self.settings.routed_profiles())
        return max(MIN_PHOTOS_IN_FLIGHT, PHOTOS_PER_SLOT * slots)

    async def locate_many(
        self, photos: Iterable[str | Path], *, explain: bool = False
    ) -> AsyncIterator[tuple[str, LocateResult | GeoAgentError]]:
        """Results in input order, several photos in flight at once; a photo that fails yields its error and the
        rest go on.

        At most ``REORDER_WINDOW`` times :meth:`photos_in_flight` photos are started ahead of the next one to be
        yielded (``photos`` is read only that far), so one slow photo holds back that many finished results at
        most: memory is bounded by the photos in flight, not by the run.

        Raises RunStopped, after yielding every photo that finished, when the rest would fail the same way:
        a backend refused the credentials or lacks the model, or its server was unreachable for
        ``UNREACHABLE_PHOTOS_BEFORE_STOP`` photos in a row.
        """
        slots = self.photos_in_flight()
        window = REORDER_WINDOW * slots
        limit = asyncio.Semaphore(slots)
        stopped: asyncio.Future[RunStopped] = asyncio.get_running_loop().create_future()
        guard = RunGuard()

        async def one(photo: str | Path) -> LocateResult | GeoAgentError | None:
            async with limit:
                if stopped.done():
                    return None  # never tried
                try:
                    outcome: LocateResult | GeoAgentError = await self.locate(photo, explain=explain)
                except GeoAgentError as exc:
                    outcome = exc
                reason = guard.stop_reason(outcome)
                if reason is not None and not stopped.done():
                    stopped.set_result(RunStopped(reason))
                return outcome if guard.keeps(outcome) else None

        source = iter(photos)
        started: deque[tuple[str | Path, asyncio.Task[LocateResult | GeoAgentError | None]]] = deque()
        try:
            while not stopped.done():
                while len(started) < window and (photo := next(source, None)) is not None:
                    started.append((photo, asyncio.create_task(one(photo))))
                if not started:
                    break
                photo, task = started[0]
                await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    started.popleft()
                    if (outcome := task.result()) is not None:
                        yield str(photo), outcome
            if stopped.done():
                for photo, task in list(started):  # what had finished when the run stopped, in input order
                    if task.done() and (outcome := task.result()) is not None:
                        yield str(photo), outcome
                raise stopped.result()
        finally:
            for _, task in started:
                task.cancel()
            await asyncio.gather(*(task for _, task in started), return_exceptions=True)

    async def locate(
        self, photo: str | Path, *, explain: bool = False, vector: np.ndarray | None = None, on_event: OnEvent | None = None
    ) -> LocateResult:
        """Where was ``photo`` taken? Raises InputError for an unusable photo.

        ``vector``: the photo's CLIP embedding when it was computed already (the Ray engine embeds in batches).
        ``on_event``: told each step as it happens (see :mod:`geoagent.agent.events`); the result is the same.
        """
        cfg = self.settings.agent
        started = time.perf_counter()
        timings: dict[str, float] = {}
        log = QuestionLog()
        trace = Trace(strategy=cfg.strategy)

        async def timed(name: str, coroutine: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await coroutine
            finally:
                timings[name] = round(time.perf_counter() - t0, 4)

        exif = await in_decode_pool(read_exif, photo)  # metadata first, before any model runs
        if cfg.use_exif and exif is not None and exif.gps is not None:
            trace_or_none = trace if explain else None
            return await asyncio.to_thread(_exif_answer, photo, exif, exif.gps, time.perf_counter() - started, trace_or_none)
        retriever = await self.retriever() if vector is None else None
        step = "embed" if retriever is not None else "decode"  # the decode is timed with the embedding it feeds
        query, embedded, pixels = await timed(step, in_decode_pool(self._prepare, photo, retriever))
        vector = embedded if vector is None else vector
        candidates, prior, guesses = await self._gather_evidence(query, log, trace, timed, vector, on_event)

        guess = consensus(guesses, cfg.reasoning_cluster_km)
        pool = list(candidates)
        if guess is not None:
            pool.append(await asyncio.to_thread(_guess_candidate, guess))
        prior_p = {entry.country: entry.p for entry in prior}
        weights = self._fusion_weights()
        votes: dict[str, float] = {}
        comparator = None
        evidence_only, _ = fuse(pool, {}, prior_p, guess, **{**weights, "w_votes": 0.0})
        duplicate = self._near_duplicate(candidates)
        skip = self._early_exit(evidence_only, duplicate) if cfg.strategy != "none" else "off"
        stages = {
            "prior": "ran" if cfg.strategy != "none" and cfg.country_prior else "off",
            "reasoning": "ran" if cfg.strategy != "none" and cfg.reasoning else "off",
            "rerank": skip if skip == "off" else f"skipped: {skip}" if skip else "ran",
        }
        if on_event is not None:
            on_event(RerankStarted(strategy=cfg.strategy, pool=pool, skipped=skip))
        scored = None
        if skip is None and cfg.strategy in MODEL_STRATEGIES:
            scored = await timed("rerank", self._model_votes(pixels, pool))
            votes = scored.votes
        elif skip is None:
            task = "pointwise" if cfg.strategy == "pointwise" else "pairwise"
            comparator = Comparator(
                pairwise_client=self.pool.for_task("pairwise"),
                pointwise_client=self.pool.for_task("pointwise"),
                prompts=self.prompts,
                query=query,
                photos=await self._reference_photos(pool),
                base={c.id: c.score for c in evidence_only},
                log=log,
                stats=log.spent[task],
                layout=cfg.image_layout,
                view=cfg.view,
                debias=cfg.position_debias,
                adaptive_margin=cfg.adaptive_margin,
                max_side=cfg.max_image_side,
                set_size=cfg.set_size,
                on_event=on_event,
            )
            votes = await timed("rerank", STRATEGIES[cfg.strategy](pool, comparator, cfg.vote_model))
        failure = log.nothing_answered(display_path(photo))
        if failure is not None:
            raise failure
        ranked, terms = fuse(pool, votes, prior_p, guess, **weights)
        if duplicate is not None:  # a copy of the photo is the answer, whatever its neighbours say
            ranked = [c.model_copy(update={"rank": r}) for r, c in enumerate(sorted(ranked, key=lambda c: c.id != duplicate.id), 1)]
        top = ranked[0]

        if explain:
            trace.pool = [c.id for c in pool]
            trace.guesses, trace.consensus_guess = guesses, guess
            if comparator is not None:
                trace.matches, trace.sets, trace.pointwise = comparator.matches, comparator.sets, comparator.scores
            if scored is not None:
                trace.rewards, trace.rewards_without_photo = scored.rewards, scored.without_photo
            trace.fusion = terms
            trace.prompts = self.prompts.hashes()
            trace.timings_s = timings
        score = confidence(ranked, cfg.consensus_bandwidth_km)
        evidence = features(ranked, terms, prior_p, guess, cfg.consensus_bandwidth_km, score, duplicate is not None)
        calibrator = self.calibrator()
        result = LocateResult(
            image=display_path(photo),
            lat=top.lat,
            lon=top.lon,
            country=top.country,
            place=top.place,
            confidence=calibrator.probability(evidence) if calibrator is not None else score,
            calibrated=calibrator is not None,
            confidence_km=cfg.confidence_km,
            confidence_features=evidence,
            candidates=ranked,
            prior=prior,
            match="near_duplicate" if duplicate is not None else None,
            exif=exif,
            stats=_photo_stats(log, time.perf_counter() - started, stages),
            trace=trace if explain else None,
        )
        if cfg.min_confidence is not None and result.confidence < cfg.min_confidence:
            result = abstain(result)
        if on_event is not None:
            on_event(Done(result=result))
        return result

    async def _gather_evidence(
        self, query: Photo, log: QuestionLog, trace: Trace, timed: Any, vector: np.ndarray, on_event: OnEvent | None = None,
    ) -> tuple[list[Candidate], list[CountryScore], list[Guess]]:
        """Retrieval (in threads) while the prior and reasoning are asked; a submap waits for what it needs."""
        cfg = self.settings.agent
        use_vlm = cfg.strategy != "none"
        retriever = await self.retriever()
        prior_task = reasoning_task = None
        if use_vlm and cfg.country_prior:
            client = self.pool.for_task("prior")
            prior_task = asyncio.create_task(
                _told(timed("prior", country_prior(client, query.encoded, self.prompts, cfg.prior_samples, log.spent["prior"], log)),
                      on_event, lambda prior: PriorReady(prior=prior))
            )
        if use_vlm and cfg.reasoning and cfg.reasoning_neighbours == 0:
            reasoning_task = asyncio.create_task(self._reason(query, log, "", timed, on_event))
        prior: list[CountryScore] = []
        guesses: list[Guess] = []
        try:
            if cfg.submap != "none" and prior_task is not None:
                prior = await prior_task
            if cfg.submap == "kmeans" and reasoning_task is not None:
                guesses = await reasoning_task
            candidates = await timed("retrieve", self._retrieve(retriever, vector, prior, guesses, trace))
            if on_event is not None:
                on_event(CandidatesRetrieved(candidates=candidates))
            if use_vlm and cfg.reasoning and reasoning_task is None:  # the neighbour-augmented variant
                block = neighbour_block(self.prompts, candidates, cfg.reasoning_neighbours)
                reasoning_task = asyncio.create_task(self._reason(query, log, block, timed, on_event))
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

    async def _model_votes(self, image: Any, pool: list[Candidate]) -> ModelVotes:
        """A model strategy's votes for the pool (a ``ModelVotes``): rewards from the trained ranker."""
        return await (await self.ranker()).votes(image, pool)

    def _near_duplicate(self, candidates: list[Candidate]) -> Candidate | None:
        """The reference the photo copies (re-encoded, resized, cropped), when its similarity reaches the threshold."""
        threshold = self.near_duplicate_threshold()
        scored = [c for c in candidates if c.source == "index" and c.retrieval_score is not None]
        best = max(scored, key=lambda c: c.retrieval_score or 0.0, default=None)
        return best if threshold is not None and best is not None and (best.retrieval_score or 0.0) >= threshold else None

    def _early_exit(self, by_evidence: list[Candidate], duplicate: Candidate | None) -> str | None:
        """Why reranking can be skipped (it could not move the answer), or None."""
        cfg = self.settings.agent
        if duplicate is not None:
            return f"{duplicate.id} is a near-duplicate of the photo (similarity {duplicate.retrieval_score:.4f})"
        if len(by_evidence) < 2:
            return "fewer than two candidates"
        if not cfg.early_exit:
            return None
        top = by_evidence[0]
        spread = float(max(haversine_km(np.array([c.lat for c in by_evidence]), np.array([c.lon for c in by_evidence]), top.lat, top.lon)))
        if spread <= cfg.consensus_bandwidth_km:
            return f"every candidate lies within {spread:.1f} km of the top one (consensus_bandwidth_km {cfg.consensus_bandwidth_km:g})"
        return None

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

    async def _reason(self, query: Photo, log: QuestionLog, neighbours: str, timed: Any, on_event: OnEvent | None = None) -> list[Guess]:
        cfg = self.settings.agent
        client = self.pool.for_task("reasoning")
        guesses = reason(client, query.encoded, self.prompts, cfg.reasoning_samples, log.spent["reasoning"], log, neighbours=neighbours)
        told = _told(guesses, on_event, lambda found: GuessesReady(guesses=found, consensus=consensus(found, cfg.reasoning_cluster_km)))
        return await timed("reasoning", told)

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
                clusters = retriever.table.clusters_in(wanted)
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

    def _prepare(self, photo: str | Path, retriever: Retriever | None) -> tuple[Photo, np.ndarray | None, Any]:
        """Decode the photo, encode it for the models and embed it (with ``retriever``) in one decode slot, so
        its full-resolution pixels never outlive the slot: at most DECODE_SLOTS photos hold them at once.
        The pixels themselves are kept only for a model strategy (GeoRanker scores them)."""
        cfg = self.settings.agent
        image = open_image(photo)
        query = Photo.of(image, cfg.max_image_side, str(photo), keep_pixels=cfg.image_layout == "composite")
        vector = retriever.embedder.embed_images_sync([image])[0] if retriever is not None else None
        return query, vector, image if cfg.strategy in MODEL_STRATEGIES else None

    def _load_reference(self, path: str) -> Photo | None:
        """A reference photo ready to send (blocking); None when it moved or was deleted since indexing: the
        candidate is then described by its coordinates."""
        cfg = self.settings.agent
        try:
            return Photo.of(open_image(path), cfg.candidate_image_side, path, keep_pixels=cfg.image_layout == "composite", role="candidate")
        except InputError:
            return None

    async def _reference_photos(self, pool: list[Candidate]) -> dict[str, Photo | None]:
        """Each candidate's reference photo, loaded in threads and kept for later queries (photos in flight at
        once share loads)."""
        paths = list({c.image_path for c in pool if c.image_path})
        photos = dict(zip(paths, await asyncio.gather(*(self._references.get(path) for path in paths))))
        return {c.id: photos[c.image_path] if c.image_path else None for c in pool}


def _told(coroutine: Awaitable[T], on_event: OnEvent | None, event: Callable[[T], AgentEvent]) -> Awaitable[T]:
    """``coroutine``, telling ``on_event`` its outcome (as ``event(outcome)``) the moment it lands; as it is when
    no one listens."""
    if on_event is None:
        return coroutine
    listener = on_event

    async def telling() -> T:
        outcome = await coroutine
        listener(event(outcome))
        return outcome

    return telling()


def _photo_stats(log: QuestionLog, wall_s: float, stages: dict[str, str]) -> LocateStats:
    total = sum(log.spent.values(), CallStats())
    return LocateStats(
        vlm_calls=total.requests,
        cache_hits=total.cache_hits,
        asks=total.asks,
        wall_s=round(wall_s, 4),
        input_tokens=total.input_tokens,
        cached_input_tokens=total.cached_input_tokens,
        output_tokens=total.output_tokens,
        calls_by_task={task: stats.requests for task, stats in log.spent.items() if stats.asks},
        cost_usd=None if total.unpriced_requests else total.cost_usd,
        failed_questions=log.failed,
        stages=stages,
    )


def _exif_answer(photo: str | Path, exif: ExifInfo, gps: ExifGPS, wall_s: float, trace: Trace | None) -> LocateResult:
    """The photo's EXIF GPS as the answer: one candidate, no retrieval, no VLM request."""
    lat, lon = gps.lat, gps.lon
    country, place = reverse_geocode(lat, lon)[0]
    point = Candidate(id="exif", lat=lat, lon=lon, country=country, place=place, source="exif", score=EXIF_CONFIDENCE, rank=1)
    skipped = f"skipped: {ANSWERED_FROM_EXIF}"
    stages = {"retrieval": skipped, "prior": skipped, "reasoning": skipped, "rerank": skipped}
    return LocateResult(
        image=display_path(photo), lat=lat, lon=lon, country=country, place=place, confidence=EXIF_CONFIDENCE,
        candidates=[point], exif=exif, source="exif",
        stats=LocateStats(wall_s=round(wall_s, 4), stages=stages), trace=trace,
    )


def _guess_candidate(guess: Guess) -> Candidate:
    country, place = reverse_geocode(guess.lat, guess.lon)[0]
    return Candidate(id="reasoning", lat=guess.lat, lon=guess.lon, country=guess.country or country, place=place, source="reasoning")
