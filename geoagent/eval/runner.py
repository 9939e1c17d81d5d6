"""Run configurations (and prompt folders) side by side over a labelled set and write the comparison.

Outputs in ``--out``: report.json (every metric per column, the config and prompt hashes each used),
report.md (the table), predictions.csv (one row per photo per column) and accuracy.png (accuracy against
distance threshold). Written atomically; an interrupted run writes what it finished, marked partial.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geoagent.config import Settings, load_config
from geoagent.errors import ConfigError, GeoAgentError, RunStopped
from geoagent.eval.datasets import Dataset
from geoagent.eval import confidence
from geoagent.eval.metrics import THRESHOLDS_KM, Prediction, accuracy_curve, summarise
from geoagent.eval.stats import RESAMPLES, intervals, paired
from geoagent.files import write_atomic
from geoagent.geo import haversine_km, reverse_geocode
from geoagent.prompts import PromptSet
from geoagent.types import LocateResult

PREDICTION_COLUMNS = ["config", "path", "true_lat", "true_lon", "pred_lat", "pred_lon", "error_km", "country_true", "country_pred", "vlm_calls",
                      "confidence", "abstained"]
TABLE_METRICS = [
    *(f"acc@{t}km" for t in THRESHOLDS_KM), "coverage", "selective_acc@25km", "median_km", "mean_km", "geoscore", "country_acc",
    "retrieval_recall@1", "retrieval_recall@5", "retrieval_recall@10", "top1_before", "top1_after",
    "vlm_calls", "cache_hits", "input_tokens", "cached_input_tokens", "output_tokens", "cost_usd",
    "input_tokens_per_photo", "cached_input_tokens_per_photo", "output_tokens_per_photo", "cost_usd_per_photo", "wall_s", "failures", "n",
]  # fmt: skip


@dataclass
class Column:
    """One side of the comparison: a configuration, possibly with another prompts folder."""

    label: str
    settings: Settings
    config_path: str | None = None


def build_columns(configs: list[str], prompts: list[Path], overrides: Callable[[Settings], Settings] | None = None) -> list[Column]:
    """``--config [name=]path`` entries (none: the default config) crossed with ``--prompts`` folders."""
    specs: list[tuple[str, str | None]] = []
    for spec in configs or [""]:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        specs.append((name or (Path(path).stem if path else "default"), path or None))
    columns = []
    prompt_dirs: list[Path | None] = list(prompts) or [None]
    for label, config_path in specs:
        for prompt_dir in prompt_dirs:
            settings = load_config(config_path)
            if prompt_dir is not None:
                settings.agent.prompts_dir = prompt_dir
            if overrides:
                settings = overrides(settings)
            if prompt_dir is None:
                full = label
            else:
                full = prompt_dir.name if len(specs) == 1 else f"{label}+{prompt_dir.name}"
            columns.append(Column(full, settings, config_path))
    labels = [c.label for c in columns]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two columns share a label ({', '.join(labels)}); name them with --config name=path")
    return columns


def prediction_from(result: LocateResult, path: str, lat: float, lon: float, country: str | None, ref: str | None) -> Prediction:
    by_retrieval = sorted((c for c in result.candidates if c.retrieval_score is not None), key=lambda c: -c.retrieval_score)  # type: ignore[arg-type, operator]
    best = result.candidates[0] if result.abstained else result  # abstained: scored on its best guess, counted apart
    assert best.lat is not None and best.lon is not None
    return Prediction(
        path=path, true_lat=lat, true_lon=lon, true_country=country, true_ref=ref,
        pred_lat=best.lat, pred_lon=best.lon, pred_country=best.country,
        error_km=float(haversine_km(lat, lon, best.lat, best.lon)),
        confidence=result.confidence, calibrated=result.calibrated, abstained=result.abstained,
        features=result.confidence_features,
        retrieval_ranking=[c.id for c in by_retrieval], final_ranking=[c.id for c in result.candidates],
        vlm_calls=result.stats.vlm_calls, cache_hits=result.stats.cache_hits,
        input_tokens=result.stats.input_tokens, cached_input_tokens=result.stats.cached_input_tokens,
        output_tokens=result.stats.output_tokens,
        wall_s=result.stats.wall_s, cost_usd=result.stats.cost_usd,
    )  # fmt: skip


@dataclass
class EvalRun:
    """Columns over a dataset; predictions accumulate as photos finish, so an interrupt loses nothing done."""

    dataset: Dataset
    columns: list[Column]
    limit: int | None = None
    on_photo: Callable[[], None] | None = None
    on_warning: Callable[[str], None] | None = None
    #: Seeds the bootstrap: the same seed regenerates the same intervals.
    seed: int = 0
    predictions: dict[str, list[Prediction]] = field(default_factory=dict)
    wall_s: dict[str, float] = field(default_factory=dict)
    #: Columns that stopped before their last photo, and why (the report marks them; the other columns go on).
    stopped: dict[str, str] = field(default_factory=dict)

    @property
    def items(self) -> list[Any]:
        return self.dataset.items[: self.limit]

    async def execute(self) -> None:
        import time

        from geoagent.agent.controller import GeoAgent

        retrievers: dict[str, Any] = {}  # columns with the same retrieval settings share the loaded model
        items = self.items
        truth_country = [item.country or reverse_geocode(item.lat, item.lon)[0][0] for item in items]
        for column in self.columns:
            column.settings.agent.use_exif = False  # a query's EXIF GPS may be its label: answering from it leaks the truth
            key = column.settings.retrieval.model_dump_json()
            agent = GeoAgent(column.settings, retriever=retrievers.get(key))
            rows = self.predictions.setdefault(column.label, [])
            started = time.perf_counter()
            try:
                readiness = await agent.preflight()
                for warning in readiness.warnings:
                    if self.on_warning:
                        self.on_warning(f"column {column.label}: {warning}")
                if readiness.problems:
                    self.stopped[column.label] = "; ".join(str(p) for p in readiness.problems)
                    continue
                retrievers[key] = await agent.retriever()
                position = {str(item.path): i for i, item in enumerate(items)}
                async for path, outcome in agent.locate_many([str(item.path) for item in items]):
                    item, country = items[position[path]], truth_country[position[path]]
                    if isinstance(outcome, GeoAgentError):
                        rows.append(Prediction(path=path, true_lat=item.lat, true_lon=item.lon, true_country=country, true_ref=item.ref, error=str(outcome)))
                    else:
                        rows.append(prediction_from(outcome, path, item.lat, item.lon, country, item.ref))
                    if self.on_photo:
                        self.on_photo()
            except RunStopped as exc:
                self.stopped[column.label] = str(exc)
            finally:
                self.wall_s[column.label] = round(time.perf_counter() - started, 2)
                await agent.aclose()

    def report(self, *, partial: bool = False) -> dict[str, Any]:
        columns: dict[str, Any] = {}
        baseline = self.columns[0].label if self.columns else None
        for column in self.columns:
            rows = self.predictions.get(column.label, [])
            metrics = summarise(rows)
            versus = self.predictions.get(baseline, []) if baseline is not None and column.label != baseline else None
            metrics["wall_s"] = self.wall_s.get(column.label, 0.0)
            columns[column.label] = {
                "config": column.config_path,
                "settings": json.loads(column.settings.model_dump_json()),
                "prompts": PromptSet(column.settings.agent.prompts_dir).hashes(),
                "metrics": metrics,
                "intervals": {m: [i.low, i.high] for m, i in intervals(rows, seed=self.seed).items()},
                "confidence": confidence.confidence_report(rows, column.settings.agent.confidence_km),
                "versus": None if versus is None else {
                    "baseline": baseline,
                    "differences": {d.metric: d.model_dump(exclude={"metric"}) for d in paired(versus, rows, seed=self.seed)},
                },
                "answered": sum(p.error is None for p in rows),
                "stopped": self.stopped.get(column.label),
                "failures": [{"path": p.path, "error": p.error} for p in rows if p.error is not None],
            }
        partial = partial or bool(self.stopped)
        return {
            "dataset": self.dataset.name, "photos": len(self.items), "partial": partial, "thresholds_km": list(THRESHOLDS_KM),
            "confidence_level": 0.95, "bootstrap": {"resamples": RESAMPLES, "seed": self.seed}, "columns": columns,
        }  # fmt: skip


def markdown_table(report: dict[str, Any]) -> str:
    labels = list(report["columns"])
    present = [m for m in TABLE_METRICS if any(report["columns"][c]["metrics"].get(m) is not None for c in labels)]
    lines = ["| metric | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
    for metric in present:
        cells = [_with_interval(report["columns"][c], metric) for c in labels]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def differences_table(report: dict[str, Any]) -> str:
    """Each later column minus the first, paired over the same photos: the difference, its 95% interval, the
    paired test's p-value, and "not significant" where the interval contains 0. Empty for a single column."""
    compared = {label: c["versus"] for label, c in report["columns"].items() if c.get("versus")}
    if not compared:
        return ""
    baseline = next(iter(compared.values()))["baseline"]
    metrics = [m for m in TABLE_METRICS if any(m in v["differences"] for v in compared.values())]
    lines = [
        f"## Against {baseline} (paired over the same photos, 95% bootstrap intervals)", "",
        "| metric | " + " | ".join(f"{label} − {baseline}" for label in compared) + " |",
        "| --- |" + " --- |" * len(compared),
    ]  # fmt: skip
    for metric in metrics:
        cells = []
        for versus in compared.values():
            d = versus["differences"].get(metric)
            if d is None or d["difference"] is None:
                cells.append("-")
                continue
            verdict = "significant" if d["significant"] else "not significant"
            cells.append(f"{d['difference']:+.4g} [{_bound(d['low'])}, {_bound(d['high'])}] p={d['p_value']:.3g} {verdict}")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _with_interval(column: dict[str, Any], metric: str) -> str:
    cell = _cell(column["metrics"].get(metric))
    interval = column.get("intervals", {}).get(metric)
    return f"{cell} [{_bound(interval[0])}, {_bound(interval[1])}]" if interval and cell != "-" else cell


def _bound(value: float | None) -> str:
    return "inf" if value is None else f"{value:.4g}"


def report_markdown(report: dict[str, Any]) -> str:
    """report.md: the table, then why a column stopped early and which photos failed."""
    title = f"# {report['dataset']}: {report['photos']} photos" + (" (partial)" if report["partial"] else "")
    lines = [title, "", "Each value has its 95% bootstrap interval over photos in brackets.", "", markdown_table(report)]
    if differences := differences_table(report):
        lines += [differences]
    for label, column in report["columns"].items():
        if column.get("confidence"):
            lines += confidence.markdown(label, column["confidence"])
    for label, column in report["columns"].items():
        if column["stopped"]:
            lines += [f"**{label}** stopped after {column['answered']} answered photos: {column['stopped']}", ""]
        if column["failures"]:
            lines += [f"## {label}: {len(column['failures'])} failed photos", ""]
            lines += [f"- `{f['path']}`: {f['error']}" for f in column["failures"]]
            lines.append("")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    return f"{value:g}" if isinstance(value, float) else str(value)


def strict_json(value: Any) -> Any:
    """``value`` with every infinite or NaN float as None: JSON has no Infinity (a failed photo's error is infinite,
    so a column's median can be), and a bare ``Infinity`` makes report.json unreadable to strict parsers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def write_outputs(run: EvalRun, out: Path, *, partial: bool = False) -> dict[str, Any]:
    """report.json, report.md, predictions.csv and accuracy.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    report = run.report(partial=partial)
    write_atomic(out / "report.json", json.dumps(strict_json(report), indent=2, allow_nan=False).encode())
    write_atomic(out / "report.md", report_markdown(report).encode())
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(PREDICTION_COLUMNS)
    for label, rows in run.predictions.items():
        for p in rows:
            writer.writerow([
                label, p.path, p.true_lat, p.true_lon,
                "" if p.pred_lat is None else p.pred_lat, "" if p.pred_lon is None else p.pred_lon,
                "" if p.error_km is None else round(p.error_km, 4), p.true_country or "", p.pred_country or "", p.vlm_calls,
                "" if p.confidence is None else p.confidence, int(p.abstained),
            ])  # fmt: skip
    write_atomic(out / "predictions.csv", buffer.getvalue().encode())
    _plot(run, out / "accuracy.png")
    sections = {label: c["confidence"] for label, c in report["columns"].items() if c.get("confidence")}
    if sections and importlib.util.find_spec("matplotlib") is not None:
        confidence.plot(sections, out / "calibration.png", f"{run.dataset.name}: confidence")
    return report


def write_calibrations(run: EvalRun, out: Path) -> list[Path]:
    """``--calibrate OUT``: a calibrator fitted on each column's answers (OUT, or OUT.LABEL.json for several)."""
    written = []
    for column in run.columns:
        path = confidence.calibration_path(out, column.label, len(run.columns))
        confidence.calibrate(run.predictions.get(column.label, []), column.settings, run.dataset.name).save(path)
        written.append(path)
    return written


#: Said (once) when the optional plotting extra is missing; the rest of the report is written regardless.
PLOT_EXTRA_MISSING = "accuracy.png not written: matplotlib is not installed (pip install 'geoagent-vlm[plot]')"


def _plot(run: EvalRun, path: Path) -> None:
    """accuracy.png, where the ``[plot]`` extra is installed; otherwise a warning, and no stale plot left behind."""
    if importlib.util.find_spec("matplotlib") is None:
        path.unlink(missing_ok=True)
        warnings.warn(PLOT_EXTRA_MISSING, stacklevel=2)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thresholds = np.logspace(0, np.log10(20000), 200)
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, rows in run.predictions.items():
        errors = [p.error_km if p.error_km is not None else math.inf for p in rows]
        axis.plot(thresholds, accuracy_curve(errors, thresholds) * 100, label=label)
    for t in THRESHOLDS_KM:
        axis.axvline(t, color="0.85", linewidth=0.8, zorder=0)
    axis.set_xscale("log")
    axis.set_xlabel("distance threshold (km, log scale)")
    axis.set_ylabel("accuracy (%)")
    axis.set_ylim(0, 100)
    axis.set_title(f"{run.dataset.name}: accuracy within distance")
    axis.legend(loc="lower right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    write_atomic(path, buffer.getvalue())
