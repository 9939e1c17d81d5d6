"""Human-readable rendering of results for the terminal, and the JSON object of ``locate --json``."""

from __future__ import annotations

from pydantic_core import to_json
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from geoagent.bracket import has_rounds, setwise_knockout, tournament_bracket
from geoagent.exif import ExifInfo
from geoagent.geo import country_name, haversine_km, reverse_geocode
from geoagent.types import LocateResult
from geoagent.words import count

SHOWN_CANDIDATES = 10
EXIF_AGREEMENT_KM = 25.0  # the visual answer "agrees" with the EXIF position within city scale (acc@25km)
UPRIGHT = 1  # EXIF orientation of a photo stored the right way up (not worth a mention)


def result_json(result: LocateResult, *, explain: bool = False) -> str:
    """One result as ``locate --json`` prints it: unset fields left out unless ``explain``, but ``exif`` always
    there, whole (null when the photo carries none), so a reader can tell "no metadata" from "not read". The
    trace only with ``explain`` (``--map`` collects it for the guesses without printing it)."""
    data = result.model_dump(mode="json", exclude_none=not explain, exclude=None if explain else {"trace"})
    data["exif"] = result.exif.model_dump(mode="json") if result.exif is not None else None
    return to_json(data).decode()


def exif_lines(exif: ExifInfo | None) -> list[str]:
    """What the photo's metadata says, for the top of the human output (plain text, no markup)."""
    if exif is None:
        return ["EXIF: none"]
    lines = []
    if exif.gps is not None:
        country, place = reverse_geocode(exif.gps.lat, exif.gps.lon)[0]
        altitude = f", altitude {exif.gps.altitude_m:.0f} m" if exif.gps.altitude_m is not None else ""
        lines.append(f"EXIF GPS: {exif.gps.lat:.4f}, {exif.gps.lon:.4f} ({place}, {country}){altitude}")
    else:
        lines.append("EXIF GPS: none")
    details = []
    if exif.camera:
        details.append(f"camera {exif.camera}")
    if exif.taken_at is not None:
        zone = "" if exif.taken_at.tzinfo is not None else " (no UTC offset recorded)"
        details.append(f"taken {exif.taken_at.isoformat(sep=' ')}{zone}")
    if exif.orientation not in (None, UPRIGHT):
        details.append(f"orientation {exif.orientation} (turned upright before the models see it)")
    if details:
        lines.append("EXIF: " + ", ".join(details))
    return lines


def exif_agreement(result: LocateResult) -> str | None:
    """Whether the visual answer agrees with the photo's EXIF position, and how far apart they are."""
    if result.exif is None or result.exif.gps is None:
        return None
    if result.source == "exif":
        return "answered from EXIF GPS (--use-exif): no model ran"
    if result.lat is None or result.lon is None:
        return None  # abstained: no visual answer to compare
    km = float(haversine_km(result.lat, result.lon, result.exif.gps.lat, result.exif.gps.lon))
    verdict = "agrees with" if km < EXIF_AGREEMENT_KM else "disagrees with"
    return f"visual answer {verdict} EXIF GPS: {km:.1f} km apart"


def confidence_text(result: LocateResult) -> str:
    """What the confidence means: a probability within confidence_km when calibrated, else a labelled score."""
    if result.source == "exif":
        return "from the photo's EXIF GPS"
    if result.calibrated:
        return f"confidence {result.confidence:.0%} that it is within {result.confidence_km:g} km"
    return f"confidence {result.confidence:.2f} (uncalibrated score, not a probability)"


def print_result(console: Console, result: LocateResult, *, explain: bool = False) -> None:
    for line in exif_lines(result.exif):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    if result.abstained or result.lat is None or result.lon is None:
        best = result.candidates[0] if result.candidates else None
        guess = f"; best guess {escape(best.place or best.id)} ({best.lat:.4f}, {best.lon:.4f})" if best else ""
        console.print(
            f"[bold]{escape(result.image)}[/]: unknown — {confidence_text(result)} is below the minimum (agent.min_confidence){guess}",
            highlight=False,
        )
    else:
        place = ", ".join(p for p in (result.place, country_name(result.country) if result.country else None) if p)
        console.print(
            f"[bold]{escape(result.image)}[/]: {escape(place or 'unknown place')} ({result.lat:.4f}, {result.lon:.4f}), "
            f"{confidence_text(result)}",
            highlight=False,
        )
    agreement = exif_agreement(result)
    if agreement is not None:
        console.print(agreement, highlight=False, markup=False, soft_wrap=True)
    if result.match == "near_duplicate" and result.candidates:
        top = result.candidates[0]
        console.print(f"near-duplicate of reference {escape(top.id)} (similarity {top.retrieval_score or 0:.4f}): its coordinate is the answer", highlight=False)
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
        f"{stats.input_tokens}+{stats.output_tokens} tokens"
        + (f" ({stats.cached_input_tokens} input cached)" if stats.cached_input_tokens else "")
        + ", "
        + (f"${stats.cost_usd:.4f}, " if stats.cost_usd is not None else "")
        + f"{stats.wall_s:.1f} s"
        + (f", {count(len(stats.failed_questions), 'question')} failed" + ("" if explain else " (--explain lists them)") if stats.failed_questions else "")
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
    if trace.sets:
        console.print(setwise_knockout(trace.sets, label, trace.pool), highlight=False, soft_wrap=True)
    elif trace.strategy in ("tournament", "setwise") and has_rounds(trace.matches):  # setwise with set_size 2 is a tournament
        console.print(tournament_bracket(trace.matches, label, trace.pool), highlight=False)
    elif trace.matches:
        ties = sum(m.winner is None and not m.failed for m in trace.matches)
        failed = sum(m.failed for m in trace.matches)
        matches = Table("A", "B", "votes (A first, then B first)", "winner", box=None, pad_edge=False,
                        title=f"{count(len(trace.matches), 'match', 'matches')}, {count(ties, 'tie')}"
                        + (f", {failed} with no answer" if failed else ""), title_justify="left")  # fmt: skip
        for m in trace.matches:
            votes = ", ".join(label[v] if v is not None else "failed" for v in m.votes)
            outcome = label[m.winner] if m.winner else "no answer (every ask failed)" if m.failed else "tie"
            matches.add_row(label[m.a], label[m.b], votes, outcome)
        console.print(matches)
    if trace.pointwise:
        scores = Table("candidate", "score", box=None, pad_edge=False, title="pointwise scores", title_justify="left")
        for s in trace.pointwise:
            scores.add_row(label[s.id], f"{s.score:g}")
        console.print(scores)
    if trace.rewards:
        without = set(trace.rewards_without_photo)
        rewards = Table("candidate", "reward", "scored from", box=None, pad_edge=False,
                        title="GeoRanker rewards (highest first; votes by this order)", title_justify="left")
        for cid, reward in sorted(trace.rewards.items(), key=lambda item: -item[1]):
            rewards.add_row(label[cid], f"{reward:.4f}",
                            "query photo + coordinates only (no candidate photo)" if cid in without else "query photo + coordinates + candidate photo")
        console.print(rewards)
    if result.stats.failed_questions:
        failed = Table("task", "question", "error", box=None, pad_edge=False, title_justify="left",
                       title=f"{count(len(result.stats.failed_questions), 'question')} failed (the agent went on without them)")
        for q in result.stats.failed_questions:
            failed.add_row(q.task, Text(q.detail), Text(q.error))
        console.print(failed)
