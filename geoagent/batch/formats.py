"""Where a batch writes: the journal (JSON Lines) and, from it, CSV or GeoJSON.

``--out r.jsonl``: the journal is the output. ``--out r.csv`` or ``--out r.geojson``: the journal is kept
beside it as ``r.journal.jsonl`` (shared by both, so one converts to the other without re-running) and the
file is written from the journal, atomically, at the end. ``--out r.jsonl --format csv`` writes ``r.csv``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from geoagent.batch.inputs import BatchInputError
from geoagent.batch.journal import write_atomic
from geoagent.paths import display_path

Format = Literal["jsonl", "csv", "geojson"]
FORMATS: tuple[Format, ...] = ("jsonl", "csv", "geojson")
SUFFIXES: dict[Format, str] = {"jsonl": ".jsonl", "csv": ".csv", "geojson": ".geojson"}
JOURNAL_SUFFIX = ".journal.jsonl"  # the journal beside a CSV or GeoJSON output
CSV_COLUMNS = ("image", "lat", "lon", "country", "place", "confidence", "calibrated", "abstained", "vlm_calls", "error")
FAILURES_MEMBER = "failures"  # the GeoJSON foreign member listing the photos that failed (RFC 7946 section 6.1)
POSITION = ("lon", "lat")  # RFC 7946: longitude first


@dataclass(frozen=True)
class OutputPlan:
    """The journal to keep, the format asked for, and the file written from the journal (None: the journal
    is the output)."""

    journal: Path
    format: Format
    target: Path | None


def plan_output(out: Path, fmt: str | None) -> OutputPlan:
    """Decide from ``--out`` and ``--format`` (the format defaults to what ``--out``'s suffix says, else jsonl)."""
    by_suffix = {suffix: name for name, suffix in SUFFIXES.items()}.get(out.suffix.lower())
    if fmt is not None and fmt not in FORMATS:
        raise BatchInputError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
    chosen: Format = fmt or by_suffix or "jsonl"  # type: ignore[assignment]
    if by_suffix in ("csv", "geojson"):
        if chosen != by_suffix:
            raise BatchInputError(f"--out {display_path(out)} is a .{by_suffix} file but --format is {chosen}: make them agree")
        return OutputPlan(out.with_suffix(JOURNAL_SUFFIX), chosen, out)
    return OutputPlan(out, chosen, None if chosen == "jsonl" else out.with_suffix(SUFFIXES[chosen]))


def write_output(plan: OutputPlan, entries: Callable[[], Iterator[dict[str, Any]]]) -> Path | None:
    """Write ``plan.target`` from the journal's entries (``entries()`` may be called more than once)."""
    if plan.target is None:
        return None
    writer = write_csv if plan.format == "csv" else write_geojson
    return write_atomic(plan.target, lambda fh: writer(fh, entries))


def csv_row(entry: dict[str, Any]) -> dict[str, Any]:
    """One photo's CSV row: the prediction, or the error with the coordinates left empty."""
    stats = entry.get("stats") or {}
    row = {column: entry.get(column) for column in CSV_COLUMNS}
    row["vlm_calls"] = stats.get("vlm_calls")
    return row


def write_csv(fh: IO[str], entries: Callable[[], Iterable[dict[str, Any]]]) -> None:
    writer = csv.DictWriter(fh, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_row(entry) for entry in entries())


def feature(entry: dict[str, Any]) -> dict[str, Any]:
    """A located photo as a GeoJSON Point Feature; its prediction's other fields are the properties. An abstained
    photo has no coordinate: its geometry is null (RFC 7946 section 3.2, an unlocated Feature)."""
    properties = {key: value for key, value in entry.items() if key not in POSITION}
    located = all(entry.get(k) is not None for k in POSITION)
    geometry = {"type": "Point", "coordinates": [entry[k] for k in POSITION]} if located else None
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def write_geojson(fh: IO[str], entries: Callable[[], Iterable[dict[str, Any]]]) -> None:
    """A FeatureCollection streamed feature by feature (two passes over the journal: the located photos,
    then the failed ones in the ``failures`` member), never the whole collection in memory."""
    fh.write('{"type":"FeatureCollection","features":[')
    _write_array(fh, (feature(e) for e in entries() if "error" not in e))
    fh.write(f'],"{FAILURES_MEMBER}":[')
    _write_array(fh, ({"image": e["image"], "error": e["error"]} for e in entries() if "error" in e))
    fh.write("]}\n")


def _write_array(fh: IO[str], items: Iterable[dict[str, Any]]) -> None:
    for number, item in enumerate(items):
        fh.write(("," if number else "") + "\n" + json.dumps(item, ensure_ascii=False, separators=(",", ":")))
