"""Confidence intervals and paired comparisons for ``eval`` columns.

On a labelled set of n photos one photo moves an accuracy by 1/n: a 96-photo set cannot tell two prompt
versions apart that differ by one or two photos. Every metric of a column gets a 95% percentile-bootstrap
interval (photos resampled with replacement, seeded, so the same seed regenerates the same intervals), and
every column after the first gets its paired difference to the first: the same resampled photos in both
columns, so what the photos share cancels out. The paired test is McNemar's exact test for the accuracy-like
metrics (only the photos one column gets right and the other wrong carry information) and the paired
bootstrap's two-sided p-value for the rest. A difference whose interval contains 0 is "not significant".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from pydantic import BaseModel

from geoagent.eval.metrics import GEOSCORE_SCALE_KM, THRESHOLDS_KM, TOKEN_METRICS, Prediction

LEVEL = 0.95
RESAMPLES = 2000
_CHUNK = 250  # resamples drawn at once: bounded memory on large sets (chunk x photos indices)


class Interval(BaseModel):
    """A metric's 95% bootstrap interval."""

    low: float | None
    high: float | None


class PairedDifference(BaseModel):
    """One metric of a column against the same metric of the first column, over the photos both answered for."""

    metric: str
    difference: float | None  # column - baseline, on the photos both hold
    low: float | None
    high: float | None
    p_value: float | None
    test: str  # "mcnemar" (exact, on discordant photos) or "paired bootstrap"
    significant: bool  # the interval excludes 0
    photos: int  # paired photos


class _Table:
    """One column's per-photo values, the arrays the metrics are computed from."""

    def __init__(self, predictions: Sequence[Prediction]) -> None:
        self.paths = [p.path for p in predictions]
        self.error = np.array([p.error_km if p.error_km is not None else math.inf for p in predictions], dtype=np.float64)
        self.country = np.array(
            [float(p.pred_country == p.true_country) if p.true_country else math.nan for p in predictions], dtype=np.float64
        )
        self.top1_before = np.array([_hit(p.retrieval_ranking, p.true_ref, 1) for p in predictions], dtype=np.float64)
        self.top1_after = np.array([_hit(p.final_ranking, p.true_ref, 1) for p in predictions], dtype=np.float64)
        self.recall = {k: np.array([_hit(p.retrieval_ranking, p.true_ref, k) for p in predictions], dtype=np.float64) for k in (1, 5, 10)}
        self.answered = np.array([p.error_km is not None and not p.abstained for p in predictions], dtype=np.float64)
        self.selective = np.array(
            [float(p.error_km < 25) if p.error_km is not None and not p.abstained else math.nan for p in predictions], dtype=np.float64
        )
        self.sums = {
            "vlm_calls": np.array([p.vlm_calls for p in predictions], dtype=np.float64),
            "cache_hits": np.array([p.cache_hits for p in predictions], dtype=np.float64),
            **{name: np.array([getattr(p, name) for p in predictions], dtype=np.float64) for name in TOKEN_METRICS},
            "failures": np.array([p.error_km is None for p in predictions], dtype=np.float64),
        }

    def take(self, order: Sequence[int]) -> _Table:
        picked = object.__new__(_Table)
        index = np.asarray(order, dtype=np.int64)
        picked.paths = [self.paths[i] for i in index]
        picked.error, picked.country = self.error[index], self.country[index]
        picked.top1_before, picked.top1_after = self.top1_before[index], self.top1_after[index]
        picked.recall = {k: v[index] for k, v in self.recall.items()}
        picked.answered, picked.selective = self.answered[index], self.selective[index]
        picked.sums = {k: v[index] for k, v in self.sums.items()}
        return picked


def _hit(ranking: list[str], truth: str | None, k: int) -> float:
    return math.nan if not truth else float(truth in ranking[:k])


def _nanmean(values: np.ndarray) -> np.ndarray:
    """Row means ignoring NaN (photos without that label); NaN where a row has none."""
    present = ~np.isnan(values)
    counts = present.sum(axis=-1)
    totals = np.where(present, values, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


def _finite_mean(errors: np.ndarray) -> np.ndarray:
    return _nanmean(np.where(np.isfinite(errors), errors, np.nan))


#: metric -> (per-photo arrays of a resample, shape (B, n)) -> one value per resample. Accuracy-like metrics
#: (a photo is right or wrong) are the ones McNemar's test applies to.
Metric = Callable[[_Table, np.ndarray], np.ndarray]
METRICS: dict[str, Metric] = {
    **{f"acc@{t}km": (lambda t: lambda table, idx: (table.error[idx] < t).mean(axis=-1))(t) for t in THRESHOLDS_KM},
    "coverage": lambda table, idx: table.answered[idx].mean(axis=-1),
    "selective_acc@25km": lambda table, idx: _nanmean(table.selective[idx]),
    "median_km": lambda table, idx: np.median(table.error[idx], axis=-1),
    "mean_km": lambda table, idx: _finite_mean(table.error[idx]),
    "geoscore": lambda table, idx: (5000 * np.exp(-table.error[idx] / GEOSCORE_SCALE_KM)).mean(axis=-1),
    "country_acc": lambda table, idx: _nanmean(table.country[idx]),
    **{f"retrieval_recall@{k}": (lambda k: lambda table, idx: _nanmean(table.recall[k][idx]))(k) for k in (1, 5, 10)},
    "top1_before": lambda table, idx: _nanmean(table.top1_before[idx]),
    "top1_after": lambda table, idx: _nanmean(table.top1_after[idx]),
    **{name: (lambda name: lambda table, idx: table.sums[name][idx].sum(axis=-1))(name) for name in
       ("vlm_calls", "cache_hits", *TOKEN_METRICS, "failures")},
    **{f"{name}_per_photo": (lambda name: lambda table, idx: table.sums[name][idx].mean(axis=-1))(name) for name in TOKEN_METRICS},
}  # fmt: skip


def _indicator(table: _Table, metric: str) -> np.ndarray | None:
    """The per-photo right/wrong of an accuracy-like metric (NaN: not labelled), for McNemar's test."""
    if metric == "selective_acc@25km":
        return table.selective
    if metric.startswith("acc@"):
        return (table.error < float(metric[4:-2])).astype(np.float64)
    if metric == "country_acc":
        return table.country
    if metric.startswith("retrieval_recall@"):
        return table.recall[int(metric.rsplit("@", 1)[1])]
    if metric in ("top1_before", "top1_after"):
        return getattr(table, metric)
    return None


def _defined(table: _Table, metric: str) -> bool:
    """Whether the metric has a value on the whole set (a recall needs reference ids, country_acc countries)."""
    if not table.paths:
        return False
    return not math.isnan(float(METRICS[metric](table, np.arange(len(table.paths))[None, :])[0]))


def _resamples(n: int, seed: int, resamples: int) -> list[np.ndarray]:
    """The bootstrap's photo indices, in chunks, drawn from one seeded generator (same seed, same intervals)."""
    rng = np.random.default_rng(seed)
    chunks, left = [], resamples
    while left > 0:
        size = min(_CHUNK, left)
        chunks.append(rng.integers(0, n, size=(size, n)))
        left -= size
    return chunks


def _percentiles(values: np.ndarray) -> tuple[float | None, float | None]:
    values = values[~np.isnan(values)]
    if not len(values):
        return None, None
    with np.errstate(invalid="ignore"):  # infinite draws (medians of mostly failed resamples) stay infinite
        low, high = np.quantile(values, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return _finite(low), _finite(high)


def _finite(value: float) -> float | None:
    """Strict JSON: an infinite value (e.g. the median error of a set most of whose photos failed) is null."""
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def intervals(predictions: Sequence[Prediction], *, seed: int = 0, resamples: int = RESAMPLES) -> dict[str, Interval]:
    """A 95% percentile-bootstrap interval for every metric defined on this column."""
    table = _Table(predictions)
    if not table.paths:
        return {}
    names = [m for m in METRICS if _defined(table, m)]
    draws: dict[str, list[np.ndarray]] = {m: [] for m in names}
    for chunk in _resamples(len(table.paths), seed, resamples):
        for metric in names:
            draws[metric].append(METRICS[metric](table, chunk))
    return {m: Interval(**dict(zip(("low", "high"), _percentiles(np.concatenate(draws[m]))))) for m in names}


def mcnemar_p(baseline: np.ndarray, column: np.ndarray) -> float:
    """McNemar's exact two-sided test: among photos exactly one column gets right, is either side favoured?"""
    labelled = ~(np.isnan(baseline) | np.isnan(column))
    only_column = int(np.sum((column == 1) & (baseline == 0) & labelled))
    only_baseline = int(np.sum((baseline == 1) & (column == 0) & labelled))
    discordant = only_column + only_baseline
    if discordant == 0:
        return 1.0
    k = min(only_column, only_baseline)
    tail = sum(math.comb(discordant, i) for i in range(k + 1)) / 2**discordant
    return min(1.0, 2 * tail)


def paired(
    baseline: Sequence[Prediction], column: Sequence[Prediction], *, seed: int = 0, resamples: int = RESAMPLES
) -> list[PairedDifference]:
    """Every metric of ``column`` minus ``baseline`` on the photos both hold, with its interval and paired test."""
    base_table, column_table = _Table(baseline), _Table(column)
    where = {path: i for i, path in enumerate(column_table.paths)}
    shared = [(i, where[path]) for i, path in enumerate(base_table.paths) if path in where]
    if not shared:
        return []
    base = base_table.take([i for i, _ in shared])
    other = column_table.take([j for _, j in shared])
    names = [m for m in METRICS if _defined(base, m) and _defined(other, m)]
    everyone = np.arange(len(shared))[None, :]
    draws: dict[str, list[np.ndarray]] = {m: [] for m in names}
    for chunk in _resamples(len(shared), seed, resamples):
        for metric in names:
            draws[metric].append(METRICS[metric](other, chunk) - METRICS[metric](base, chunk))
    out = []
    for metric in names:
        diffs = np.concatenate(draws[metric])
        diffs = diffs[~np.isnan(diffs)]
        observed = float(METRICS[metric](other, everyone)[0] - METRICS[metric](base, everyone)[0])
        low, high = _percentiles(diffs)
        indicator_base, indicator_column = _indicator(base, metric), _indicator(other, metric)
        if indicator_base is not None and indicator_column is not None:
            p, test = mcnemar_p(indicator_base, indicator_column), "mcnemar"
        else:
            p, test = _bootstrap_p(diffs), "paired bootstrap"
        significant = low is not None and high is not None and (low > 0 or high < 0)
        out.append(PairedDifference(
            metric=metric, difference=_finite(observed) if not math.isnan(observed) else None, low=low, high=high,
            p_value=float(f"{p:.6g}"), test=test, significant=significant, photos=len(shared),
        ))  # fmt: skip
    return out


def _bootstrap_p(diffs: np.ndarray) -> float:
    """Two-sided p-value of the paired bootstrap: how often a resample's difference lands on either side of 0."""
    if not len(diffs):
        return 1.0
    below, above = float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0))
    return min(1.0, 2 * min(below, above))
