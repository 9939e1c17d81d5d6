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
import contextlib
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
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
    "allpairs, adaptive": {"strategy": "allpairs", **ADAPTIVE, **NO_VLM_EXTRAS},
    "allpairs, one order": {"strategy": "allpairs", **ONE_ORDER, **NO_VLM_EXTRAS},
    "tournament, both orders": {"strategy": "tournament", **BOTH_ORDERS, **NO_VLM_EXTRAS},
    "tournament, adaptive (default)": {"strategy": "tournament", **ADAPTIVE, **NO_VLM_EXTRAS},
    "tournament, one order": {"strategy": "tournament", **ONE_ORDER, **NO_VLM_EXTRAS},
    "sorting, both orders": {"strategy": "sorting", **BOTH_ORDERS, **NO_VLM_EXTRAS},
    "sorting, adaptive": {"strategy": "sorting", **ADAPTIVE, **NO_VLM_EXTRAS},
    "sorting, one order": {"strategy": "sorting", **ONE_ORDER, **NO_VLM_EXTRAS},
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
    parser.add_argument("--near-equal-km", type=float, default=defaults.near_equal_km)
    parser.add_argument("--distance-sharpness", type=float, default=defaults.distance_sharpness)
    parser.add_argument("--shared-belief", type=float, default=defaults.shared_belief)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="run only these variants (labels)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="simulation", help="writes OUT/NAME.md and OUT/NAME/")
    return parser.parse_args()


def ollama_profile(server: StandinServer) -> dict[str, object]:
    """The backend profile the simulations use unless told otherwise: the stand-in as Ollama serving llava:7b."""
    return {"kind": "ollama", "model": "llava:7b", "base_url": server.url, "max_concurrency": 32, "timeout_s": 30}


def simulate(
    knobs: Knobs,
    variants: dict[str, dict[str, object]],
    *,
    seed: int,
    places_per_country: int,
    profile: Callable[[StandinServer], dict[str, object]] = ollama_profile,
    config: StandinConfig | None = None,
    server_per_column: bool = False,
) -> tuple[EvalRun, float, int]:
    """Build the world for ``seed``, run one eval column per variant against a stand-in with ``knobs``.

    ``profile`` makes the backend profile for a started stand-in, ``config`` configures the stand-in. With
    ``server_per_column`` every column gets its own stand-in, so no column reads another's prefix cache.
    Returns the finished run, its wall time and the number of reference photos.
    """
    config = config or StandinConfig(capacity=64)
    with tempfile.TemporaryDirectory(prefix="geoagent-sim-") as scratch, contextlib.ExitStack() as servers:
        work = Path(scratch)
        world = build_world(work / "world", places_per_country=places_per_country, seed=seed)
        retrieval = {"clip_model": str(TINY_CLIP), "clip_pretrained": "none", "index": str(work / "index")}
        build_index(world.references_csv, work / "index", Embedder.load(Settings(retrieval=retrieval).retrieval))
        dataset = load_dataset(world.queries_csv)
        judge = WorldJudge(world.truth, knobs)
        server = servers.enter_context(StandinServer(judge, config))
        columns = []
        for label, agent in variants.items():
            if server_per_column and columns:
                server = servers.enter_context(StandinServer(judge, config))
            settings = Settings(
                backends={"sim": profile(server)}, tasks={"default": "sim"}, retrieval=retrieval, agent=agent,
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
        prior_accuracy=args.prior_accuracy, near_equal_km=args.near_equal_km,
        distance_sharpness=args.distance_sharpness, shared_belief=args.shared_belief, seed=args.seed,
    )  # fmt: skip
    variants = {label: agent for label, agent in VARIANTS.items() if not args.only or label in args.only}
    run, elapsed, references = simulate(knobs, variants, seed=args.seed, places_per_country=args.places_per_country)
    report = write_outputs(run, args.out / args.name)
    text = render(report, knobs, args, elapsed, len(run.items), references) + comparisons(run)
    (args.out / f"{args.name}.md").write_text(text)
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
        f"Produced by `.venv/bin/python benchmarks/simulate.py{''.join(' ' + shlex.quote(a) for a in sys.argv[1:])}` in {elapsed:.0f} s.",
        "",
        "| variant | " + " | ".join(ROWS) + " |",
        "| --- |" + " ---: |" * len(ROWS),
    ]
    for label in labels:
        column = report["columns"][label]
        m = column["metrics"]
        calls = (m["vlm_calls"] / m["n"]) if m["n"] else 0
        cells = [_with_interval(m.get(r), column["intervals"].get(r), r != "median_km") for r in ROWS[:-1]] + [f"{calls:.1f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Accuracies are shown with their 95% bootstrap interval over the query photos (2,000 resamples, seed 0)."]
    return "\n".join(lines) + f"\n\nFull per-column metrics: benchmarks/results/{args.name}/report.md\n"


def _with_interval(value: float | None, interval: list[float | None] | None, show: bool) -> str:
    if value is None:
        return "-"
    if not show or not interval or interval[0] is None or interval[1] is None:
        return f"{value:g}"
    return f"{value:.3f} [{interval[0]:.2f}, {interval[1]:.2f}]"


#: The claims the docs make from this table, each checked as a paired difference on the same photos.
CLAIMS = [
    ("allpairs", "allpairs, Copeland"), ("tournament, adaptive (default)", "tournament, both orders"),
    ("tournament, adaptive (default)", "tournament, one order"), ("sorting, adaptive", "sorting, both orders"),
    ("sorting, adaptive", "sorting, one order"), ("allpairs, adaptive", "allpairs"), ("allpairs, adaptive", "allpairs, one order"),
    ("tournament, adaptive (default)", "allpairs"), ("tournament, adaptive (default)", "sorting, both orders"),
    ("pointwise", "retrieval only"),
    ("tournament, adaptive (default)", "retrieval only"),
]  # fmt: skip


def comparisons(run: EvalRun) -> str:
    """Top-1 after reranking, one variant minus another on the same photos: the difference, its 95% interval and
    McNemar's exact p; "not significant" where the interval contains 0."""
    from geoagent.eval.stats import paired

    lines = ["", "Paired comparisons of top1_after (same photos, 95% bootstrap interval, McNemar's exact test):", "",
             "| comparison | difference | 95% interval | p | verdict |", "| --- | ---: | --- | ---: | --- |"]  # fmt: skip
    for first, second in CLAIMS:
        if first not in run.predictions or second not in run.predictions:
            continue
        d = next((d for d in paired(run.predictions[second], run.predictions[first]) if d.metric == "top1_after"), None)
        if d is None or d.difference is None:
            continue
        verdict = "significant" if d.significant else "not significant"
        lines.append(f"| {first} − {second} | {d.difference:+.4f} | [{d.low:+.3f}, {d.high:+.3f}] | {d.p_value:.3g} | {verdict} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
