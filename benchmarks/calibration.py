"""Is GeoAgent's confidence a probability? Fit a calibrator on one split of a simulated world, measure on another.

For each seed: builds the synthetic world (8 countries x N places, each with a look-alike decoy 20-80 km away),
indexes it with the tiny random-weight CLIP, starts the stand-in VLM, splits the queries in two at random
(seeded, disjoint), runs the default agent (prior, reasoning, adaptive tournament) over the calibration split,
fits the calibrator exactly as `geoagent eval --calibrate` does, then runs the test split with it. Reports on
the test split: ECE of the calibrated confidence and of the uncalibrated score, and accuracy within 25 km when
answering everything against answering the 70% most confident photos, each with its 95% bootstrap interval.
SIMULATION: the stand-in's skill is set by its knobs; the numbers measure the machinery, not a real model.

    .venv/bin/python benchmarks/calibration.py            # writes benchmarks/results/calibration.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from geoagent.agent.calibration import at_coverage, coverage_curve, expected_calibration_error  # noqa: E402
from geoagent.config import Settings  # noqa: E402
from geoagent.eval.confidence import calibrate  # noqa: E402
from geoagent.eval.datasets import Dataset, load_dataset  # noqa: E402
from geoagent.eval.runner import Column, EvalRun  # noqa: E402
from geoagent.retrieval.embedder import Embedder  # noqa: E402
from geoagent.retrieval.index import build_index  # noqa: E402
from standin import Knobs, StandinConfig, StandinServer, WorldJudge  # noqa: E402
from standin.world import build_world  # noqa: E402

TINY_CLIP = ROOT / "tests" / "data" / "tiny-clip.json"
KM = 25.0
RESAMPLES = 2000


def run_split(dataset: Dataset, settings: Settings) -> list:
    run = EvalRun(dataset, [Column("default", settings)])
    asyncio.run(run.execute())
    if run.stopped:
        raise SystemExit(f"stopped: {run.stopped}")
    return run.predictions["default"]


def interval(values: np.ndarray, statistic, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap over photos."""
    rng = np.random.default_rng(seed)
    draws = [statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(RESAMPLES)]
    low, high = np.quantile(draws, [0.025, 0.975])
    return float(low), float(high)


#: The simulated VLMs: the default knobs, and a weaker one whose answers need the confidence most.
VLMS = {
    "good (pairwise 0.95, prior 0.8)": {},
    "weaker (pairwise 0.75, prior 0.6)": {"pairwise_accuracy": 0.75, "prior_accuracy": 0.6},
}


def one_seed(seed: int, places: int, vlm: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="geoagent-calibration-") as scratch:
        work = Path(scratch)
        world = build_world(work / "world", places_per_country=places, seed=seed)
        retrieval = {"clip_model": str(TINY_CLIP), "clip_pretrained": "none", "index": str(work / "index")}
        build_index(world.references_csv, work / "index", Embedder.load(Settings(retrieval=retrieval).retrieval))
        items = load_dataset(world.queries_csv).items
        order = np.random.default_rng(seed).permutation(len(items))
        half = len(items) // 2
        fit_split = Dataset("calibration split", [items[i] for i in order[:half]])
        test_split = Dataset("test split", [items[i] for i in order[half:]])
        with StandinServer(WorldJudge(world.truth, Knobs(seed=seed, **VLMS[vlm])), StandinConfig(capacity=64)) as server:
            backend = {"kind": "ollama", "model": "llava:7b", "base_url": server.url, "max_concurrency": 32, "timeout_s": 30}

            def settings(**agent: object) -> Settings:
                return Settings(backends={"sim": backend}, tasks={"default": "sim"}, retrieval=retrieval,
                                cache={"dir": work / "cache"}, agent=agent)  # fmt: skip

            started = time.perf_counter()
            fitted = run_split(fit_split, settings())
            calibrator = calibrate(fitted, settings(), fit_split.name)
            calibrator.save(work / "calibration.json")
            tested = run_split(test_split, settings(calibration=work / "calibration.json"))
            elapsed = time.perf_counter() - started
    scored = [p for p in tested if p.error_km is not None]
    confidence = np.array([p.confidence for p in scored])
    raw = np.array([p.features.score for p in scored])
    hits = np.array([p.error_km < KM for p in scored], dtype=float)
    curve = coverage_curve(confidence.tolist(), hits.tolist())
    seventy = at_coverage(curve, 0.7)
    threshold = seventy["threshold"]
    pairs = np.stack([confidence, hits, raw], axis=1)

    def ece(rows: np.ndarray, column: int = 0) -> float:
        return expected_calibration_error(rows[:, column].tolist(), rows[:, 1].astype(bool).tolist())

    def lift(rows: np.ndarray) -> float:
        kept = rows[rows[:, 0] >= threshold]
        return (kept[:, 1].mean() if len(kept) else 0.0) - rows[:, 1].mean()

    return {
        "vlm": vlm, "seed": seed, "fit": half, "test": len(scored), "fit_within": calibrator.fitted_on.within,
        "ece": ece(pairs), "ece_ci": interval(pairs, ece, seed),
        "ece_raw": ece(pairs, 2), "ece_raw_ci": interval(pairs, lambda rows: ece(rows, 2), seed),
        "acc_all": float(hits.mean()), "acc_all_ci": interval(hits, np.mean, seed),
        "coverage": seventy["coverage"], "acc_70": seventy["accuracy"], "threshold": threshold,
        "lift": lift(pairs), "lift_ci": interval(pairs, lift, seed), "wall_s": elapsed,
    }  # fmt: skip


def render(rows: list[dict[str, object]], places: int) -> str:
    def ci(pair: tuple[float, float]) -> str:
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]"

    lines = [
        "SIMULATION: a stand-in VLM over a synthetic world, not a real model.", "",
        f"Each seed: a world of 8 countries x {places} places (each with a look-alike decoy 20-80 km away), its queries split",
        "at random into a calibration half and a disjoint test half; the default agent (prior, reasoning, adaptive",
        "tournament); the calibrator fitted on the first half as `eval --calibrate` does; every figure on the test half,",
        "with its 95% bootstrap interval over photos. Produced by `.venv/bin/python benchmarks/calibration.py`.", "",
        "| simulated VLM | seed | fit / test photos | ECE calibrated | ECE uncalibrated score | acc@25km, all answered | acc@25km at 70% coverage | lift |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['vlm']} | {r['seed']} | {r['fit']} / {r['test']} | {r['ece']:.3f} {ci(r['ece_ci'])} | {r['ece_raw']:.3f} {ci(r['ece_raw_ci'])} "
            f"| {r['acc_all']:.3f} {ci(r['acc_all_ci'])} | {r['acc_70']:.3f} (coverage {r['coverage']:.2f}, threshold {r['threshold']:.3f}) "
            f"| {r['lift']:+.3f} {ci(r['lift_ci'])} |"
        )
    lines += ["", "Wall time per row: " + ", ".join(f"{r['wall_s']:.0f} s" for r in rows) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--places-per-country", type=int, default=100, help="8 countries; queries = 8 x this")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "calibration.md")
    args = parser.parse_args()
    rows = [one_seed(seed, args.places_per_country, vlm) for vlm in VLMS for seed in args.seeds]
    text = render(rows, args.places_per_country)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
