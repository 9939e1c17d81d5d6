"""Geolocation metrics as the field reports them.

Acc@d counts errors strictly less than d km (great-circle, R = 6371 km); GeoScore is the mean of
5000 * exp(-d / 1492.7). A failed photo counts as a miss everywhere (its error is infinite).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel

from geoagent.types import ConfidenceFeatures

THRESHOLDS_KM = (1, 25, 200, 750, 2500)
GEOSCORE_SCALE_KM = 1492.7


class Prediction(BaseModel):
    """One photo's outcome in one column of an evaluation."""

    path: str
    true_lat: float
    true_lon: float
    true_country: str | None = None
    true_ref: str | None = None
    pred_lat: float | None = None
    pred_lon: float | None = None
    pred_country: str | None = None
    error_km: float | None = None  # None when the photo failed
    retrieval_ranking: list[str] = []  # candidate ids by retrieval similarity
    final_ranking: list[str] = []  # candidate ids as the agent ranked them
    vlm_calls: int = 0
    cache_hits: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    cost_usd: float | None = None  # None: a model's price is unknown (or the photo failed)
    error: str | None = None
    confidence: float | None = None  # as the agent reported it (calibrated or not)
    calibrated: bool = False
    abstained: bool = False  # below agent.min_confidence: pred_* is the best guess, not an answer
    features: ConfidenceFeatures | None = None  # what a calibrator is fitted on


#: Token counts summed per column (and per photo): every input token, those read from a provider's prefix cache, output.
TOKEN_METRICS = ("input_tokens", "cached_input_tokens", "output_tokens")


def accuracy_at(errors: Sequence[float], threshold_km: float) -> float:
    """Share of photos with error strictly below the threshold (failures are inf)."""
    return float(np.mean(np.asarray(errors) < threshold_km)) if len(errors) else 0.0


def geoscore(errors: Sequence[float]) -> float:
    finite = np.asarray(errors, dtype=np.float64)
    return float(np.mean(5000 * np.exp(-finite / GEOSCORE_SCALE_KM))) if len(finite) else 0.0


def _recall(rankings: list[list[str]], truths: list[str], k: int) -> float:
    return float(np.mean([truth in ranking[:k] for ranking, truth in zip(rankings, truths)])) if truths else 0.0


def summarise(predictions: Sequence[Prediction]) -> dict[str, float | int | None]:
    """Every metric for one column."""
    errors = [p.error_km if p.error_km is not None else math.inf for p in predictions]
    finite = [e for e in errors if math.isfinite(e)]
    metrics: dict[str, float | int | None] = {"n": len(predictions), "failures": sum(p.error_km is None for p in predictions)}
    for threshold in THRESHOLDS_KM:
        metrics[f"acc@{threshold}km"] = round(accuracy_at(errors, threshold), 4)
    metrics["median_km"] = round(float(np.median(errors)), 2) if errors else None
    metrics["mean_km"] = round(float(np.mean(finite)), 2) if finite else None
    metrics["geoscore"] = round(geoscore(errors), 1)
    with_country = [p for p in predictions if p.true_country]
    metrics["country_acc"] = (
        round(float(np.mean([p.pred_country == p.true_country for p in with_country])), 4) if with_country else None
    )
    with_ref = [p for p in predictions if p.true_ref]
    if with_ref:
        truths = [p.true_ref for p in with_ref if p.true_ref]
        for k in (1, 5, 10):
            metrics[f"retrieval_recall@{k}"] = round(_recall([p.retrieval_ranking for p in with_ref], truths, k), 4)
        metrics["top1_before"] = metrics["retrieval_recall@1"]
        metrics["top1_after"] = round(_recall([p.final_ranking for p in with_ref], truths, 1), 4)
    answered = [e for p, e in zip(predictions, errors) if not p.abstained and p.error_km is not None]
    metrics["coverage"] = round(len(answered) / len(predictions), 4) if predictions else None
    metrics["selective_acc@25km"] = round(accuracy_at(answered, 25), 4) if answered else None
    metrics["vlm_calls"] = sum(p.vlm_calls for p in predictions)
    metrics["cache_hits"] = sum(p.cache_hits for p in predictions)
    for name in TOKEN_METRICS:
        metrics[name] = sum(getattr(p, name) for p in predictions)
    answered = [p for p in predictions if p.error is None]
    priced = answered and all(p.cost_usd is not None for p in answered)
    metrics["cost_usd"] = round(sum(p.cost_usd or 0.0 for p in answered), 6) if priced else None
    # What one photo costs: the figure that compares across sets of different sizes.
    for name in TOKEN_METRICS:
        metrics[f"{name}_per_photo"] = round(metrics[name] / len(predictions), 1) if predictions else None  # type: ignore[operator]
    metrics["cost_usd_per_photo"] = round(metrics["cost_usd"] / len(answered), 8) if priced else None  # type: ignore[operator]
    return metrics


def accuracy_curve(errors: Sequence[float], thresholds_km: np.ndarray) -> np.ndarray:
    values = np.asarray(errors, dtype=np.float64)[:, None]
    return (values < thresholds_km[None, :]).mean(axis=0) if len(values) else np.zeros_like(thresholds_km)
