"""``geoagent setup`` and ``geoagent check``: from a fresh machine to a first answer, one step at a time.

Each step asks the part that owns the thing and says what it found or did in one line: every backend profile
(``vlm/``: reachable? model there? Ollama pulls a missing one, streaming its progress; a hosted one needs its key
variable), then the CLIP weights (``retrieval/``: open_clip downloads them through huggingface_hub), then the
candidates (the gazetteer's vectors embedded once, or the configured index opened). Run again, a step that is
done says so and does nothing. ``dry_run`` changes nothing: it says what would be fetched, and how big.
The results and progress are pydantic values handed to callbacks; the CLI prints them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, Field

from geoagent.config import BackendProfile, Settings
from geoagent.errors import GeoAgentError, ModelMissingError
from geoagent.loading import loading

StepState = Literal["ready", "done", "planned", "failed", "skipped"]


class StepResult(BaseModel):
    """One step's outcome: ready (nothing to do), done (fetched or built now), planned (``--dry-run``), failed, skipped."""

    step: str = Field(description="What the step readies: 'backend NAME', 'CLIP weights', 'gazetteer' or 'index'.")
    state: StepState
    summary: str = Field(description="One line: what was found or done, or for a failure the problem and its fix.")
    fetch_bytes: int | None = Field(default=None, description="Bytes fetched, or (planned) to fetch; None: unknown or none.")
    exit_code: int = 0


class StepProgress(BaseModel):
    """Progress inside a step: a pulled layer's bytes (``label`` its short digest) or places embedded."""

    step: str
    label: str
    status: str = ""
    completed: int | None = None
    total: int | None = None
    unit: Literal["bytes", "places"] = "bytes"


class CheckResult(BaseModel):
    """``geoagent check`` on one routed backend profile: reachable, has its model, answers a chat request."""

    profile: str
    ok: bool
    summary: str
    warnings: list[str] = Field(default_factory=list)
    exit_code: int = 0


class SetupReport(BaseModel):
    """Every step's result, the closing check (None: not run), and the one command to run next."""

    steps: list[StepResult]
    checks: list[CheckResult] | None = None
    next_command: str
    dry_run: bool = False

    @property
    def exit_code(self) -> int:
        codes = [s.exit_code for s in self.steps if s.state == "failed"]
        codes += [c.exit_code for c in self.checks or [] if not c.ok]
        return max(codes, default=0)


OnProgress = Callable[[StepProgress], None]
OnResult = Callable[[StepResult], None]
FIRST_COMMAND = "geoagent locate PHOTO.jpg"


def human_bytes(size: int | None, unknown: str = "size unknown") -> str:
    if size is None:
        return unknown
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


async def check_profiles(settings: Settings) -> list[CheckResult]:
    """Every server of every profile a task routes to: reachable, has its model, answers a minimal chat request, and
    the servers of one profile serve the same weights (``geoagent check``)."""
    from geoagent.vlm import VLMPool

    pool = VLMPool(settings)
    results: list[CheckResult] = []

    def failed(name: str, exc: GeoAgentError) -> CheckResult:
        return CheckResult(profile=name, ok=False, summary=str(exc), exit_code=exc.exit_code)

    try:
        for name in settings.routed_profiles():
            try:
                client = pool.client(name)
                found = await client.check(probe_chat=True)  # every server of the profile, a line each
            except GeoAgentError as exc:
                results.append(failed(name, exc))
                continue
            for _server, outcome in found:
                if isinstance(outcome, GeoAgentError):
                    results.append(failed(name, outcome))
                else:
                    results.append(CheckResult(profile=name, ok=True, summary=outcome.summary, warnings=outcome.warnings))
            if not all(isinstance(outcome, GeoAgentError) for _, outcome in found):
                try:
                    await client.identity()  # servers that serve different weights under one profile are refused
                except GeoAgentError as exc:
                    results.append(failed(name, exc))
    finally:
        await pool.aclose()
    return results


async def backend_step(name: str, profile: BackendProfile, *, dry_run: bool, on_progress: OnProgress) -> StepResult:
    """Reachable, model present (the same check the preflight and ``geoagent check`` run); a missing model is
    pulled where the backend can (Ollama), its layers' bytes streamed to ``on_progress``."""
    from geoagent.vlm.backend import create_backend

    step = f"backend {name}"
    try:
        backend = create_backend(name, profile)  # an unset key variable or a missing extra fails here
    except GeoAgentError as exc:
        return StepResult(step=step, state="failed", summary=str(exc), exit_code=exc.exit_code)
    try:
        try:
            with loading(f"asking backend '{name}' at {backend.url}"):
                health = await backend.check()
            return StepResult(step=step, state="ready", summary="; ".join([health.summary, *health.warnings]))
        except ModelMissingError:
            if not backend.can_pull:
                raise
        if dry_run:
            with loading(f"asking the registry for the size of {profile.model}"):
                size = await backend.download_size()
            return StepResult(
                step=step, state="planned", fetch_bytes=size,
                summary=f"would pull {profile.model} onto {backend.url} ({human_bytes(size, 'size unknown: the registry is unreachable')})",
            )  # fmt: skip
        layers: dict[str, int] = {}
        async for part in backend.pull():
            if part.digest and part.total:
                layers[part.digest] = part.total
            on_progress(StepProgress(step=step, label=(part.digest or "")[7:19] or part.status, status=part.status,
                                     completed=part.completed, total=part.total))  # fmt: skip
        health = await backend.check()  # the model is there now, or this says why not
        total = sum(layers.values())
        return StepResult(step=step, state="done", fetch_bytes=total,
                          summary=f"pulled {profile.model} ({human_bytes(total)} in {len(layers)} layers); {health.summary}")  # fmt: skip
    except GeoAgentError as exc:
        return StepResult(step=step, state="failed", summary=str(exc), exit_code=exc.exit_code)
    finally:
        await backend.aclose()


def clip_step(settings: Settings, *, dry_run: bool) -> StepResult:
    """The CLIP weights: random, a local checkpoint, or a pretrained tag open_clip downloads (blocking: a thread)."""
    from geoagent.retrieval.embedder import clip_name
    from geoagent.retrieval.fetch import fetch_weights, weights_plan

    step = "CLIP weights"
    config = settings.retrieval
    try:
        with loading(f"looking for the weights of CLIP {clip_name(config)}"):
            plan = weights_plan(config, ask_hub=dry_run)
        if plan.source == "random":
            return StepResult(step=step, state="ready", summary=(
                f"{plan.model} with random weights (retrieval.clip_pretrained = \"none\"): nothing to fetch; "
                "fine for a smoke run, useless for real answers"
            ))  # fmt: skip
        if plan.local is not None:
            where = ": local checkpoint" if plan.source == "file" else f"/{config.clip_pretrained} in the Hugging Face cache:"
            return StepResult(step=step, state="ready", summary=f"{plan.model}{where} {plan.local} ({human_bytes(plan.size_bytes)})")
        if dry_run:
            from geoagent.retrieval.embedder import _hf_reachable

            size = human_bytes(plan.size_bytes, "size unknown: offline" if not _hf_reachable() else "size unknown")
            return StepResult(step=step, state="planned", fetch_bytes=plan.size_bytes,
                              summary=f"would download {plan.location} ({size}) into the Hugging Face cache")  # fmt: skip
        fetched = fetch_weights(config)
        return StepResult(step=step, state="done", fetch_bytes=fetched.size_bytes,
                          summary=f"downloaded {plan.location} ({human_bytes(fetched.size_bytes)}) to {fetched.local}")  # fmt: skip
    except GeoAgentError as exc:
        return StepResult(step=step, state="failed", summary=str(exc), exit_code=exc.exit_code)


def candidates_step(settings: Settings, *, dry_run: bool, on_progress: OnProgress) -> StepResult:
    """The configured index opened and checked against the embedder, or the gazetteer's vectors embedded once and
    cached (blocking: a thread; the progress counts places)."""
    from geoagent.retrieval.embedder import embedder_spec
    from geoagent.retrieval.retriever import Retriever, vectors_cache_dir

    config = settings.retrieval
    if config.index is not None:
        try:
            with loading(f"opening the index {config.index}"):
                index = Retriever.load_sync(config, defer_embedder=True).source  # opens it, compares the embedder; loads no model
            count = index.manifest.count  # type: ignore[attr-defined]
        except GeoAgentError as exc:
            return StepResult(step="index", state="failed", summary=str(exc), exit_code=exc.exit_code)
        return StepResult(step="index", state="ready", summary=f"{config.index}: {count:,} reference photos, embedded with the configured CLIP")
    from geoagent.retrieval.gazetteer import Gazetteer, GazetteerVectors

    step = "gazetteer"
    try:
        cache = vectors_cache_dir(config)
        with loading("looking for the gazetteer's vectors"):
            vectors = GazetteerVectors.find(embedder_spec(config), cache, min_population=config.gazetteer_min_population,
                                            prompt=config.gazetteer_prompt)  # fmt: skip
        places = len(vectors.places)
        if vectors.cached:
            return StepResult(step=step, state="ready", summary=f"{places:,} places already embedded ({vectors.path.parent})")
        if dry_run:
            return StepResult(step=step, state="planned", summary=(
                f"would embed {places:,} places as CLIP text prompts, once (minutes on a CPU), into {vectors.path.parent}"
            ))  # fmt: skip
        from geoagent.retrieval.embedder import Embedder

        embedder = Embedder.load(config)
        started = time.perf_counter()
        Gazetteer.load(embedder, cache, min_population=config.gazetteer_min_population, prompt=config.gazetteer_prompt,
                       kmeans_k=config.kmeans_k,
                       on_progress=lambda done, total: on_progress(StepProgress(step=step, label="places", completed=done, total=total, unit="places")))  # fmt: skip
        return StepResult(step=step, state="done",
                          summary=f"embedded {places:,} places in {time.perf_counter() - started:.0f} s, cached in {vectors.path.parent}")  # fmt: skip
    except GeoAgentError as exc:
        return StepResult(step=step, state="failed", summary=str(exc), exit_code=exc.exit_code)


async def run_setup(
    settings: Settings,
    *,
    dry_run: bool = False,
    on_result: OnResult = lambda _: None,
    on_progress: OnProgress = lambda _: None,
) -> SetupReport:
    """Every step in order (each told to ``on_result`` as it ends), then ``geoagent check``'s verdict when the
    backends are ready. A failed step does not stop the others: the rest of the machine still gets ready."""
    steps: list[StepResult] = []

    def finish(result: StepResult) -> StepResult:
        steps.append(result)
        on_result(result)
        return result

    for name, profile in settings.backends.items():
        finish(await backend_step(name, profile, dry_run=dry_run, on_progress=on_progress))
    clip = finish(await asyncio.to_thread(clip_step, settings, dry_run=dry_run))
    if clip.state == "failed" and settings.retrieval.index is None:
        finish(StepResult(step="gazetteer", state="skipped", summary="needs the CLIP weights to embed its places"))
    else:
        finish(await asyncio.to_thread(candidates_step, settings, dry_run=dry_run, on_progress=on_progress))
    failed = [s for s in steps if s.state == "failed"]
    if dry_run:
        return SetupReport(steps=steps, next_command="geoagent setup" if not failed else "fix the failures above, then `geoagent setup`", dry_run=True)
    checks = None if any(s.step.startswith("backend ") for s in failed) else await check_profiles(settings)
    ready = not failed and all(c.ok for c in checks or [])
    return SetupReport(steps=steps, checks=checks,
                       next_command=FIRST_COMMAND if ready else "fix the failures above, then run `geoagent setup` again")  # fmt: skip

