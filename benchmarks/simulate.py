"""The simulated world: every reranking strategy compared honestly on these machines (no weights, no GPU).

Builds a synthetic geotagged world (places with look-alike decoys 20-80 km away), indexes it with a tiny
random-weight CLIP, starts the stand-in VLM server (tests/standin) with the knobs below, and runs
`geoagent eval` over one column per strategy. SIMULATION: the numbers measure GeoAgent's machinery against
a simulated VLM whose skill is set by the knobs, not any real model.

    .venv/bin/python benchmarks/simulate.py            # writes benchmarks/results/simulation.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from geoagent.config import Settings  # noqa: E402
from geoagent.eval.datasets import load_dataset  # noqa: E402
from geoagent.eval.runner import Column, EvalRun, write_outputs  # noqa: E402
from geoagent.retrieval.embedder import Embedder  # noqa: E402
from geoagent.retrieval.index import build_index  # noqa: E402
from standin import Knobs, StandinConfig, StandinServer, WorldJudge  # noqa: E402
from standin.world import build_world  # noqa: E402

TINY_CLIP = ROOT / "tests" / "data" / "tiny-clip.json"
NO_VLM_EXTRAS = {"country_prior": False, "reasoning": False}

BOTH_ORDERS = {"position_debias": True}
ONE_ORDER = {"position_debias": False}
ADAPTIVE = {"position_debias": "adaptive"}

#: label -> [agent] settings. Reranking alone first, then with the prior, reasoning and submaps.
VARIANTS: dict[str, dict[str, object]] = {
    "retrieval only": {"strategy": "none", **NO_VLM_EXTRAS},
    "pointwise": {"strategy": "pointwise", **NO_VLM_EXTRAS},
    "allpairs": {"strategy": "allpairs", **BOTH_ORDERS, **NO_VLM_EXTRAS},
    "allpairs, Copeland": {"strategy": "allpairs", "vote_model": "copeland", **BOTH_ORDERS, **NO_VLM_EXTRAS},
    "allpairs, Copeland, no consensus": {"strategy": "allpairs", "vote_model": "copeland", "fusion_consensus": 0.0, **BOTH_ORDERS, **NO_VLM_EXTRAS},
    "allpairs, one order": {"strategy": "allpairs", **ONE_ORDER, **NO_VLM_EXTRAS},
    "tournament, both orders": {"strategy": "tournament", **BOTH_ORDERS, **NO_VLM_EXTRAS},
    "tournament, adaptive (default)": {"strategy": "tournament", **ADAPTIVE, **NO_VLM_EXTRAS},
    "tournament, one order": {"strategy": "tournament", **ONE_ORDER, **NO_VLM_EXTRAS},
    "sorting, both orders": {"strategy": "sorting", **BOTH_ORDERS, **NO_VLM_EXTRAS},
    "tournament + prior + reasoning": {"strategy": "tournament", "country_prior": True, "reasoning": True},
    "tournament + country submap": {"strategy": "tournament", "country_prior": True, "reasoning": False, "submap": "country"},
}

ROWS = ["top1_before", "top1_after", "acc@1km", "acc@25km", "acc@200km", "country_acc", "median_km", "calls/photo"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Knobs()
    parser.add_argument("--places-per-country", type=int, default=12, help="8 countries; each place also has a decoy")
    parser.add_argument("--pairwise-accuracy", type=float, default=defaults.pairwise_accuracy)
    parser.add_argument("--first-position-bias", type=float, default=defaults.first_position_bias)
    parser.add_argument("--pointwise-noise", type=float, default=defaults.pointwise_noise)
    parser.add_argument("--pointwise-calibration", type=float, default=defaults.pointwise_calibration)
    parser.add_argument("--prior-accuracy", type=float, default=defaults.prior_accuracy)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="run only these variants (labels)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser.parse_args()


def simulate(knobs: Knobs, variants: dict[str, dict[str, object]], *, seed: int, places_per_country: int) -> tuple[EvalRun, float, int]:
    """Build the world for ``seed``, run one eval column per variant against a stand-in with ``knobs``.

    Returns the finished run, its wall time and the number of reference photos.
    """
    with tempfile.TemporaryDirectory(prefix="geoagent-sim-") as scratch:
        work = Path(scratch)
        world = build_world(work / "world", places_per_country=places_per_country, seed=seed)
        retrieval = {"clip_model": str(TINY_CLIP), "clip_pretrained": "none", "index": str(work / "index")}
        build_index(world.references_csv, work / "index", Embedder.load(Settings(retrieval=retrieval).retrieval))
        dataset = load_dataset(world.queries_csv)
        with StandinServer(WorldJudge(world.truth, knobs), StandinConfig(capacity=64)) as server:
            columns = []
            for label, agent in variants.items():
                backend = {"kind": "ollama", "model": "llava:7b", "base_url": server.url, "max_concurrency": 32, "timeout_s": 30}
                settings = Settings(
                    backends={"sim": backend}, tasks={"default": "sim"}, retrieval=retrieval, agent=agent,
                    cache={"dir": work / "cache" / label.replace(" ", "_")},  # each column pays for its own calls
                )
                columns.append(Column(label, settings))
            run = EvalRun(dataset, columns)
            started = time.perf_counter()
            asyncio.run(run.execute())
            elapsed = time.perf_counter() - started
    return run, elapsed, len(world.references)


def main() -> None:
    args = parse_args()
    knobs = Knobs(
        pairwise_accuracy=args.pairwise_accuracy, first_position_bias=args.first_position_bias,
        pointwise_noise=args.pointwise_noise, pointwise_calibration=args.pointwise_calibration,
        prior_accuracy=args.prior_accuracy, seed=args.seed,
    )  # fmt: skip
    variants = {label: agent for label, agent in VARIANTS.items() if not args.only or label in args.only}
    run, elapsed, references = simulate(knobs, variants, seed=args.seed, places_per_country=args.places_per_country)
    report = write_outputs(run, args.out / "simulation")
    text = render(report, knobs, args, elapsed, len(run.items), references)
    (args.out / "simulation.md").write_text(text)
    print(text)


def render(report: dict, knobs: Knobs, args: argparse.Namespace, elapsed: float, queries: int, references: int) -> str:
    labels = list(report["columns"])
    lines = [
        "SIMULATION: a stand-in VLM over a synthetic world, not a real model.",
        "",
        f"World: {queries} query photos, {references} reference photos (8 countries x {args.places_per_country} places,",
        "each with a look-alike decoy 20-80 km away), tiny random-weight CLIP, top-k 10.",
        "Knobs: " + ", ".join(f"{k}={v}" for k, v in asdict(knobs).items() if k != "reasoning_error_km")
        + f", reasoning_error_km={knobs.reasoning_error_km}.",
        f"Produced by `.venv/bin/python benchmarks/simulate.py` in {elapsed:.0f} s.",
        "",
        "| variant | " + " | ".join(ROWS) + " |",
        "| --- |" + " ---: |" * len(ROWS),
    ]
    for label in labels:
        m = report["columns"][label]["metrics"]
        calls = (m["vlm_calls"] / m["n"]) if m["n"] else 0
        values = [m.get(r) for r in ROWS[:-1]] + [round(calls, 1)]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:g}" for v in values) + " |")
    return "\n".join(lines) + "\n\nFull per-column metrics: benchmarks/results/simulation/report.md\n"


if __name__ == "__main__":
    main()
