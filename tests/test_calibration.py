"""Confidence a person can act on: a calibrator fitted by `eval --calibrate` turns the agent's evidence into the
probability of being within confidence_km, eval reports whether confidence is calibrated (ECE) and what
abstaining buys (accuracy against coverage), and below --min-confidence the answer is "unknown"."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from conftest import run_cli, world_settings, write_world_config
from geoagent.agent.calibration import (
    Calibrator,
    at_coverage,
    coverage_curve,
    expected_calibration_error,
    fit,
    fitted_on,
)
from geoagent.batch.formats import feature, write_csv
from geoagent.errors import ConfigError
from geoagent.types import ConfidenceFeatures
from standin import WorldJudge


def synthetic(n: int, seed: int) -> tuple[list[ConfidenceFeatures], list[bool]]:
    """Features whose true P(hit) is a known logistic function of margin and votes; the raw score overstates it."""
    rng = np.random.default_rng(seed)
    margin, votes, retrieval = rng.uniform(0, 2, n), rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    p = 1 / (1 + np.exp(-(-2.0 + 1.8 * margin + 1.5 * votes)))
    hits = rng.uniform(size=n) < p
    rows = [
        ConfidenceFeatures(score=float(min(1.0, 0.3 + 0.7 * pi)), margin=float(m), votes=float(v), retrieval=float(r),
                           prior=0.0, reasoning=0.0, near_duplicate=False)
        for pi, m, v, r in zip(p, margin, votes, retrieval)
    ]  # fmt: skip
    return rows, hits.tolist()


def origin(photos: int = 0) -> object:
    return fitted_on("synthetic", photos, 0, "llava:7b", "tournament", None)


def test_a_fitted_calibrator_is_calibrated_on_held_out_photos():
    """Fitted on one sample, on a disjoint one its probabilities match the hit rate (ECE <= 0.05), where the
    uncalibrated score (too confident by construction) does not."""
    train, train_hits = synthetic(600, seed=1)
    test, test_hits = synthetic(4000, seed=2)
    calibrator = fit(train, train_hits, confidence_km=25.0, fitted_on=origin(600))
    calibrated = [calibrator.probability(f) for f in test]
    assert expected_calibration_error(calibrated, test_hits) <= 0.05
    assert expected_calibration_error([f.score for f in test], test_hits) > 0.1  # overstated by 0.3 * (1 - p)


def test_ece_by_hand():
    """Two bins: 0.9 confident and right half the time (|0.5-0.9| = 0.4), 0.15 confident and never right."""
    assert expected_calibration_error([0.9, 0.9, 0.15, 0.15], [True, False, False, False]) == pytest.approx(0.5 * 0.4 + 0.5 * 0.15)


def test_abstaining_on_the_least_confident_photos_raises_accuracy():
    """The accuracy-coverage curve: answering only the most confident 70% beats answering everything when
    confidence ranks right answers first; the threshold keeps ties together."""
    test, hits = synthetic(2000, seed=3)
    calibrator = fit(*synthetic(600, seed=1), confidence_km=25.0, fitted_on=origin())
    curve = coverage_curve([calibrator.probability(f) for f in test], hits)
    everything, seventy = at_coverage(curve, 1.0), at_coverage(curve, 0.7)
    assert everything["coverage"] == 1.0 and everything["accuracy"] == pytest.approx(np.mean(hits), abs=1e-4)
    assert 0.7 <= seventy["coverage"] < 0.72
    assert seventy["accuracy"] > everything["accuracy"] + 0.05


def test_a_calibration_file_round_trips_and_bad_files_are_one_line(tmp_path):
    """The file records what it was fitted on; a corrupt one, or a missing one, is a ConfigError naming it."""
    calibrator = fit(*synthetic(200, seed=4), confidence_km=25.0, fitted_on=origin(200))
    path = tmp_path / "c.json"
    calibrator.save(path)
    assert Calibrator.load(path) == calibrator
    assert json.loads(path.read_text())["fitted_on"]["photos"] == 200
    assert calibrator.mismatch("llava:7b", "allpairs", None) == "calibration fitted on another setup: strategy 'tournament' (now 'allpairs')"
    (tmp_path / "bad.json").write_text("{not json")
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(ConfigError) as err:
            Calibrator.load(bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)


async def test_below_min_confidence_the_answer_is_unknown_and_outputs_carry_no_coordinate(standin, world, world_retriever, tmp_path):
    """min_confidence = 1: every visual answer abstains — no coordinate, country or place, the best guess kept as the
    first candidate; CSV leaves lat/lon empty and GeoJSON has a null geometry. Without it nothing abstains."""
    from geoagent.agent.controller import GeoAgent

    server = standin(judge=WorldJudge(world.truth))
    photo = world.queries[0].path
    async with GeoAgent(world_settings(world, server, tmp_path / "cache", strategy="tournament"), retriever=world_retriever) as agent:
        answered = await agent.locate(photo)
    async with GeoAgent(world_settings(world, server, tmp_path / "cache", strategy="tournament", min_confidence=1.0),
                        retriever=world_retriever) as agent:  # fmt: skip
        unknown = await agent.locate(photo)
    assert not answered.abstained and answered.lat is not None and not answered.calibrated
    assert unknown.abstained and (unknown.lat, unknown.lon, unknown.country, unknown.place) == (None, None, None, None)
    assert unknown.candidates[0].id == answered.candidates[0].id and unknown.confidence == answered.confidence
    entry = json.loads(unknown.model_dump_json())
    buffer = io.StringIO()
    write_csv(buffer, lambda: iter([entry]))
    row = next(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert (row["lat"], row["lon"], row["abstained"]) == ("", "", "True")
    assert feature(entry)["geometry"] is None


def test_eval_calibrate_then_apply_on_a_disjoint_split(standin, world, tmp_path):
    """eval --calibrate on one half of the queries writes a calibrator; eval of the other half with
    [agent] calibration reports calibrated confidence, its ECE beside the uncalibrated score's, the reliability
    bins and the accuracy-coverage table; locate --json then says calibrated, and --min-confidence abstains."""
    rows = list(csv.DictReader(world.queries_csv.open()))
    order = np.random.default_rng(0).permutation(len(rows))
    for name, half in (("fit.csv", order[: len(rows) // 2]), ("test.csv", order[len(rows) // 2 :])):
        with (world.root / name).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows[i] for i in half)
    server = standin(judge=WorldJudge(world.truth))
    config = write_world_config(tmp_path / "agent.toml", world, server, tmp_path / "cache", strategy="tournament", reasoning=False)
    fitted = run_cli("eval", str(world.root / "fit.csv"), "--config", f"vlm={config}", "--calibrate", str(tmp_path / "c.json"),
                     "--out", str(tmp_path / "fit"), cwd=tmp_path)  # fmt: skip
    assert fitted.returncode == 0, fitted.stderr
    calibration = json.loads((tmp_path / "c.json").read_text())
    assert calibration["fitted_on"]["photos"] == len(rows) // 2 and calibration["kind"] == "logistic"
    uncalibrated = json.loads((tmp_path / "fit" / "report.json").read_text())["columns"]["vlm"]["confidence"]
    assert uncalibrated["calibrated"] is False

    applied = config.read_text().replace("[agent]\n", f'[agent]\ncalibration = "{tmp_path / "c.json"}"\n')
    (tmp_path / "calibrated.toml").write_text(applied)
    tested = run_cli("eval", str(world.root / "test.csv"), "--config", f"vlm={tmp_path / 'calibrated.toml'}",
                     "--out", str(tmp_path / "test"), cwd=tmp_path)  # fmt: skip
    assert tested.returncode == 0, tested.stderr
    section = json.loads((tmp_path / "test" / "report.json").read_text())["columns"]["vlm"]["confidence"]
    assert section["calibrated"] is True and section["photos"] == len(rows) - len(rows) // 2
    assert 0 <= section["ece"] <= 1 and 0 <= section["ece_uncalibrated"] <= 1
    assert sum(b["photos"] for b in section["reliability"]) == section["photos"]
    assert section["coverage"][0]["coverage"] == 1.0
    report_md = (tmp_path / "test" / "report.md").read_text()
    assert "## vlm: confidence (within 25 km)" in report_md and "calibrated probability" in report_md
    assert (tmp_path / "test" / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    photo = str(world.root / rows[order[-1]]["path"])
    located = run_cli("locate", photo, "--config", str(tmp_path / "calibrated.toml"), "--json", cwd=tmp_path)
    result = json.loads(located.stdout)
    assert located.returncode == 0 and result["calibrated"] is True and result["confidence_km"] == 25.0
    unknown = run_cli("locate", photo, "--config", str(tmp_path / "calibrated.toml"), "--min-confidence", "1", cwd=tmp_path)
    assert unknown.returncode == 0 and "unknown" in unknown.stdout and "below the minimum" in unknown.stdout


def test_a_calibration_for_another_distance_is_refused(tmp_path):
    """A calibrator answers for the distance it was fitted on: another agent.confidence_km is one clear error."""
    from geoagent.agent.controller import GeoAgent
    from geoagent.config import Settings

    fit(*synthetic(100, seed=5), confidence_km=25.0, fitted_on=origin(100)).save(tmp_path / "c.json")
    agent = GeoAgent(Settings(agent={"calibration": tmp_path / "c.json", "confidence_km": 10.0}))
    with pytest.raises(ConfigError, match="fitted for confidence_km = 25, but agent.confidence_km = 10"):
        agent.calibrator()
