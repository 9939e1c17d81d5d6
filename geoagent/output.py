"""Human-readable rendering of results for the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from geoagent.geo import country_name
from geoagent.types import LocateResult

SHOWN_CANDIDATES = 10


def result_json(result: LocateResult, *, explain: bool = False) -> str:
    """The ``locate --json`` line: unset fields left out, unless ``explain`` asks for everything."""
    return result.model_dump_json(exclude_none=not explain)


def print_result(console: Console, result: LocateResult, *, explain: bool = False) -> None:
    place = ", ".join(p for p in (result.place, country_name(result.country) if result.country else None) if p)
    console.print(
        f"[bold]{escape(result.image)}[/]: {escape(place or 'unknown place')} ({result.lat:.4f}, {result.lon:.4f}), "
        f"confidence {result.confidence:.2f}",
        highlight=False,
    )
    table = Table("rank", "place", "country", "lat", "lon", "source", "retrieval", "score", box=None, pad_edge=False)
    for c in result.candidates[:SHOWN_CANDIDATES]:
        table.add_row(
            str(c.rank), c.place or c.id, c.country or "", f"{c.lat:.4f}", f"{c.lon:.4f}", c.source,
            f"{c.retrieval_score:.3f}" if c.retrieval_score is not None else "-", f"{c.score:.3f}",
        )
    console.print(table)
    stats = result.stats
    console.print(
        f"[dim]{stats.vlm_calls} VLM requests, {stats.cache_hits} cache hits, "
        f"{stats.prompt_tokens}+{stats.completion_tokens} tokens, "
        + (f"${stats.cost_usd:.4f}, " if stats.cost_usd is not None else "")
        + f"{stats.wall_s:.1f} s"
        + (f", {len(stats.failed_questions)} questions failed" + ("" if explain else " (--explain lists them)") if stats.failed_questions else "")
        + "[/]",
        highlight=False,
    )
    if not explain:
        return
    if result.prior:
        console.print("prior: " + ", ".join(f"{country_name(p.country)} {p.p:.2f}" for p in result.prior), highlight=False)
    trace = result.trace
    if trace is None:
        return
    if trace.submap:
        console.print(f"submap: {trace.submap}", highlight=False)
    for guess in trace.guesses:
        marker = "*" if trace.consensus_guess and guess.sample == trace.consensus_guess.sample else " "
        console.print(f" {marker}guess {guess.sample}: {country_name(guess.country)} ({guess.lat:.3f}, {guess.lon:.3f}) "
                      f"confidence {guess.confidence:.2f}; clues: {'; '.join(guess.clues)}", highlight=False, soft_wrap=True, markup=False)
    label = {c.id: f"#{c.rank} {c.place or c.id}" for c in result.candidates}
    if trace.matches:
        ties = sum(m.winner is None for m in trace.matches)
        matches = Table("A", "B", "votes (A first, then B first)", "winner", box=None, pad_edge=False,
                        title=f"{len(trace.matches)} matches, {ties} ties", title_justify="left")
        for m in trace.matches:
            votes = ", ".join(label[v] if v is not None else "failed" for v in m.votes)
            matches.add_row(label[m.a], label[m.b], votes, label[m.winner] if m.winner else "tie")
        console.print(matches)
    if trace.pointwise:
        scores = Table("candidate", "score", box=None, pad_edge=False, title="pointwise scores", title_justify="left")
        for s in trace.pointwise:
            scores.add_row(label[s.id], f"{s.score:g}")
        console.print(scores)
    if result.stats.failed_questions:
        failed = Table("task", "question", "error", box=None, pad_edge=False, title_justify="left",
                       title=f"{len(result.stats.failed_questions)} questions failed (the agent went on without them)")
        for q in result.stats.failed_questions:
            failed.add_row(q.task, Text(q.detail), Text(q.error))
        console.print(failed)
