"""eval's statistics: every metric's 95% bootstrap interval, and paired differences between columns with a test,
so that a one-photo difference between two prompt versions is reported as noise and a real lift is not."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from geoagent.config import Settings
from geoagent.eval.datasets import Dataset
from geoagent.eval.metrics import Prediction
from geoagent.eval.runner import Column, EvalRun, differences_table, report_markdown, write_outputs
from geoagent.eval.stats import intervals, mcnemar_p, paired

N = 96


def column(right: set[int], *, n: int = N, failed: set[int] = frozenset()) -> list[Prediction]:
    """n photos; those in ``right`` are answered 5 km from the truth, the rest 900 km away, ``failed`` not at all."""
    rows = []
    for i in range(n):
        if i in failed:
            rows.append(Prediction(path=f"p{i}.jpg", true_lat=0.0, true_lon=0.0, error="boom"))
            continue
        error = 5.0 if i in right else 900.0
        rows.append(Prediction(path=f"p{i}.jpg", true_lat=0.0, true_lon=0.0, pred_lat=0.0, pred_lon=0.0, error_km=error,
                               true_country="FR", pred_country="FR" if i in right else "DE", vlm_calls=10 + i % 3))
    return rows


BASE = column(set(range(0, N, 2)))  # 48 of 96 right


def test_an_accuracy_interval_has_the_binomial_width_and_holds_the_estimate():
    """48/96 right: the 95% interval is about 0.5 ± 1.96·sqrt(0.25/96) = ±0.10, and it contains 0.5."""
    acc = intervals(BASE, seed=1)["acc@25km"]
    assert acc.low < 0.5 < acc.high
    assert 0.07 < (acc.high - acc.low) / 2 < 0.13


def test_the_same_seed_regenerates_the_same_intervals_and_another_seed_need_not():
    """Intervals are a function of (predictions, seed): a rerun of a report gives byte-identical intervals."""
    assert intervals(BASE, seed=7) == intervals(BASE, seed=7)
    assert paired(BASE, column(set(range(0, N, 2)) | {1}), seed=7) == paired(BASE, column(set(range(0, N, 2)) | {1}), seed=7)
    assert intervals(BASE, seed=7)["geoscore"] != intervals(BASE, seed=8)["geoscore"]


def test_one_photo_of_difference_is_not_significant():
    """A prompt version that gets one more photo right out of 96 (+1.04 points) is noise, and says so."""
    one_more = column(set(range(0, N, 2)) | {1})
    diffs = {d.metric: d for d in paired(BASE, one_more, seed=0)}
    acc = diffs["acc@25km"]
    assert acc.difference == pytest.approx(1 / N, abs=1e-6)
    assert acc.low <= 0 <= acc.high and not acc.significant
    assert acc.test == "mcnemar" and acc.p_value == 1.0  # one discordant photo: p = 2 * 1/2
    assert not diffs["country_acc"].significant


def test_a_real_lift_is_significant():
    """30 more photos right out of 96, none lost: the interval excludes 0 and McNemar's p is tiny."""
    lifted = column(set(range(0, N, 2)) | set(range(1, 61, 2)))
    acc = {d.metric: d for d in paired(BASE, lifted, seed=0)}["acc@25km"]
    assert acc.significant and acc.low > 0
    assert acc.p_value == pytest.approx(2 / 2**30, rel=1e-6)
    geoscore = {d.metric: d for d in paired(BASE, lifted, seed=0)}["geoscore"]
    assert geoscore.significant and geoscore.test == "paired bootstrap"


def test_mcnemar_exact_values():
    """Hand-computed: 6 discordant photos all one way gives p = 2 / 2^6; 3 against 3 gives 1."""
    base = np.array([0, 0, 0, 0, 0, 0, 1, 1], dtype=float)
    assert mcnemar_p(base, np.ones(8)) == pytest.approx(2 / 64)
    assert mcnemar_p(np.array([1, 1, 1, 0, 0, 0.0]), np.array([0, 0, 0, 1, 1, 1.0])) == 1.0


def test_pairs_are_matched_by_photo_not_by_position():
    """A column whose rows came back in another order is the same column: zero difference, not noise."""
    shuffled = list(reversed(BASE))
    for d in paired(BASE, shuffled, seed=0):
        assert d.difference in (0.0, None) and d.low in (0.0, None) and d.high in (0.0, None), d


def test_failures_keep_the_report_strict_json(tmp_path):
    """A column most of whose photos failed has an infinite median: its interval bound is null, never Infinity."""
    mostly_failed = column({0}, failed=set(range(1, 70)))
    run = EvalRun(Dataset(name="t", items=[]), [Column("a", Settings()), Column("b", Settings())], seed=0)
    run.predictions = {"a": BASE, "b": mostly_failed}
    report = write_outputs(run, tmp_path)
    for label in ("a", "b"):  # the statistics themselves never hold an infinity (report.json must stay strict JSON)
        json.dumps([report["columns"][label]["intervals"], report["columns"][label]["versus"]], allow_nan=False)
    assert report["columns"]["b"]["intervals"]["median_km"][1] is None
    assert report["columns"]["b"]["versus"]["differences"]["acc@25km"]["significant"]


def test_report_md_marks_noise_and_lift():
    """report.md's paired table: a one-photo column reads "not significant", a real lift "significant"."""
    run = EvalRun(Dataset(name="t", items=[]), [Column("base", Settings()), Column("noise", Settings()), Column("lift", Settings())])
    run.predictions = {"base": BASE, "noise": column(set(range(0, N, 2)) | {1}), "lift": column(set(range(0, N, 2)) | set(range(1, 61, 2)))}
    report = run.report()
    row = next(line for line in differences_table(report).splitlines() if line.startswith("| acc@25km |"))
    noise_cell, lift_cell = [c.strip() for c in row.strip("|").split("|")[1:]]
    assert noise_cell.endswith("not significant") and noise_cell.startswith("+0.01042")
    assert lift_cell.endswith(" significant") and not lift_cell.endswith("not significant")
    markdown = report_markdown(report)
    assert "## Against base" in markdown
    acc_row = next(line for line in markdown.splitlines() if line.startswith("| acc@25km |") and "−" not in line)
    assert re.search(r"0\.5 \[0\.\d+, 0\.\d+\]", acc_row), acc_row
