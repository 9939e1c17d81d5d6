"""One batch run: read INPUT lazily, skip what the journal holds, hand the rest to an engine, journal each
outcome as it comes, then compact the journal and write the output format.

Failures the journal holds for items no longer in INPUT (a photo since removed, a CSV line since fixed: its
``t.csv line N`` key names nothing now) are stale: once INPUT has been read to its end they are dropped from the
journal (and from the exit code), so fixing the input and rerunning ends with exit 0.
"""

from __future__ import annotations

import asyncio
import csv
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from geoagent.batch.engines import DEFAULT_ENGINE, BaseEngine, load_engine
from geoagent.batch.formats import OutputPlan, check_output, write_output
from geoagent.batch.inputs import BatchInput, BatchInputError, BatchItem
from geoagent.batch.journal import Journal, failure_line, keyed_line
from geoagent.config import Settings
from geoagent.errors import GeoAgentError, PhotoError, RunStopped, UnreachableError
from geoagent.exif import has_gps
from geoagent.paths import display_path
from geoagent.vlm.types import CallStats

READ_AHEAD = 64  # input items read per hop to the reading thread (a folder walk or CSV read never blocks the loop)


@dataclass
class BatchProgress:
    """A snapshot for the progress bar. ``done`` counts photos in the journal (from earlier runs too)."""

    done: int
    total: int | None  # None until INPUT is counted
    done_before: int  # already journalled when this run started
    failed: int  # failures journalled by this run
    elapsed_s: float
    vlm: CallStats = field(default_factory=CallStats)

    @property
    def photos_per_s(self) -> float:
        return (self.done - self.done_before) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def vlm_calls_per_s(self) -> float:
        return self.vlm.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def cache_hit_rate(self) -> float | None:
        return self.vlm.cache_hits / self.vlm.asks if self.vlm.asks else None


@dataclass
class BatchReport:
    """What a run did, and what the journal holds after it."""

    journal: Path
    output: Path | None = None  # the CSV or GeoJSON written, if any
    located: int = 0  # this run
    failed: int = 0  # this run, journalled
    unfinished: int = 0  # failed for an unreachable server: not journalled, a rerun does them
    skipped: int = 0  # already in the journal
    duplicates: int = 0  # named again in INPUT
    torn_bytes: int = 0  # a torn last line cut off the journal (that photo was redone)
    stale: int = 0  # failures dropped from the journal: their items are no longer in INPUT
    stopped: str | None = None  # why the run stopped early
    problems: list[GeoAgentError] = field(default_factory=list)  # preflight: nothing was located
    journal_located: int = 0
    journal_failed: int = 0
    vlm: CallStats = field(default_factory=CallStats)

    @property
    def exit_code(self) -> int:
        """0 every photo located, 1 some failed, 2 the run could not finish (preflight, stopped, server down)."""
        if self.problems:
            return max(p.exit_code for p in self.problems)
        if self.stopped or self.unfinished:
            return 2
        return 1 if self.journal_failed else 0


async def run_batch(
    settings: Settings,
    source: Path,
    plan: OutputPlan,
    *,
    engine: str = DEFAULT_ENGINE,
    retry_failed: bool = False,
    explain: bool = False,
    on_progress: Callable[[BatchProgress], None] | None = None,
    on_error: Callable[[str], None] = lambda _: None,
    on_warning: Callable[[str], None] = lambda _: None,
) -> BatchReport:
    """Locate every photo of ``source`` not yet in the journal (``retry_failed``: and those that failed).

    Nothing is loaded (no model, no server contacted) when nothing is left to do: the output is only
    (re)written from the journal.
    """
    engine_class = load_engine(engine)  # an unknown name fails before anything is read
    inputs = BatchInput(source)
    check_output(plan, source)
    with Journal.open(plan.journal) as journal:  # created by its first line: a run that fails before leaves none
        return await _run_batch(settings, journal, inputs, plan, engine_class, retry_failed, explain, on_progress, on_error, on_warning)


async def _run_batch(
    settings: Settings,
    journal: Journal,
    inputs: BatchInput,
    plan: OutputPlan,
    engine_class: type[BaseEngine],
    retry_failed: bool,
    explain: bool,
    on_progress: Callable[[BatchProgress], None] | None,
    on_error: Callable[[str], None],
    on_warning: Callable[[str], None],
) -> BatchReport:
    report = BatchReport(plan.journal, torn_bytes=journal.torn_bytes)
    if journal.torn_bytes:
        on_warning(f"{display_path(plan.journal)}: cut off a torn last line ({journal.torn_bytes} bytes); that photo is redone")
    run = _Run(journal, inputs, report, retry_failed, on_progress, on_error)
    try:
        first = await anext(run.pending, None)
        if first is None and run.seen == 0:
            raise BatchInputError(inputs.nothing_to_do())
        if first is not None:
            async with engine_class(settings, explain=explain) as worker:
                run.engine_totals = worker.totals
                gate = _Preflight(worker, settings.agent.use_exif, report, on_warning)
                try:
                    async for item, outcome in worker.run(gate.items(_chain(first, run.pending))):
                        await run.record(item, outcome)
                except RunStopped as exc:
                    report.stopped = str(exc)
                report.vlm = worker.totals()
    finally:
        await run.close()
    if report.problems and not (report.located or report.failed):
        return report  # nothing was located: no output written either
    if run.read_to_end:  # failures of items no longer in INPUT (a fixed CSV line, a removed photo) are stale
        stale = journal.failed_keys - run.failed_in_input
        journal.drop(stale)
        report.stale = len(stale)
    await asyncio.to_thread(journal.compact)
    report.journal_located, report.journal_failed = journal.located, journal.failures
    report.output = await asyncio.to_thread(write_output, plan, journal.entries)
    return report


class _Preflight:
    """The engine's preflight, run before the first photo that needs a model. With ``use_exif`` a photo whose
    EXIF carries GPS needs none, so a folder of geotagged photos runs without CLIP or a server; once a photo
    needs them and the preflight finds a problem, no further photo is handed to the engine."""

    def __init__(self, engine: BaseEngine, use_exif: bool, report: BatchReport, on_warning: Callable[[str], None]) -> None:
        self.engine, self.use_exif, self.report, self.on_warning = engine, use_exif, report, on_warning
        self.passed = False

    async def items(self, items: AsyncIterator[BatchItem]) -> AsyncIterator[BatchItem]:
        async for item in items:
            if not self.passed and await self._needs_models(item):
                readiness = await self.engine.preflight()
                for warning in readiness.warnings:
                    self.on_warning(warning)
                if readiness.problems:
                    self.report.problems = readiness.problems
                    return
                self.passed = True
            yield item

    async def _needs_models(self, item: BatchItem) -> bool:
        return not (self.use_exif and item.path is not None and await asyncio.to_thread(has_gps, item.path))


class _Run:
    """The bookkeeping of one run: which items to do, journalling outcomes, progress."""

    def __init__(
        self,
        journal: Journal,
        inputs: BatchInput,
        report: BatchReport,
        retry_failed: bool,
        on_progress: Callable[[BatchProgress], None] | None,
        on_error: Callable[[str], None],
    ) -> None:
        self.journal = journal
        self.inputs = inputs
        self.report = report
        self.retry_failed = retry_failed
        self.on_progress = on_progress
        self.on_error = on_error
        self.started = time.perf_counter()
        self.done_before = journal.located if retry_failed else len(journal)
        self.done = self.done_before
        self.total: int | None = None
        self.seen = 0  # items read from INPUT
        self.read_to_end = False  # INPUT was read to its end: what it does not name is stale
        self.failed_in_input: set[str] = set()  # journal keys of INPUT's items the journal holds as failed
        self.engine_totals: Callable[[], CallStats] = CallStats
        self._counting = asyncio.create_task(asyncio.to_thread(self._count)) if on_progress else None
        self.pending = self._pending()

    def _count(self) -> int | None:
        try:
            return self.inputs.count()
        except (OSError, csv.Error, GeoAgentError):
            return None  # the bar goes without a total; reading the items reports the problem

    def _todo(self) -> Iterator[BatchItem]:
        """INPUT's items not yet journalled (or journalled as failed, with retry_failed), each key once."""
        submitted: set[str] = set()
        for item in self.inputs.items():
            self.seen += 1
            key = self.journal.key_for(item.key, item.image)
            if item.key in submitted:
                self.report.duplicates += 1
                continue
            failed = self.journal.failed(key)
            if key in self.journal and not (self.retry_failed and failed):
                self.report.skipped += 1
                if failed:
                    self.failed_in_input.add(key)
            else:
                submitted.add(item.key)
                if failed and key == item.key:
                    self.failed_in_input.add(key)  # retried: it counts until a new outcome replaces it
                yield item
        self.read_to_end = True

    async def _pending(self) -> AsyncIterator[BatchItem]:
        """The items to locate, read in a worker thread a few at a time; items whose problem the input
        already tells (a CSV row without a path) are journalled as failed here, never located."""
        todo = self._todo()
        while chunk := await asyncio.to_thread(lambda: list(islice(todo, READ_AHEAD))):
            for item in chunk:
                if item.problem is None:
                    yield item
                else:
                    await self._journal(item.key, failure_line(item.key, item.error, item.image), failed=True, message=item.error)

    async def record(self, item: BatchItem, outcome: object) -> None:
        if isinstance(outcome, GeoAgentError):
            if isinstance(outcome, PhotoError) and isinstance(outcome.cause, UnreachableError):
                self.report.unfinished += 1  # the server's fault, not the photo's: left for the rerun
                self.on_error(f"{outcome} (not journalled: a rerun tries it again)")
                return
            await self._journal(item.key, failure_line(item.key, str(outcome), item.image), failed=True, message=str(outcome))
            return
        result = outcome.model_copy(update={"image": item.image})  # type: ignore[attr-defined]
        await self._journal(item.key, keyed_line(item.key, result.model_dump_json(exclude_none=result.trace is None)), failed=False)

    async def _journal(self, key: str, line: str, *, failed: bool, message: str = "") -> None:
        await asyncio.to_thread(self.journal.record, key, line, failed)
        (self.failed_in_input.add if failed else self.failed_in_input.discard)(key)
        if failed:
            self.report.failed += 1
            self.on_error(message)
        else:
            self.report.located += 1
        self.done += 1
        self._progress()

    def _progress(self) -> None:
        if self.on_progress is None:
            return
        if self.total is None and self._counting is not None and self._counting.done():
            self.total = self._counting.result()
        self.on_progress(
            BatchProgress(self.done, self.total, self.done_before, self.report.failed, time.perf_counter() - self.started, self.engine_totals())
        )

    async def close(self) -> None:
        await self.pending.aclose()  # a run that stopped early leaves INPUT unread
        if self._counting is not None:
            self._counting.cancel()  # a worker thread cannot be interrupted: the count finishes unseen
            self._progress()


async def _chain(first: BatchItem, rest: AsyncIterator[BatchItem]) -> AsyncIterator[BatchItem]:
    yield first
    async for item in rest:
        yield item
