"""The ``geoagent`` command: a thin layer over the library. Heavy modules are imported inside commands."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from geoagent.config import Settings, load_config
from geoagent.errors import GeoAgentError

app = typer.Typer(
    name="geoagent",
    help="Where was this photo taken? Local CLIP retrieval, then vision-language models vote.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(help="Inspect or clear the response cache.", no_args_is_help=True)
config_app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(config_app, name="config")

stdout = Console()
stderr = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (default: ./geoagent.toml if present).", show_default=False),
]


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn GeoAgent's errors into one line on stderr and the right exit code, never a traceback."""
    try:
        yield
    except GeoAgentError as exc:
        stderr.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("interrupted")
        raise typer.Exit(130) from None


def settings_from(config: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    return load_config(config, overrides)


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the configuration in effect (file + environment + defaults) as JSON. Keys are never shown."""
    with user_errors():
        settings = settings_from(config)
        stdout.print_json(settings.model_dump_json())


@cache_app.command("stats")
def cache_stats(config: ConfigOption = None) -> None:
    """How many answers the cache holds, by task and model."""
    from geoagent.vlm.cache import ResponseCache

    with user_errors():
        settings = settings_from(config)
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
        settings = settings_from(config)
        removed = ResponseCache(settings.cache.dir).clear()
        stdout.print(f"removed {removed} cached answers from {settings.cache.dir}")


@app.command("check")
def check(config: ConfigOption = None) -> None:
    """Check that every backend profile a task routes to is reachable and has its model."""
    from geoagent.vlm import VLMPool

    with user_errors():
        settings = settings_from(config)
        routed = sorted({settings.tasks.profile_for(task) for task in ("default", "prior", "reasoning", "pairwise", "pointwise")})

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


def main() -> None:  # pragma: no cover - console entry point for `python -m geoagent`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

