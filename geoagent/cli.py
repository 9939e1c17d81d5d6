"""The ``geoagent`` command: a thin layer over the library. Heavy modules are imported inside commands."""

from __future__ import annotations

import asyncio
import atexit
import gc
import json
import logging
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from geoagent import __version__
from geoagent.config import BackendProfile, Settings, inspect_config, load_config, validation_message
from geoagent.errors import ConfigError, GeoAgentError, InputError
from geoagent.paths import display_path, photo_problem
from geoagent.ranker import recipe
from geoagent.terminal import StatusLine
from geoagent.words import count

#: Exit code of an unexpected exception (EX_SOFTWARE in sysexits.h): a bug, told apart from 1 ("some photos
#: failed") and 2 (usage or configuration).
EXIT_BUG = 70
MISSING_SHOWN = 20  # eval: missing photos named one a line on stderr before the rest are counted


class _App(typer.Typer):
    """The typer app, guarded once for every command: an unexpected exception prints its traceback and a
    line saying it is a bug to report, and exits with EXIT_BUG."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:  # typer.Exit and click's usage errors never get here: click turns them into SystemExit
            traceback.print_exc()
            print_error(
                f"unexpected {type(exc).__name__}: this is a bug in GeoAgent; please report it with the traceback above "
                f"(exit code {EXIT_BUG})"
            )
            sys.exit(EXIT_BUG)


app = _App(
    name="geoagent",
    help="Where was this photo taken? Local CLIP retrieval, then vision-language models vote.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(help="Inspect, clear or copy the response cache.", no_args_is_help=True)
config_app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)
index_app = typer.Typer(help="Build and inspect reference indexes of geotagged photos.", no_args_is_help=True)
prompts_app = typer.Typer(help="The prompt templates in use.", no_args_is_help=True)
ranker_app = typer.Typer(help="GeoRanker reward models: fine-tune one on your own geotagged photos.", no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(ranker_app, name="ranker")
app.add_typer(prompts_app, name="prompts")
app.add_typer(cache_app, name="cache")
app.add_typer(config_app, name="config")

stdout = Console()
stderr = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (default: ./geoagent.toml if present).", show_default=False),
]


def print_line(text: object, console: Console | None = None) -> None:
    """One line of user text exactly as it is: no rich markup, so ``[bold]`` in a file name or the
    ``[redacted]`` placeholder in a message survive."""
    (console or stdout).print(str(text), markup=False, highlight=False, soft_wrap=True)


def _labelled(label: str, style: str, message: object) -> None:
    stderr.print(Text.assemble((label, style), " ", str(message)), highlight=False, soft_wrap=True)


def print_error(message: object) -> None:
    """``error: MESSAGE`` on stderr; the message is printed as it is (never read as markup)."""
    _labelled("error:", "bold red", message)


def print_warning(message: object) -> None:
    """``warning: MESSAGE`` on stderr, printed as it is."""
    _labelled("warning:", "yellow", message)


def _show_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    if category.__name__ == "DecompressionBombWarning":  # Pillow's pathless twin of the refusal that names the file
        return
    print_warning(message)


class _NoteHandler(logging.Handler):
    """GeoAgent's INFO log lines (slow one-time work, say) as notes on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        _labelled("note:", "dim", record.getMessage())


status_line = StatusLine(stderr)  # what the command waits for, on a terminal (geoagent.loading)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn GeoAgent's errors into one line on stderr and the right exit code, never a traceback."""
    from geoagent.loading import set_announcer

    set_announcer(status_line if stderr.is_terminal else None)
    warnings.showwarning = _show_warning  # type: ignore[assignment]
    package_log = logging.getLogger("geoagent")
    if not package_log.handlers:
        package_log.addHandler(_NoteHandler(logging.INFO))
        package_log.setLevel(logging.INFO)
        package_log.propagate = False  # a root handler (libraries call logging.basicConfig) would print it again
    try:
        yield
    except GeoAgentError as exc:
        print_error(exc)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        print_line("interrupted", stderr)
        raise typer.Exit(130) from None


@contextmanager
def _flag(name: str) -> Iterator[None]:
    """A bad value set from a flag is reported under the flag's name, not the settings key it lands in."""
    from pydantic import ValidationError

    try:
        yield
    except ValidationError as err:
        raise ConfigError(f"{name}: {validation_message(err.errors()[0])}") from None


def apply_flags(settings: Settings, **flags: Any) -> Settings:
    """Command-line flags override everything else (set with validation, so a bad value is a one-line error)."""
    if flags.get("backend"):
        name = flags["backend"]
        if name not in settings.backends:
            raise ConfigError(f"--backend: no backend profile '{name}' (defined: {', '.join(sorted(settings.backends))})")
        settings.tasks = type(settings.tasks)(default=name)
    if flags.get("model"):
        with _flag("--model"):
            for name in settings.routed_profiles():
                settings.backends[name].model = flags["model"]
    if flags.get("index") is not None:
        with _flag("--index"):
            settings.retrieval.index = flags["index"]
    if flags.get("top_k") is not None:
        with _flag("--top-k"):
            settings.retrieval.top_k = flags["top_k"]
            settings.agent.top_k = flags["top_k"]
    if flags.get("strategy"):
        with _flag("--strategy"):
            settings.agent.strategy = flags["strategy"]
    if flags.get("prompts") is not None:
        with _flag("--prompts"):
            settings.agent.prompts_dir = flags["prompts"]
    if flags.get("no_cache"):
        settings.cache.enabled = False
    if flags.get("use_exif"):
        settings.agent.use_exif = True
    if flags.get("min_confidence") is not None:
        with _flag("--min-confidence"):
            settings.agent.min_confidence = flags["min_confidence"]
    return settings


def _print_version(value: bool) -> None:
    if value:
        print_line(f"geoagent {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    """Options of the geoagent command itself."""
    # Registered first, so it runs last: the interpreter's teardown then skips collecting the millions of objects
    # torch and open_clip leave behind, which otherwise kept the process alive 1.5-2 s after its work was done.
    atexit.register(gc.freeze)


NoCacheOption = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the response cache.")]
MinConfidenceOption = Annotated[
    float | None,
    typer.Option("--min-confidence", min=0.0, max=1.0, show_default=False,
                 help="Answer \"unknown\" below this confidence (no coordinate; the best guess stays a candidate)."),
]
# The flags of every command that locates photos (locate, batch).
BackendOption = Annotated[str | None, typer.Option("--backend", help="Send every task to this backend profile.")]
ModelOption = Annotated[str | None, typer.Option("--model", help="Model name for the profiles in use.")]
IndexOption = Annotated[Path | None, typer.Option("--index", help="Reference index folder (default: the gazetteer).")]
TopKOption = Annotated[int | None, typer.Option("--top-k", help="Candidates to retrieve and rerank.")]
StrategyOption = Annotated[str | None, typer.Option("--strategy", help="none | pointwise | allpairs | tournament | sorting | setwise | georanker.")]
PromptsOption = Annotated[Path | None, typer.Option("--prompts", help="Folder of prompt templates to use instead.")]
MapOption = Annotated[Path | None, typer.Option("--map", help="Also write a map of the answers: one self-contained HTML file (opens offline).", show_default=False)]


def _check_map(path: Path | None) -> None:
    """``--map``: fail before any work when the file cannot be written."""
    if path is not None:
        from geoagent.maps.html import check_map_path

        check_map_path(path)


@app.command("locate")
def locate(
    photos: Annotated[list[Path], typer.Argument(help="Photos to locate.", show_default=False, readable=False)],
    config: ConfigOption = None,
    backend: BackendOption = None,
    model: ModelOption = None,
    index: IndexOption = None,
    top_k: TopKOption = None,
    strategy: StrategyOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per photo (JSON Lines).")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="Show the prior, clues, guesses and matches.")] = False,
    no_cache: NoCacheOption = False,
    prompts: PromptsOption = None,
    use_exif: Annotated[
        bool, typer.Option("--use-exif", help="Answer from a photo's EXIF GPS when it has one (no model runs); others are located visually.")
    ] = False,
    map_file: MapOption = None,
    min_confidence: MinConfidenceOption = None,
) -> None:
    """Where was each photo taken? Exit 0 if every photo was answered, 1 if some failed, 2 on usage or config
    errors or when the VLM server is down for photos the cache cannot answer."""
    with user_errors():
        settings = apply_flags(
            load_config(config), backend=backend, model=model, index=index, top_k=top_k,
            strategy=strategy, prompts=prompts, no_cache=no_cache, use_exif=use_exif, min_confidence=min_confidence,
        )
        _check_map(map_file)
        readable = []
        for photo in photos:  # before any heavy import: a typo in a path is reported at once
            problem = photo_problem(photo)
            if problem:
                print_error(f"{display_path(photo)}: {problem}")
            else:
                readable.append(photo)
        if readable:  # then the headers (Pillow, no model yet): junk or a bomb is named before any decode
            from geoagent.images import header_problem, set_pixel_limit

            set_pixel_limit(settings.images.max_pixels)
            for photo, problem in [(photo, header_problem(photo)) for photo in readable]:
                if problem:
                    print_error(f"{display_path(photo)}: {problem}")
                    readable.remove(photo)
        if not readable:
            raise typer.Exit(1)
        from geoagent.agent.controller import GeoAgent
        from geoagent.batch.runner import BatchProgress
        from geoagent.errors import PhotoError, RunStopped, UnreachableError
        from geoagent.output import print_result, result_json

        mapped: list[Any] = []  # the answers, for --map

        async def run() -> int:
            failed, located = len(photos) - len(readable), 0
            server_down = stopped = False
            async with GeoAgent(settings) as agent:
                code = (await agent.preflight(readable)).tell(print_warning, print_error)
                if code:
                    return code
                started, done, failed_here = time.perf_counter(), 0, 0
                with _progress_bar("locate", shown=len(readable) > 1) as on_progress:
                    on_progress(BatchProgress(0, len(readable), 0, 0, 0.0))
                    try:
                        # --map draws the reasoning guesses, which only the trace keeps; printing still follows --explain
                        async for _photo, outcome in agent.locate_many(readable, explain=explain or map_file is not None):
                            done, failed_here = done + 1, failed_here + isinstance(outcome, GeoAgentError)
                            on_progress(BatchProgress(done, len(readable), 0, failed_here, time.perf_counter() - started, agent.pool.totals()))
                            if isinstance(outcome, GeoAgentError):
                                failed += 1
                                server_down |= isinstance(outcome, PhotoError) and isinstance(outcome.cause, UnreachableError)
                                print_error(str(outcome))
                                continue
                            located += 1
                            if map_file is not None:
                                mapped.append(outcome)
                            if as_json:
                                print(result_json(outcome, explain=explain), flush=True)
                            else:
                                print_result(stdout, outcome, explain=explain)
                    except RunStopped as exc:
                        stopped = True
                        print_error(str(exc))
                run_total = agent.pool.totals()
                if len(photos) > 1 or stopped:
                    print_line(
                        f"{located} of {count(len(photos), 'photo')} located; {count(run_total.requests, 'VLM request')}, "
                        f"{count(run_total.cache_hits, 'cache hit')}, {count(run_total.failures, 'question')} failed, "
                        f"{run_total.input_tokens}+{run_total.output_tokens} tokens ({run_total.cached_input_tokens} input cached)"
                        + ("" if run_total.unpriced_requests else f", ${run_total.cost_usd:.4f}"),
                        stderr,
                    )
            if stopped or server_down:
                print_line("answers received so far are cached: start the server and rerun to finish", stderr)
                return 2
            return 1 if failed else 0

        code = asyncio.run(run())
        if map_file is not None and mapped:
            from geoagent.maps.html import locate_map, write_map

            write_map(map_file, locate_map(mapped))
            print_line(f"wrote {display_path(map_file)}", stderr)
        elif map_file is not None:
            print_line(f"no photo located: {display_path(map_file)} not written", stderr)
        if code:
            raise typer.Exit(code)


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on; 127.0.0.1 keeps the page to this computer.")] = "127.0.0.1",
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow a --host other computers can reach; a token is then required (printed in the page's URL).")] = False,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on (0: any free one).")] = 8000,
    config: ConfigOption = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, help="Largest photo accepted, in MB.")] = 25,
    tiles: Annotated[str, typer.Option("--tiles", help="Map tile URL template (default: OpenStreetMap's), or 'none': no basemap, no request leaves the page.", show_default=False)] = "",
    min_confidence: MinConfidenceOption = None,
) -> None:
    """A local web page: drop a photo, watch the agent work, see the answer on a map (needs the web extra)."""
    with user_errors():
        settings = apply_flags(load_config(config), min_confidence=min_confidence)
        from geoagent.web import require_web

        require_web()
        from geoagent.web.app import DEFAULT_TILES, WebOptions
        from geoagent.web.server import serve as serve_page

        options = WebOptions(
            max_upload_bytes=int(max_upload_mb * 1e6), host=host, tiles=None if tiles == "none" else tiles or DEFAULT_TILES,
            allow_remote=allow_remote,
        )
        code = asyncio.run(serve_page(settings, options, port, say=print_line, warn=print_warning, error=print_error))
        if code:
            raise typer.Exit(code)


@app.command("batch")
def batch(
    source: Annotated[Path, typer.Argument(metavar="INPUT", help="A folder of photos (recursive), a CSV with a path column, or a text file of paths (one a line); paths relative to the file.", show_default=False, readable=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The JSON Lines journal (the output), or a .csv / .geojson written from a journal kept beside it.")],
    out_format: Annotated[str | None, typer.Option("--format", help="jsonl | csv | geojson (default: from --out's suffix).", show_default=False)] = None,
    engine: Annotated[str, typer.Option("--engine", help="Where photos are located: local (asyncio, one process) or ray (a Ray cluster at RAY_ADDRESS, else a local one; the ray extra).")] = "local",
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Locate again the photos the journal has as failed.")] = False,
    config: ConfigOption = None,
    backend: BackendOption = None,
    model: ModelOption = None,
    index: IndexOption = None,
    top_k: TopKOption = None,
    strategy: StrategyOption = None,
    explain: Annotated[bool, typer.Option("--explain", help="Journal each photo's trace too (prior, clues, guesses, matches).")] = False,
    no_cache: NoCacheOption = False,
    prompts: PromptsOption = None,
    map_file: Annotated[Path | None, typer.Option("--map", help="Also write a map of every located photo in the journal: one self-contained HTML file (guesses with --explain).", show_default=False)] = None,
    use_exif: Annotated[bool, typer.Option("--use-exif", help="Answer from a photo's EXIF GPS when it has one (no model runs); a folder of geotagged photos needs neither CLIP nor a server.")] = False,
    min_confidence: MinConfidenceOption = None,
    xmp: Annotated[bool, typer.Option("--xmp", help="Write each answer into an XMP sidecar beside its photo (photos without GPS whose answer cleared --min-confidence; never the photo itself; the xmp extra).")] = False,
    xmp_name: Annotated[str, typer.Option("--xmp-name", help="Sidecar names: full (photo.jpg.xmp: digiKam, darktable, Immich) or stem (photo.xmp: Lightroom).")] = "full",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --xmp: list the sidecars it would write, write none (photos are still located and journalled).")] = False,
) -> None:
    """Locate many photos, each journalled as it finishes; rerun the same command to resume after a crash.
    Exit 0 if every photo is located, 1 if some failed, 2 on usage or config errors or a run that stopped."""
    from geoagent.batch.formats import plan_output
    from geoagent.batch.runner import run_batch

    with user_errors():
        settings = apply_flags(
            load_config(config), backend=backend, model=model, index=index, top_k=top_k,
            strategy=strategy, prompts=prompts, no_cache=no_cache, min_confidence=min_confidence, use_exif=use_exif,
        )
        plan = plan_output(out, out_format)
        _check_map(map_file)
        if xmp_name not in ("full", "stem"):
            raise ConfigError(f"--xmp-name: '{xmp_name}' is not full (photo.jpg.xmp) or stem (photo.xmp)")
        if dry_run and not xmp:
            raise ConfigError("--dry-run lists the XMP sidecars --xmp would write: use it with --xmp")
        if xmp:
            from geoagent.batch.xmp import require_xmp

            require_xmp()  # before any photo is located
        with _progress_bar() as on_progress:
            try:
                report = asyncio.run(run_batch(
                    settings, source, plan, engine=engine, retry_failed=retry_failed, explain=explain,
                    on_progress=on_progress, on_error=print_error, on_warning=print_warning,
                ))
            except KeyboardInterrupt:
                print_line(f"interrupted: every finished photo is in {display_path(plan.journal)}; rerun the same command to resume", stderr)
                raise typer.Exit(130) from None
        for problem in report.problems:
            print_error(problem)
        if not report.problems:
            print_line(
                f"{report.journal_located} located, {report.journal_failed} failed in {display_path(report.journal)} "
                f"(this run: {report.located} located, {report.failed} failed, {report.skipped} already journalled"
                + (f", {report.duplicates} named twice" if report.duplicates else "")
                + (f", {report.stale} stale failures dropped (no longer in INPUT)" if report.stale else "")
                + f"; {report.vlm.requests} VLM requests, {report.vlm.cache_hits} cache hits)"
                + (f"; wrote {display_path(report.output)}" if report.output else ""),
                stderr,
            )
        if xmp and not report.problems:
            _write_sidecars(settings, report.journal, xmp_name, dry_run)
        if map_file is not None and not report.problems:
            from geoagent.maps.html import journal_results, write_locate_page, write_map

            write_map(map_file, lambda fh: write_locate_page(fh, journal_results(report.journal), thumbnails=False))
            print_line(f"wrote {display_path(map_file)}", stderr)
        if report.stopped:
            print_error(report.stopped)
        if report.stopped or report.unfinished:
            print_line("answers received so far are cached and finished photos journalled: start the server and rerun to finish", stderr)
        if report.exit_code:
            raise typer.Exit(report.exit_code)


def _write_sidecars(settings: Settings, journal: Path, name: str, dry_run: bool) -> None:
    """``batch --xmp``: a sidecar per answered photo without GPS of its own, from the journal; one summary line."""
    from geoagent.batch.journal import Journal
    from geoagent.batch.xmp import write_sidecars

    _, profile = settings.profile("pairwise")
    with Journal.open(journal) as opened:
        done = write_sidecars(opened.entries(), name=name, dry_run=dry_run, model=profile.model,  # type: ignore[arg-type]
                              strategy=settings.agent.strategy, say=lambda line: print_line(line, stderr))  # fmt: skip
    verb = "would write" if dry_run else "wrote"
    reasons: dict[str, int] = {}
    for _photo, why in done.skipped:
        key = "kept a sidecar's own GPS" if "already holds GPS" in why else why
        reasons[key] = reasons.get(key, 0) + 1
    print_line(
        f"XMP: {verb} {len(done.written)} sidecars, {len(done.unchanged)} unchanged"
        + "".join(f", {count} {why}" for why, count in reasons.items() if why != "not located")
        + (f", {len(done.invalid)} not valid XMP (left untouched)" if done.invalid else ""),
        stderr,
    )


@contextmanager
def _progress_bar(label: str = "batch", shown: bool = True) -> Iterator[Any]:
    """A progress bar on stderr for ``batch`` and ``locate`` on several photos (``label``): done/total,
    photos/s, ETA, VLM calls/s, cache hits, failures. Only on a terminal, and while ``shown``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} photos/s"),
        TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[vlm]} VLM calls/s"),
        TextColumn("cache hits {task.fields[hits]}"), TextColumn("{task.fields[failed]} failed"),
    )
    if not shown or not stderr.is_terminal:  # no bar in a log file (a disabled Progress still prints a blank line on rich 13)
        yield lambda _progress: None
        return
    # Results printed to a terminal go above the bar; piped (locate --json > file) they stay out of it.
    with Progress(*columns, console=stderr, transient=True, redirect_stdout=stdout.is_terminal) as bar:
        task = bar.add_task(label, total=None, start=False, rate="-", vlm="-", hits="-", failed=0)
        status_line.attach(bar, task, label)  # models loading before the first photo: the bar's label says so

        def update(p: Any) -> None:
            if not bar.tasks[0].started:
                bar.start_task(task)
                bar.update(task, completed=p.done_before)  # photos from earlier runs are not this run's speed
            hit_rate = p.cache_hit_rate
            bar.update(
                task, completed=p.done, total=p.total, rate=f"{p.photos_per_s:.1f}", vlm=f"{p.vlm_calls_per_s:.1f}",
                hits="-" if hit_rate is None else f"{hit_rate:.0%}", failed=p.failed,
            )

        try:
            yield update
        finally:
            status_line.detach()


@app.command("eval")
def evaluate(
    dataset: Annotated[Path, typer.Argument(help="CSV path,lat,lon[,country][,ref_id]; a folder with EXIF GPS; IM2GPS3K/YFCC4K metadata CSV; or a VIGOR folder.", readable=False)],
    configs: Annotated[list[str] | None, typer.Option("--config", "-c", help="A column: \\[name=]config.toml (repeatable).")] = None,
    prompts: Annotated[list[Path] | None, typer.Option("--prompts", help="A column per prompts folder (repeatable).")] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Image folder for IMG_ID,LAT,LON metadata CSVs.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N photos.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write report.json, report.md, predictions.csv, accuracy.png here.")] = None,
    no_cache: NoCacheOption = False,
    map_file: Annotated[Path | None, typer.Option("--map", help="Also write a map of the errors (truth to prediction, per column): one self-contained HTML file.", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the bootstrap behind every 95% interval (the same seed, the same intervals).")] = 0,
    calibrate: Annotated[Path | None, typer.Option("--calibrate", help="Fit a confidence calibrator on the answers and write it here (one column), or to FILE.LABEL.json per column; use it with [agent] calibration.", show_default=False)] = None,
    min_confidence: MinConfidenceOption = None,
) -> None:
    """Compare configurations and prompt versions side by side on a labelled set."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from geoagent.eval.datasets import load_dataset, missing_photos
    from geoagent.eval.runner import EvalRun, build_columns, differences_table, markdown_table, write_calibrations, write_outputs

    with user_errors():
        _check_map(map_file)
        data = load_dataset(dataset, images)
        for name, reason in data.skipped:
            print_line(f"skipped {name}: {reason}", stderr)
        missing = missing_photos(data)
        for item in missing[:MISSING_SHOWN]:
            print_line(f"missing {display_path(item.path)}: no such file (counted as a failed photo)", stderr)
        if len(missing) > MISSING_SHOWN:
            print_line(f"... and {len(missing) - MISSING_SHOWN} more missing photos (report.json lists every failure)", stderr)
        if not data.items:
            raise InputError(f"{dataset}: no usable photos")
        columns = build_columns(list(configs or []), list(prompts or []), lambda s: apply_flags(s, no_cache=no_cache, min_confidence=min_confidence))
        run = EvalRun(data, columns, limit, on_warning=print_warning, seed=seed)
        total = len(run.items) * len(columns)
        bar_columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        interrupted = False
        try:
            with Progress(*bar_columns, console=stderr, transient=True) as bar:
                task = bar.add_task("eval", total=total)
                run.on_photo = lambda: bar.advance(task)
                status_line.attach(bar, task, "eval")
                try:
                    asyncio.run(run.execute())
                except KeyboardInterrupt:
                    interrupted = True
                finally:
                    status_line.detach()
        finally:  # whatever stopped the run, what finished is reported
            partial = interrupted or bool(run.stopped) or sys.exc_info()[0] is not None
            report = write_outputs(run, out, partial=partial) if out else run.report(partial=partial)
            if map_file is not None:
                from geoagent.maps.html import eval_map, write_map

                write_map(map_file, eval_map(run.predictions, title=f"{data.name}: errors"))
        _print_report(report, markdown_table, differences_table)
        if out:
            plot = "".join(f", {name}" for name in ("accuracy.png", "calibration.png") if (out / name).exists())  # the [plot] extra
            print_line(f"wrote {out}/report.json, report.md, predictions.csv{plot}")
        if map_file is not None:
            print_line(f"wrote {display_path(map_file)}")
        if calibrate is not None and not interrupted and not run.stopped:
            for path in write_calibrations(run, calibrate):
                print_line(f"wrote {display_path(path)} (use it with [agent] calibration = \"{path}\")")
        for label, reason in run.stopped.items():
            print_error(f"column {label}: {reason}")
        if interrupted:
            print_line("interrupted: the report covers the photos finished so far; rerun to resume from the cache", stderr)
            raise typer.Exit(130)
        if run.stopped:
            print_line("the report covers the photos finished so far; answered questions are cached, rerun to finish", stderr)
            raise typer.Exit(2)


def _print_report(report: dict[str, Any], markdown_table: Any, differences_table: Any) -> None:
    """The report's tables on the terminal: the metrics with their 95% intervals, then the paired differences."""
    labels = list(report["columns"])
    table = Table("metric", *labels, title=f"{report['dataset']}: {report['photos']} photos (95% intervals)", box=None)
    for line in markdown_table(report).splitlines()[2:]:
        table.add_row(*(cell.strip() for cell in line.strip("|").split("|")))
    stdout.print(table)
    differences = differences_table(report).splitlines()
    if differences:
        header = [cell.strip() for cell in differences[2].strip("|").split("|")]
        versus = Table(*header, title=differences[0].removeprefix("## "), box=None)
        for line in differences[4:]:
            versus.add_row(*(cell.strip() for cell in line.strip("|").split("|")))
        stdout.print(versus)


@prompts_app.command("list")
def prompts_list(
    config: ConfigOption = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="Folder of prompt templates.")] = None,
) -> None:
    """List the prompt templates in use with their content hashes (part of every cache key)."""
    from geoagent.prompts import PromptSet

    with user_errors():
        settings = apply_flags(load_config(config), prompts=prompts)
        prompt_set = PromptSet(settings.agent.prompts_dir)
        print_line(f"prompts from {prompt_set.directory}")
        for name, digest in prompt_set.hashes().items():
            print_line(f"  {name:<24} {digest}")


@prompts_app.command("export")
def prompts_export(
    directory: Annotated[Path, typer.Argument(help="Folder to write the templates into (created if missing).", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Overwrite templates already in the folder.")] = False,
) -> None:
    """Copy the bundled prompt templates into a folder to edit them; use it with --prompts DIR."""
    from geoagent.prompts import export_prompts

    with user_errors():
        written = export_prompts(directory, force=force)
        print_line(f"wrote {len(written)} files to {directory}; edit them and pass --prompts {directory}")


@index_app.command("build")
def index_build(
    source: Annotated[
        Path,
        typer.Argument(
            help="A folder of photos with EXIF GPS (recursive), a CSV path,lat,lon[,country], or MP-16-style IMG_ID,LAT,LON with --images.",
            readable=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index folder to create or update.")],
    images: Annotated[Path | None, typer.Option("--images", help="Photo folder of an IMG_ID,LAT,LON metadata CSV.")] = None,
    index_type: Annotated[
        str | None, typer.Option("--type", help="flat (exact, default) | hnsw | ivf | ivfpq (compressed: millions on a laptop).")
    ] = None,
    append: Annotated[bool, typer.Option("--append", help="Add SOURCE's photos to the index as it is, without a rebuild.")] = False,
    nlist: Annotated[int | None, typer.Option("--nlist", min=1, help="ivf/ivfpq: inverted lists (default 2*sqrt(n)).")] = None,
    nprobe: Annotated[int | None, typer.Option("--nprobe", min=1, help="ivf/ivfpq: lists searched (default nlist/16, at least 16).")] = None,
    ef_search: Annotated[int | None, typer.Option("--ef-search", min=1, help="hnsw: search breadth (default 64/128/256 by size).")] = None,
    pq_bytes: Annotated[int | None, typer.Option("--pq-bytes", min=1, help="ivfpq: bytes per vector (default dim/8).")] = None,
    kmeans: Annotated[int | None, typer.Option("--kmeans", help="Geographic k-means clusters (default: retrieval.kmeans_k).")] = None,
    engine: Annotated[str, typer.Option("--engine", help="Where photos are embedded: local (this process) or ray (ray.data on the cluster at RAY_ADDRESS, else a local one; the ray extra).")] = "local",
    config: ConfigOption = None,
) -> None:
    """Embed geotagged photos with open_clip and index them with faiss, streaming (memory stays bounded).

    Reruns embed only new or changed files; --append adds photos to the live index without a rebuild."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with user_errors():
        from geoagent.retrieval.vectors import INDEX_TYPES

        if index_type is not None and index_type not in INDEX_TYPES:
            raise ConfigError(f"--type: '{index_type}' is not one of {', '.join(INDEX_TYPES)}")
        overrides = {k: v for k, v in {"nlist": nlist, "nprobe": nprobe, "ef_search": ef_search, "pq_m": pq_bytes}.items() if v}
        if engine not in ("local", "ray"):
            raise ConfigError(f"--engine: no engine '{engine}' (available: local, ray)")
        if append and (nlist or pq_bytes):
            raise ConfigError("--nlist/--pq-bytes: --append keeps the trained quantizer; rebuild without --append to change them")
        settings = load_config(config)
        from geoagent.images import set_pixel_limit
        from geoagent.retrieval.embedder import Embedder

        set_pixel_limit(settings.images.max_pixels)
        from geoagent.retrieval.index import PhotoEmbedding, build_index, read_source

        items = read_source(source, images)  # a missing source or a bad CSV header fails before the model loads
        if engine == "ray":
            from geoagent.retrieval.ray_build import RayEmbedding

            embedder: Embedder | PhotoEmbedding = RayEmbedding(settings.retrieval)
        else:
            embedder = Embedder.load(settings.retrieval)
        columns = (TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} photos/s"), TimeRemainingColumn())
        with Progress(*columns, console=stderr, transient=True) as bar:
            task = bar.add_task("embed", total=None, rate="-")

            def advance(done: int, _embedded: int) -> None:
                bar.advance(task, done)
                elapsed = bar.tasks[0].elapsed or 0
                bar.update(task, rate=f"{bar.tasks[0].completed / elapsed:.1f}" if elapsed else "-")

            report = build_index(
                source,
                out,
                embedder,
                index_type=index_type,  # type: ignore[arg-type]
                overrides=overrides,
                append=append,
                kmeans_k=kmeans or settings.retrieval.kmeans_k,
                batch_size=settings.retrieval.batch_size,
                progress=advance,
                on_total=lambda total: bar.update(task, total=total),
                items=items,
            )
        search = report.params.describe() if report.params else "-"
        if append:
            print_line(
                f"appended {count(report.appended, 'photo')} to {display_path(out)} (now {report.indexed}; {search}; "
                f"{report.already} already in it), skipped {len(report.skipped)}"
            )
        else:
            print_line(
                f"indexed {count(report.indexed, 'photo')} into {display_path(out)} ({report.embedded} embedded, "
                f"{report.reused} reused; {search}), skipped {len(report.skipped)}"
            )
        for name, reason in report.skipped:
            print_line(f"  skipped {name}: {reason}")
        if report.near_duplicates is not None:
            print_line(f"near-duplicates: {report.near_duplicates.describe()}")
        if report.hint:
            print_line(f"hint: {report.hint}", stderr)


@index_app.command("info")
def index_info(
    directory: Annotated[Path, typer.Argument(help="An index folder.", readable=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Entry count, embedder, index type and its search parameters, size on disk, the countries covered."""
    with user_errors():
        from geoagent.retrieval.index import ReferenceIndex, index_summary

        load_config(config)  # a broken config is reported here too, as by every command
        summary = index_summary(ReferenceIndex.open(directory))
        if as_json:
            stdout.print_json(data=summary)
            return
        countries: dict[str, int] = summary.pop("countries")  # type: ignore[assignment]
        summary.pop("params")  # "search" says it in one line
        for key, value in summary.items():
            print_line(f"{key:>16}: {value}")
        top = ", ".join(f"{code} {count}" for code, count in list(countries.items())[:20])
        print_line(f"{'countries':>16}: {len(countries)} ({top}{', ...' if len(countries) > 20 else ''})")


@config_app.command("show")
def config_show(
    config: ConfigOption = None,
    format: Annotated[
        str, typer.Option("--format", "-f", help="toml (to save as geoagent.toml) or json (for scripts).", case_sensitive=False)
    ] = "toml",
) -> None:
    """Print the configuration in effect (file + environment + defaults). Keys are never shown.

    TOML reads back as the same settings (unset keys are comments); JSON shows each backend's effective base_url.
    A broken configuration is shown too, without its bad keys, each named on stderr (exit 2)."""
    with user_errors():
        format = format.lower()
        if format not in ("toml", "json"):
            raise ConfigError(f"--format: '{format}' is not one of toml, json")
        report = inspect_config(config)
        if report.settings is not None:
            if format == "json":
                shown = json.loads(report.settings.model_dump_json())
                for name, profile in report.settings.backends.items():
                    shown["backends"][name]["base_url"] = _effective_base_url(profile)
                stdout.print_json(data=shown)
            else:
                from geoagent.config_toml import settings_toml

                defaults = {("backends", name, "base_url"): _effective_base_url(p) for name, p in report.settings.backends.items()}
                sys.stdout.write(settings_toml(report.settings, {k: v for k, v in defaults.items() if v}))
                sys.stdout.flush()
        for problem in report.problems:
            print_error(problem)
        if report.problems:
            if report.settings is not None:
                print_line("note: the configuration above leaves these keys out (their defaults stand in)", stderr)
            raise typer.Exit(ConfigError.exit_code)


def _effective_base_url(profile: BackendProfile) -> str | list[str] | None:
    """The URL a profile talks to: its base_url, or when unset (null) its backend's default, if it has one."""
    if profile.base_url or profile.servers:
        return profile.base_url
    import importlib

    backend = importlib.import_module(f"geoagent.vlm.backends.{profile.kind}").Backend
    return backend.default_url  # type: ignore[no-any-return]


@cache_app.command("stats")
def cache_stats(config: ConfigOption = None) -> None:
    """How many answers the cache holds, by task and model (SQLite file or Redis server)."""
    from geoagent.vlm.cache import open_cache

    with user_errors():
        cache = open_cache(load_config(config).cache)
        stats = asyncio.run(_closing(cache, cache.stats()))
        print_line(f"{display_path(stats.path)}: {count(stats.entries, 'answer')}, {stats.size_bytes / 1e6:.2f} MB")
        for label, counts in (("task", stats.by_task), ("model", stats.by_model)):
            if counts:
                table = Table(label, "answers")
                for name, n in sorted(counts.items()):
                    table.add_row(Text(name), str(n))  # Text: a model name is not markup
                stdout.print(table)


@cache_app.command("clear")
def cache_clear(config: ConfigOption = None) -> None:
    """Delete every cached answer."""
    from geoagent.vlm.cache import open_cache

    with user_errors():
        cache = open_cache(load_config(config).cache)
        removed = asyncio.run(_closing(cache, cache.clear()))
        print_line(f"removed {count(removed, 'cached answer')} from {display_path(cache.label)}")


@cache_app.command("copy")
def cache_copy(
    source: Annotated[str, typer.Argument(help="Cache to read: a folder or sqlite:///FOLDER, or redis://HOST:PORT/DB.", show_default=False)],
    destination: Annotated[str, typer.Argument(help="Cache to write into (entries there are kept; the same keys are replaced).", show_default=False)],
    config: ConfigOption = None,
) -> None:
    """Copy every cached answer from SOURCE to DESTINATION (the keys are the same in every store). A Redis
    password comes from the variable [cache] password_env names."""
    from geoagent.vlm.cache import open_cache

    with user_errors():
        settings = load_config(config)
        caches = open_cache(settings.cache, source), open_cache(settings.cache, destination)
        copied = asyncio.run(_copy(*caches))
        print_line(f"copied {count(copied, 'cached answer')} from {display_path(caches[0].label)} to {display_path(caches[1].label)}")


async def _closing(cache: Any, work: Any) -> Any:
    """Await ``work`` (a coroutine of ``cache``), then close the cache."""
    try:
        return await work
    finally:
        await cache.aclose()


async def _copy(source: Any, destination: Any) -> int:
    copied = 0
    try:
        await source.check()
        await destination.check()
        async for batch in source.entries():
            await destination.add(batch)
            copied += len(batch)
        await destination.add(identities=await source.identities())
    finally:
        await source.aclose()
        await destination.aclose()
    return copied


@ranker_app.command("train")
def ranker_train(
    index: Annotated[Path, typer.Option("--index", help="Reference index to draw candidates from (built with `geoagent index build`).")],
    queries: Annotated[Path, typer.Option("--queries", help="Training photos: CSV path,lat,lon (or IMG_ID,LAT,LON with --images), or a folder with EXIF GPS.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter folder to write (checkpoints go in OUT/checkpoints).")],
    images: Annotated[Path | None, typer.Option("--images", help="Photo folder of an IMG_ID,LAT,LON queries CSV.")] = None,
    lambda1: Annotated[float, typer.Option("--lambda1", help="Weight of the first-order loss (second order: 1 - lambda1).")] = recipe.LAMBDA1,
    top: Annotated[int, typer.Option("--top", min=0, help="Nearest candidates whose picks count in the losses (GeoRanker's K); 0: all.")] = recipe.TOP or 0,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Optimizer steps (default: from --epochs).")] = None,
    epochs: Annotated[float, typer.Option("--epochs", help="Passes over the queries, when --steps is not given.")] = 1.0,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate (decays linearly to zero).")] = recipe.LR,
    batch_queries: Annotated[int, typer.Option("--batch-queries", min=1, help="Queries a forward pass.")] = recipe.BATCH_QUERIES,
    candidates: Annotated[int, typer.Option("--candidates", "-k", min=1, help="Retrieved neighbours a query (itself excluded).")] = recipe.CANDIDATES,
    negatives: Annotated[int, typer.Option("--negatives", min=0, help="Random index entries added to each query's candidates.")] = recipe.NEGATIVES,
    accumulate: Annotated[int, typer.Option("--accumulate", min=1, help="Forward passes whose gradients make one step.")] = recipe.ACCUMULATE,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1, help="Steps between checkpoints.")] = recipe.CHECKPOINT_EVERY,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the data order, the negatives and the new adapter.")] = 0,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from OUT's newest checkpoint, if any.")] = True,
    config: ConfigOption = None,
) -> None:
    """Fine-tune a GeoRanker adapter (LoRA + value head) with its multi-order distance loss on your own photos.

    OUT then serves as ranker.adapter for strategy georanker. Needs the optional extra 'ranker'."""
    with user_errors():
        from pydantic import ValidationError

        from geoagent.ranker import require_extra
        from geoagent.ranker.training import TrainOptions, train

        flags = {"index": index, "queries": queries, "out": out, "images": images, "lambda1": lambda1, "top": top or None,
                 "steps": steps, "epochs": epochs, "lr": lr, "batch_queries": batch_queries, "candidates": candidates,
                 "negatives": negatives, "accumulate": accumulate, "checkpoint_every": checkpoint_every, "seed": seed, "resume": resume}
        try:
            options = TrainOptions(**flags)
        except ValidationError as err:
            first = err.errors()[0]
            raise ConfigError(f"--{str(first['loc'][0]).replace('_', '-')}: {validation_message(first)}") from None
        settings = load_config(config)
        require_extra("geoagent ranker train")
        with _train_progress() as on_step:
            report = train(options, settings, on_step)
        resumed = f", resumed at step {report.resumed_from}" if report.resumed_from else ""
        loss = "-" if report.last_loss is None else f"{report.last_loss:.4f}"
        print_line(f"trained {count(report.steps, 'step')}{resumed}, last loss {loss}: adapter in {display_path(report.adapter)}")


@contextmanager
def _train_progress() -> Iterator[Any]:
    """A progress bar on stderr for ``ranker train`` (steps, loss, ETA); off a terminal, a line a checkpoint."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if not stderr.is_terminal:
        yield lambda s: print_line(f"step {s.step}/{s.total} loss {s.loss:.4f}: checkpoint {display_path(s.checkpoint)}", stderr) if s.checkpoint else None
        return
    columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task("train", total=None, loss="-")
        yield lambda s: bar.update(task, completed=s.step, total=s.total, loss=f"{s.loss:.4f}")


@app.command("check")
def check(config: ConfigOption = None) -> None:
    """Check that every backend profile a task routes to is reachable, has its model and answers a chat request."""
    from geoagent.setup import check_profiles

    with user_errors():
        settings = load_config(config)
        results = asyncio.run(check_profiles(settings))
        _print_checks(results)
        if not all(result.ok for result in results):
            raise typer.Exit(1)


def _print_checks(results: list[Any], prefix: str = "") -> None:
    for result in results:
        print_line(f"{prefix}{result.profile}: {result.summary if result.ok else 'FAILED: ' + result.summary}")
        for warning in result.warnings:
            print_warning(warning)


@app.command("setup")
def setup(
    config: ConfigOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be fetched, and how big; change nothing.")] = False,
) -> None:
    """Get this machine ready, idempotently: every backend profile reachable with its model (Ollama pulls a missing
    one), the CLIP weights downloaded, the gazetteer embedded (or the index checked); then `check`'s verdict.
    Exit 0 when ready, 2 when a server, key or weights are missing (each named with what to do)."""
    from geoagent.setup import run_setup

    with user_errors():
        settings = load_config(config)
        with _setup_display() as (on_result, on_progress):
            report = asyncio.run(run_setup(settings, dry_run=dry_run, on_result=on_result, on_progress=on_progress))
        if report.checks is not None:
            _print_checks(report.checks, prefix="check: ")
        elif not dry_run:
            print_line("check: not run: a backend is not ready")
        print_line(f"next: {report.next_command}")
        if report.exit_code:
            raise typer.Exit(report.exit_code)


@contextmanager
def _setup_display() -> Iterator[tuple[Any, Any]]:
    """``setup``'s output: one line a step on stdout; on a terminal, while a step works, a bar on stderr per pulled
    layer (bytes, speed) or for the places embedded. Steps that show their own progress (huggingface_hub's) get the
    terminal to themselves: a bar is only up while progress comes."""
    from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TransferSpeedColumn

    live: dict[str, Any] = {}  # the Progress of the step under way, and its tasks by label

    def stop() -> None:
        if "bar" in live:
            live.pop("bar").stop()
            status_line.detach()
        live.clear()

    def on_progress(event: Any) -> None:
        if not stderr.is_terminal:
            return
        if "bar" not in live:
            counter = DownloadColumn() if event.unit == "bytes" else MofNCompleteColumn()
            live["bar"] = Progress(TextColumn("{task.description}"), BarColumn(), counter, TransferSpeedColumn() if event.unit == "bytes" else TextColumn(""),
                                   console=stderr, transient=True)  # fmt: skip
            status_line.attach(live["bar"])  # the bar says what is under way
            live["bar"].start()
        bar = live["bar"]
        if event.total is None:  # a status line of the pull ("verifying sha256 digest")
            if "status" not in live:
                live["status"] = bar.add_task(event.status, total=None)
            bar.update(live["status"], description=f"{event.step}: {event.status}")
            return
        key = f"task:{event.label}"
        if key not in live:
            live[key] = bar.add_task(f"{event.step}: {event.label}", total=event.total)
        bar.update(live[key], completed=event.completed or 0, total=event.total)

    def on_result(result: Any) -> None:
        stop()
        label = {"failed": "FAILED: ", "skipped": "skipped: "}.get(result.state, "")
        print_line(f"{result.step}: {label}{result.summary}")

    try:
        yield on_result, on_progress
    finally:
        stop()
