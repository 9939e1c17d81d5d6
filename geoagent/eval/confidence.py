"""eval's view of confidence: is it calibrated (ECE, reliability diagram), what abstaining buys (accuracy against
coverage), and fitting a calibrator from a column's answers (``geoagent eval ... --calibrate FILE``)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from geoagent.agent.calibration import (
    Calibrator,
    at_coverage,
    coverage_curve,
    expected_calibration_error,
    fit,
    fitted_on,
    reliability,
)
from geoagent.config import Settings
from geoagent.eval.metrics import Prediction
from geoagent.files import write_atomic

COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)  # the rows of report.md's accuracy-coverage table


def _scored(rows: Sequence[Prediction]) -> list[Prediction]:
    """The photos with an answer (or a best guess) and a confidence: failures say nothing about calibration."""
    return [p for p in rows if p.error_km is not None and p.confidence is not None]


def confidence_report(rows: Sequence[Prediction], confidence_km: float) -> dict[str, Any] | None:
    """ECE of the confidence as reported and of the uncalibrated score, the reliability bins, and accuracy
    within ``confidence_km`` against coverage when only the most confident photos are answered."""
    scored = _scored(rows)
    if not scored:
        return None
    hits = [p.error_km < confidence_km for p in scored]  # type: ignore[operator]
    confidences = [float(p.confidence) for p in scored]  # type: ignore[arg-type]
    raw = [p.features.score for p in scored if p.features is not None]
    curve = coverage_curve(confidences, hits)
    return {
        "confidence_km": confidence_km,
        "calibrated": all(p.calibrated for p in scored),
        "photos": len(scored),
        "abstained": sum(p.abstained for p in rows),
        "ece": expected_calibration_error(confidences, hits),
        "ece_uncalibrated": expected_calibration_error(raw, hits) if len(raw) == len(scored) else None,
        "reliability": reliability(confidences, hits),
        "coverage": [point for c in COVERAGES if (point := at_coverage(curve, c)) is not None],
    }


def calibrate(rows: Sequence[Prediction], settings: Settings, dataset: str) -> Calibrator:
    """Fit a calibrator on a column's answers: P(error < confidence_km) from the evidence features."""
    scored = [p for p in _scored(rows) if p.features is not None]
    km = settings.agent.confidence_km
    hits = [p.error_km < km for p in scored]  # type: ignore[operator]
    _, profile = settings.profile("pairwise")
    index = settings.retrieval.index
    origin = fitted_on(dataset, len(scored), sum(hits), profile.model, settings.agent.strategy, str(index) if index else None)
    return fit([p.features for p in scored], hits, confidence_km=km, fitted_on=origin)  # type: ignore[misc]


def calibration_path(out: Path, label: str, columns: int) -> Path:
    """Where ``--calibrate OUT`` writes a column's calibrator: OUT itself for one column, else OUT.LABEL.json."""
    return out if columns == 1 else out.with_name(f"{out.stem}.{label}{out.suffix or '.json'}")


def markdown(label: str, section: dict[str, Any]) -> list[str]:
    """report.md's confidence section for one column."""
    kind = "calibrated probability" if section["calibrated"] else "uncalibrated score"
    ece = f"ECE {section['ece']:.3f} ({kind})"
    if section["calibrated"] and section["ece_uncalibrated"] is not None:
        ece += f"; the uncalibrated score's ECE {section['ece_uncalibrated']:.3f}"
    lines = [f"## {label}: confidence (within {section['confidence_km']:g} km)", "", ece + f", over {section['photos']} photos."]
    if section["abstained"]:
        lines.append(f"{section['abstained']} photos abstained (below agent.min_confidence).")
    lines += ["", "| coverage | threshold | answered | accuracy |", "| --- | --- | --- | --- |"]
    lines += [f"| {p['coverage']:.0%} | {p['threshold']:.3f} | {p['answered']} | {p['accuracy']:.3f} |" for p in section["coverage"]]
    return [*lines, ""]


def plot(sections: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """calibration.png: the reliability diagram and accuracy against coverage, one line per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5), dpi=120)
    left.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="perfect calibration")
    for label, section in sections.items():
        bins = section["reliability"]
        left.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label=f"{label} (ECE {section['ece']:.3f})")
        right.plot([p["coverage"] * 100 for p in section["coverage"]], [p["accuracy"] * 100 for p in section["coverage"]], marker=".", label=label)
    km = next(iter(sections.values()))["confidence_km"]
    left.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel=f"share within {km:g} km", title="reliability")
    right.set(xlim=(100, 0), ylim=(0, 100), xlabel="coverage (% of photos answered)", ylabel=f"accuracy within {km:g} km (%)",
              title="accuracy against coverage")  # fmt: skip
    left.legend(loc="upper left", fontsize=8)
    right.legend(loc="lower left", fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    write_atomic(path, buffer.getvalue())
