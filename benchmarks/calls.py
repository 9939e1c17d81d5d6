"""Accuracy per VLM call: what each reranking strategy buys for the calls it spends, in the simulated world.

SIMULATION: the stand-in VLM over the synthetic world of benchmarks/simulate.py, not a real model. Every
strategy runs on the same worlds (one per seed) at two VLM skill settings, in one run:

- a good VLM: pairwise accuracy 0.95, 5% first-position bias;
- a weaker one: pairwise accuracy 0.85, 10% first-position bias.

It checks issue #10's targets for adaptive debiasing against asking both orders (same seeds, same worlds):
at the good VLM, adaptive Top-1 >= both-orders Top-1 - 0.02 with at most 1.3 (K - 1) calls per photo;
at the weaker one, within 0.03.

    .venv/bin/python benchmarks/calls.py           # writes benchmarks/results/calls.md and calls.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulate import ADAPTIVE, BOTH_ORDERS, NO_VLM_EXTRAS, ONE_ORDER, ROOT, simulate  # noqa: E402
from standin import Knobs  # noqa: E402

from geoagent.eval.runner import EvalRun  # noqa: E402

TOP_K = 10
SETTINGS = {"good VLM (0.95, 5% bias)": (0.95, 0.05, 0.02), "weaker VLM (0.85, 10% bias)": (0.85, 0.10, 0.03)}
CALL_BUDGET = 1.3 * (TOP_K - 1)
STRATEGIES: dict[str, dict[str, object]] = {
    "none": {"strategy": "none"},
    "pointwise": {"strategy": "pointwise"},
    "tournament, one order": {"strategy": "tournament", **ONE_ORDER},
    "tournament, adaptive": {"strategy": "tournament", **ADAPTIVE},
    "tournament, both orders": {"strategy": "tournament", **BOTH_ORDERS},
    "sorting, adaptive": {"strategy": "sorting", **ADAPTIVE},
    "sorting, both orders": {"strategy": "sorting", **BOTH_ORDERS},
    "allpairs, adaptive": {"strategy": "allpairs", **ADAPTIVE},
    "allpairs, both orders": {"strategy": "allpairs", **BOTH_ORDERS},
}


def column_figures(run: EvalRun) -> dict[str, tuple[float, float]]:
    """label -> (Top-1, mean VLM calls per photo)."""
    report = run.report()
    figures = {}
    for label, column in report["columns"].items():
        metrics = column["metrics"]
        figures[label] = (metrics["top1_after"], metrics["vlm_calls"] / metrics["n"])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one synthetic world per seed")
    parser.add_argument("--places-per-country", type=int, default=12)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    started = time.perf_counter()
    variants = {label: {**agent, **NO_VLM_EXTRAS, "top_k": TOP_K} for label, agent in STRATEGIES.items()}
    # (setting, seed) -> label -> (top1, calls)
    results: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}
    queries = 0
    for setting, (accuracy, bias, _) in SETTINGS.items():
        for seed in args.seeds:
            knobs = Knobs(pairwise_accuracy=accuracy, first_position_bias=bias, seed=seed)
            run, _, _ = simulate(knobs, variants, seed=seed, places_per_country=args.places_per_country)
            results[setting, seed] = column_figures(run)
            queries = len(run.items)
    elapsed = time.perf_counter() - started
    text = render(results, args, queries, elapsed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calls.md").write_text(text)
    plot(results, args.out / "calls.png")
    print(text)


def render(results: dict[tuple[str, int], dict[str, tuple[float, float]]], args: argparse.Namespace, queries: int, elapsed: float) -> str:
    seeds = args.seeds
    lines = [
        "SIMULATION: a stand-in VLM over synthetic worlds, not a real model.",
        "",
        f"{len(seeds)} worlds (seeds {', '.join(map(str, seeds))}) of {queries} query photos each, top-k {TOP_K}; "
        f"Top-1 and mean VLM calls per photo, per world. Produced by `.venv/bin/python benchmarks/calls.py` in {elapsed:.0f} s.",
        "",
    ]
    for setting in SETTINGS:
        lines += [f"**{setting}**", "", "| strategy | " + " | ".join(f"Top-1 (seed {s}) | calls (seed {s})" for s in seeds) + " |",
                  "| --- |" + " ---: | ---: |" * len(seeds)]
        for label in STRATEGIES:
            cells = [f"{results[setting, s][label][0]:.4f} | {results[setting, s][label][1]:.1f}" for s in seeds]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Targets (adaptive tournament against both orders, same world):", ""]
    for setting, (_, _, tolerance) in SETTINGS.items():
        for seed in seeds:
            adaptive, full = results[setting, seed]["tournament, adaptive"], results[setting, seed]["tournament, both orders"]
            accuracy_ok = adaptive[0] >= full[0] - tolerance
            budget_ok = adaptive[1] <= CALL_BUDGET or "weaker" in setting  # the call budget is set for the good VLM
            verdict = "met" if accuracy_ok and budget_ok else "MISSED"
            lines.append(
                f"- {setting}, seed {seed}: Top-1 {adaptive[0]:.4f} vs {full[0]:.4f} (allowed -{tolerance}), "
                f"calls {adaptive[1]:.1f} vs {full[1]:.1f} (budget {CALL_BUDGET:.1f}): {verdict}"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict[tuple[str, int], dict[str, tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(SETTINGS), figsize=(11, 4.5), dpi=110, sharey=True)
    for axis, setting in zip(axes, SETTINGS):
        for label in STRATEGIES:
            points = [results[key][label] for key in results if key[0] == setting]
            top1 = sum(p[0] for p in points) / len(points)
            calls = sum(p[1] for p in points) / len(points)
            axis.scatter([max(calls, 0.5)], [top1 * 100])
            axis.annotate(label, (max(calls, 0.5), top1 * 100), fontsize=7, xytext=(4, 2), textcoords="offset points")
        axis.set_xscale("log")
        axis.set_xlabel("VLM calls per photo (log; 'none' drawn at 0.5)")
        axis.set_title(setting, fontsize=10)
        axis.grid(True, which="both", color="0.9")
    axes[0].set_ylabel("Top-1 (%), mean over worlds")
    figure.suptitle("SIMULATION: accuracy per VLM call", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    main()
