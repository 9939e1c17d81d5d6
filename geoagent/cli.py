"""The ``geoagent`` command: a thin layer over the library. Heavy modules are imported inside commands."""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from geoagent.config import Settings, load_config
from geoagent.errors import ConfigError, GeoAgentError, InputError

app = typer.Typer(
    name="geoagent",
    help="Where was this photo taken? Local CLIP retrieval, then vision-language models vote.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(help="Inspect or clear the response cache.", no_args_is_help=True)
config_app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)
index_app = typer.Typer(help="Build and inspect reference indexes of geotagged photos.", no_args_is_help=True)
prompts_app = typer.Typer(help="The prompt templates in use.", no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(prompts_app, name="prompts")
app.add_typer(cache_app, name="cache")
app.add_typer(config_app, name="config")

stdout = Console()
stderr = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (default: ./geoagent.toml if present).", show_default=False),
]


def _show_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    stderr.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


class _NoteHandler(logging.Handler):
    """GeoAgent's INFO log lines (slow one-time work, say) as notes on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        stderr.print(f"[dim]note:[/] {record.getMessage()}", highlight=False, soft_wrap=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn GeoAgent's errors into one line on stderr and the right exit code, never a traceback."""
    warnings.showwarning = _show_warning  # type: ignore[assignment]
    package_log = logging.getLogger("geoagent")
    if not package_log.handlers:
        package_log.addHandler(_NoteHandler(logging.INFO))
        package_log.setLevel(logging.INFO)
    try:
        yield
    except GeoAgentError as exc:
        stderr.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("interrupted")
        raise typer.Exit(130) from None


def apply_flags(settings: Settings, **flags: Any) -> Settings:
    """Command-line flags override everything else (set with validation, so a bad value is a one-line error)."""
    from pydantic import ValidationError

    try:
        if flags.get("backend"):
            name = flags["backend"]
            if name not in settings.backends:
                raise ConfigError(f"--backend: no backend profile '{name}' (defined: {', '.join(sorted(settings.backends))})")
            settings.tasks = type(settings.tasks)(default=name)
        if flags.get("model"):
            for name in settings.routed_profiles():
                settings.backends[name].model = flags["model"]
        if flags.get("index") is not None:
            settings.retrieval.index = flags["index"]
        if flags.get("top_k") is not None:
            settings.retrieval.top_k = flags["top_k"]
            settings.agent.top_k = flags["top_k"]
        if flags.get("strategy"):
            settings.agent.strategy = flags["strategy"]
        if flags.get("prompts") is not None:
            settings.agent.prompts_dir = flags["prompts"]
        if flags.get("no_cache"):
            settings.cache.enabled = False
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"{'.'.join(str(p) for p in first['loc']) or 'option'}: {first['msg'].removeprefix('Value error, ')}") from None
    return settings


NoCacheOption = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the response cache.")]


@app.command("locate")
def locate(
    photos: Annotated[list[Path], typer.Argument(help="Photos to locate.", show_default=False)],
    config: ConfigOption = None,
    backend: Annotated[str | None, typer.Option("--backend", help="Send every task to this backend profile.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model name for the profiles in use.")] = None,
    index: Annotated[Path | None, typer.Option("--index", help="Reference index folder (default: the gazetteer).")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Candidates to retrieve and rerank.")] = None,
    strategy: Annotated[str | None, typer.Option("--strategy", help="none | pointwise | allpairs | tournament | sorting.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per photo (JSON Lines).")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="Show the prior, clues, guesses and matches.")] = False,
    no_cache: NoCacheOption = False,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="Folder of prompt templates to use instead.")] = None,
) -> None:
    """Where was each photo taken? Exit 0 if all succeeded, 1 if some failed, 2 on usage or config errors."""
    from geoagent.output import print_result

    with user_errors():
        settings = apply_flags(
            load_config(config), backend=backend, model=model, index=index, top_k=top_k,
            strategy=strategy, prompts=prompts, no_cache=no_cache,
        )
        from geoagent.agent.controller import GeoAgent

        async def run() -> int:
            failed = 0
            async with GeoAgent(settings) as agent:
                problems = await agent.preflight()
                for problem in problems:
                    stderr.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False, soft_wrap=True)
                if problems:
                    raise typer.Exit(max(p.exit_code for p in problems))
                async for _photo, outcome in agent.locate_many(photos, explain=explain):
                    if isinstance(outcome, GeoAgentError):
                        failed += 1
                        stderr.print(f"[bold red]error:[/] {outcome}", highlight=False, soft_wrap=True)
                    elif as_json:
                        print(outcome.model_dump_json(exclude_none=not explain), flush=True)
                    else:
                        print_result(stdout, outcome, explain=explain)
                if len(photos) > 1:
                    run_total = agent.pool.totals()
                    stderr.print(
                        f"{len(photos) - failed} of {len(photos)} photos located; {run_total.requests} VLM requests, "
                        f"{run_total.cache_hits} cache hits, {run_total.prompt_tokens}+{run_total.completion_tokens} tokens",
                        highlight=False,
                    )
            return failed

        if asyncio.run(run()):
            raise typer.Exit(1)


@app.command("eval")
def evaluate(
    dataset: Annotated[Path, typer.Argument(help="CSV path,lat,lon[,country][,ref_id]; a folder with EXIF GPS; IM2GPS3K/YFCC4K metadata CSV; or a VIGOR folder.")],
    configs: Annotated[list[str] | None, typer.Option("--config", "-c", help="A column: \\[name=]config.toml (repeatable).")] = None,
    prompts: Annotated[list[Path] | None, typer.Option("--prompts", help="A column per prompts folder (repeatable).")] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Image folder for IMG_ID,LAT,LON metadata CSVs.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N photos.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write report.json, report.md, predictions.csv, accuracy.png here.")] = None,
    no_cache: NoCacheOption = False,
) -> None:
    """Compare configurations and prompt versions side by side on a labelled set."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from geoagent.eval.datasets import load_dataset
    from geoagent.eval.runner import EvalRun, build_columns, markdown_table, write_outputs

    with user_errors():
        data = load_dataset(dataset, images)
        for name, reason in data.skipped:
            stderr.print(f"skipped {name}: {reason}", highlight=False)
        if not data.items:
            raise InputError(f"{dataset}: no usable photos")
        columns = build_columns(list(configs or []), list(prompts or []), lambda s: apply_flags(s, no_cache=no_cache))
        run = EvalRun(data, columns, limit)
        total = len(run.items) * len(columns)
        bar_columns = (TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        partial = False
        with Progress(*bar_columns, console=stderr, transient=True) as bar:
            task = bar.add_task("eval", total=total)
            run.on_photo = lambda: bar.advance(task)
            try:
                asyncio.run(run.execute())
            except KeyboardInterrupt:
                partial = True
        report = write_outputs(run, out, partial=partial) if out else run.report(partial=partial)
        _print_report(report, markdown_table)
        if out:
            plot = ", accuracy.png" if (out / "accuracy.png").exists() else ""  # only with the [plot] extra
            stdout.print(f"wrote {out}/report.json, report.md, predictions.csv{plot}", highlight=False)
        if partial:
            stderr.print("interrupted: the report covers the photos finished so far; rerun to resume from the cache")
            raise typer.Exit(130)


def _print_report(report: dict[str, Any], markdown_table: Any) -> None:
    labels = list(report["columns"])
    table = Table("metric", *labels, title=f"{report['dataset']}: {report['photos']} photos", box=None)
    for line in markdown_table(report).splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table.add_row(*cells)
    stdout.print(table)


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
        stdout.print(f"prompts from {prompt_set.directory}", highlight=False, markup=False, soft_wrap=True)
        for name, digest in prompt_set.hashes().items():
            stdout.print(f"  {name:<24} {digest}", highlight=False, markup=False)


@prompts_app.command("export")
def prompts_export(
    directory: Annotated[Path, typer.Argument(help="Folder to write the templates into (created if missing).", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Overwrite templates already in the folder.")] = False,
) -> None:
    """Copy the bundled prompt templates into a folder to edit them; use it with --prompts DIR."""
    from geoagent.prompts import export_prompts

    with user_errors():
        written = export_prompts(directory, force=force)
        stdout.print(f"wrote {len(written)} files to {directory}; edit them and pass --prompts {directory}", highlight=False, markup=False, soft_wrap=True)


@index_app.command("build")
def index_build(
    source: Annotated[Path, typer.Argument(help="A folder of photos with EXIF GPS (recursive), or a CSV path,lat,lon[,country].")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index folder to create or update.")],
    index_type: Annotated[str, typer.Option("--type", help="flat (exact) | hnsw | ivf (approximate, for large sets).")] = "flat",
    kmeans: Annotated[int | None, typer.Option("--kmeans", help="Geographic k-means clusters (default: retrieval.kmeans_k).")] = None,
    config: ConfigOption = None,
) -> None:
    """Embed geotagged photos with open_clip and index them with faiss. Reruns embed only new or changed files."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with user_errors():
        from geoagent.retrieval.vectors import INDEX_TYPES

        if index_type not in INDEX_TYPES:
            raise ConfigError(f"--type: '{index_type}' is not one of {', '.join(INDEX_TYPES)}")
        settings = load_config(config)
        from geoagent.retrieval.embedder import Embedder
        from geoagent.retrieval.index import build_index

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
                kmeans_k=kmeans or settings.retrieval.kmeans_k,
                batch_size=settings.retrieval.batch_size,
                progress=advance,
                on_total=lambda total: bar.update(task, total=total),
            )
        stdout.print(
            f"indexed {report.indexed} photos into {out} ({report.embedded} embedded, "
            f"{report.reused} reused), skipped {len(report.skipped)}",
            highlight=False,
            soft_wrap=True,
        )
        for name, reason in report.skipped:
            stdout.print(f"  skipped {name}: {reason}", highlight=False, soft_wrap=True)


@index_app.command("info")
def index_info(
    directory: Annotated[Path, typer.Argument(help="An index folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Entry count, embedder, index type and the countries covered."""
    with user_errors():
        from geoagent.retrieval.index import ReferenceIndex, index_summary

        load_config(config)  # a broken config is reported here too, as by every command
        summary = index_summary(ReferenceIndex.open(directory))
        if as_json:
            stdout.print_json(data=summary)
            return
        countries: dict[str, int] = summary.pop("countries")  # type: ignore[assignment]
        for key, value in summary.items():
            stdout.print(f"{key:>16}: {value}", highlight=False)
        top = ", ".join(f"{code} {count}" for code, count in list(countries.items())[:20])
        stdout.print(f"{'countries':>16}: {len(countries)} ({top}{', ...' if len(countries) > 20 else ''})", highlight=False)


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the configuration in effect (file + environment + defaults) as JSON. Keys are never shown."""
    with user_errors():
        settings = load_config(config)
        stdout.print_json(settings.model_dump_json())


@cache_app.command("stats")
def cache_stats(config: ConfigOption = None) -> None:
    """How many answers the cache holds, by task and model."""
    from geoagent.vlm.cache import ResponseCache

    with user_errors():
        settings = load_config(config)
        stats = ResponseCache(settings.cache.dir).stats()
        stdout.print(f"{stats.path}: {stats.entries} answers, {stats.size_bytes / 1e6:.2f} MB")
        for label, counts in (("task", stats.by_task), ("model", stats.by_model)):
            if counts:
                table = Table(label, "answers")
                for name, count in sorted(counts.items()):
                    table.add_row(name, str(count))
                stdout.print(table)


@cache_app.command("clear")
def cache_clear(config: ConfigOption = None) -> None:
    """Delete every cached answer."""
    from geoagent.vlm.cache import ResponseCache

    with user_errors():
        settings = load_config(config)
        removed = ResponseCache(settings.cache.dir).clear()
        stdout.print(f"removed {removed} cached answers from {settings.cache.dir}")


@app.command("check")
def check(config: ConfigOption = None) -> None:
    """Check that every backend profile a task routes to is reachable and has its model."""
    from geoagent.vlm import VLMPool

    with user_errors():
        settings = load_config(config)
        routed = settings.routed_profiles()

        async def run() -> list[tuple[str, str | None]]:
            pool = VLMPool(settings)
            results: list[tuple[str, str | None]] = []
            try:
                for name in routed:
                    client = pool.client(name)
                    try:
                        results.append((name, await client.backend.check()))
                    except GeoAgentError as exc:
                        results.append((name, f"FAILED: {exc}"))
            finally:
                await pool.aclose()
            return results

        failed = False
        for name, outcome in asyncio.run(run()):
            failed |= bool(outcome and outcome.startswith("FAILED"))
            stdout.print(f"{name}: {outcome}", highlight=False, soft_wrap=True)
        if failed:
            raise typer.Exit(1)
