"""What a photo costs: full-price input tokens per photo for each reranking strategy, against its Top-1.

SIMULATION: the stand-in VLM over the synthetic worlds of benchmarks/simulate.py, not a real model. One run,
three seeded worlds, every column against the stand-in speaking OpenAI's protocol (so it reports
``usage.prompt_tokens_details.cached_tokens`` for repeated prompt prefixes of >= 1,024 tokens, as OpenAI does)
under a model name priced in litellm's bundled table with a cached-input rate (gpt-4o-mini), at two VLM skill
settings of the stand-in's honest error model:

- a good VLM: pairwise accuracy ceiling 0.95, 5% first-position bias;
- a weaker one: ceiling 0.85, 10% first-position bias.

Each column gets its own stand-in (its own prefix cache: a photo's first question pays full price, as for a
deployment running that one strategy). Pooled over the three worlds, per column: Top-1 with its 95% bootstrap
interval, questions, input / cached / full-price (input - cached) tokens and US dollars per photo, and the
paired Top-1 difference to the adaptive tournament (same photos) with its 95% interval. Then issue #20's
must-show, mechanically: the cheapest column (full-price input tokens per photo) whose paired interval's lower
bound is >= -0.02 (good VLM) / -0.03 (weaker VLM), and whether it costs <= 50% of the tournament's.

    nice .venv/bin/python benchmarks/cost.py       # writes benchmarks/results/cost.md and cost.png
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulate import ADAPTIVE, BOTH_ORDERS, NO_VLM_EXTRAS, ONE_ORDER, ROOT, simulate  # noqa: E402
from standin import Knobs, StandinConfig, StandinServer  # noqa: E402

from geoagent.eval.metrics import Prediction, summarise  # noqa: E402
from geoagent.eval.stats import intervals, paired  # noqa: E402
from geoagent.vlm.context import openai_image_tokens  # noqa: E402
from geoagent.vlm.pricing import Price, table_price  # noqa: E402

TOP_K = 10
#: Priced in litellm's table with a cached-input rate (checked at start).
MODEL = "gpt-4o-mini"
#: GPT-4o mini's image cost at high detail (OpenAI's pricing page): 2,833 tokens plus 5,667 per 512-px tile.
MINI_BASE, MINI_TILE = 2833, 5667
#: label -> (pairwise accuracy ceiling, first-position bias, allowed Top-1 loss against the reference).
VLMS = {"good VLM (0.95, 5% bias)": (0.95, 0.05, 0.02), "weaker VLM (0.85, 10% bias)": (0.85, 0.10, 0.03)}
REFERENCE = "tournament, adaptive"
SMALL_SIDE = 128
COLUMNS: dict[str, dict[str, object]] = {
    REFERENCE: {"strategy": "tournament", **ADAPTIVE},
    "tournament, both orders": {"strategy": "tournament", **BOTH_ORDERS},
    "setwise c=3": {"strategy": "setwise", "set_size": 3, **ADAPTIVE},
    "setwise c=4": {"strategy": "setwise", "set_size": 4, **ADAPTIVE},
    "setwise c=5": {"strategy": "setwise", "set_size": 5, **ADAPTIVE},
    f"setwise c=4, candidates {SMALL_SIDE} px": {"strategy": "setwise", "set_size": 4, "candidate_image_side": SMALL_SIDE, **ADAPTIVE},
    "pointwise": {"strategy": "pointwise"},
}
#: Costlier than the reference by construction (every pair, or a sort's comparisons: 2.3x and 5.3x its full-price
#: tokens in a development run), so never the cheapest qualifier; run with --all (the default run buys photos instead).
COSTLY: dict[str, dict[str, object]] = {
    "sorting, adaptive": {"strategy": "sorting", **ADAPTIVE},
    "allpairs, adaptive": {"strategy": "allpairs", **ADAPTIVE},
}
#: Set-wise's other position-bias rules (both rotations always; one ask in seed order): ``--debias``.
DEBIAS: dict[str, dict[str, object]] = {
    "setwise c=4, both orders": {"strategy": "setwise", "set_size": 4, **BOTH_ORDERS},
    "setwise c=4, one order": {"strategy": "setwise", "set_size": 4, **ONE_ORDER},
}
#: Cheaper than the reference needs at most this share of its full-price input tokens per photo.
COST_TARGET = 0.5


def mini_image_tokens(width: int, height: int) -> int:
    return openai_image_tokens(width, height, base=MINI_BASE, tile=MINI_TILE)


def openai_profile(server: StandinServer) -> dict[str, object]:
    return {"kind": "openai", "model": MODEL, "base_url": server.openai_url, "max_concurrency": 32, "timeout_s": 30}


@dataclass
class Figures:
    """One column pooled over the worlds, at one VLM setting."""

    photos: int
    failed: int
    top1: float
    top1_low: float | None
    top1_high: float | None
    questions: float  # per photo
    input_tokens: float  # per photo, likewise below
    cached_tokens: float
    output_tokens: float
    cost_usd: float | None
    diff: float | None  # paired Top-1 difference to the reference, same photos
    diff_low: float | None
    diff_high: float | None

    @property
    def full_price_tokens(self) -> float:
        return self.input_tokens - self.cached_tokens


def figures(predictions: list[Prediction], reference: list[Prediction], is_reference: bool) -> Figures:
    n = len(predictions)
    metrics = summarise(predictions)
    interval = intervals(predictions)["top1_after"]
    diff = low = high = None
    if not is_reference:
        d = next(d for d in paired(reference, predictions) if d.metric == "top1_after")
        diff, low, high = d.difference, d.low, d.high
    return Figures(
        photos=n, failed=int(metrics["failures"] or 0), top1=float(metrics["top1_after"] or 0.0), top1_low=interval.low,
        top1_high=interval.high, questions=float(metrics["vlm_calls"] or 0) / n, input_tokens=float(metrics["input_tokens_per_photo"] or 0),
        cached_tokens=float(metrics["cached_input_tokens_per_photo"] or 0), output_tokens=float(metrics["output_tokens_per_photo"] or 0),
        cost_usd=metrics["cost_usd_per_photo"],  # type: ignore[arg-type]
        diff=diff, diff_low=low, diff_high=high,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one synthetic world per seed")
    parser.add_argument("--places-per-country", type=int, default=12, help="8 countries; each place also has a decoy")
    parser.add_argument("--only", nargs="*", help="run only these columns (the reference always runs)")
    parser.add_argument("--all", action="store_true", help="also run sorting and allpairs (costlier than the reference)")
    parser.add_argument("--debias", action="store_true", help="also run set-wise c=4 with both orders and with one order")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    price = table_price(MODEL)
    if price is None or price.cached is None:
        sys.exit(f"benchmarks/cost.py: litellm's price table has no cached-input rate for {MODEL}")
    every = {**COLUMNS, **(COSTLY if args.all else {}), **(DEBIAS if args.debias else {})}
    columns = {label: agent for label, agent in every.items() if not args.only or label in args.only or label == REFERENCE}
    variants = {label: {**agent, **NO_VLM_EXTRAS, "top_k": TOP_K} for label, agent in columns.items()}
    config = StandinConfig(models=(MODEL,), capacity=64, image_tokens=mini_image_tokens)

    started = time.perf_counter()
    pooled: dict[str, dict[str, list[Prediction]]] = {vlm: {label: [] for label in columns} for vlm in VLMS}
    knobs_seen: dict[str, Knobs] = {}
    for vlm, (accuracy, bias, _) in VLMS.items():
        for seed in args.seeds:
            knobs = knobs_seen[vlm] = Knobs(pairwise_accuracy=accuracy, first_position_bias=bias, seed=seed)
            run, _, _ = simulate(
                knobs, variants, seed=seed, places_per_country=args.places_per_country,
                profile=openai_profile, config=config, server_per_column=True,
            )  # fmt: skip
            for label in columns:  # photos named by world too: the paired comparison matches photos by path
                pooled[vlm][label] += [p.model_copy(update={"path": f"seed {seed}: {p.path}"}) for p in run.predictions.get(label, [])]
            print(f"{vlm}, seed {seed}: done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    table = {vlm: {label: figures(rows, pooled[vlm][REFERENCE], label == REFERENCE) for label, rows in by_label.items()} for vlm, by_label in pooled.items()}
    text = render(table, knobs_seen, args, elapsed, price)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cost.md").write_text(text)
    plot(table, args.out / "cost.png")
    print(text)


def _interval(low: float | None, high: float | None, signed: bool = False) -> str:
    if low is None or high is None:
        return "-"
    spec = "+.3f" if signed else ".3f"
    return f"[{low:{spec}}, {high:{spec}}]"


def render(table: dict[str, dict[str, Figures]], knobs: dict[str, Knobs], args: argparse.Namespace, elapsed: float, price: Price) -> str:
    photos = next(iter(next(iter(table.values())).values())).photos
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        "SIMULATION: a stand-in VLM over synthetic worlds, not a real model.",
        "",
        f"{len(args.seeds)} worlds (seeds {seeds}; 8 countries x {args.places_per_country} places, each with a look-alike decoy), "
        f"{photos} query photos pooled; top-k {TOP_K}, no prior, no reasoning. The stand-in speaks OpenAI's protocol as "
        f"`{MODEL}` (litellm's table: ${price.prompt * 1e6:.3f} per million input tokens, ${price.cached * 1e6:.3f} cached, "
        f"${price.completion * 1e6:.3f} output), bills each image as GPT-4o mini does at high detail ({MINI_BASE:,} + {MINI_TILE:,} "
        "per 512-px tile) and reports cached tokens for a repeated prefix of >= 1,024 tokens. Each column has its own stand-in "
        f"(its own prefix cache). Produced by `nice .venv/bin/python benchmarks/cost.py` in {elapsed:.0f} s.",
        "",
    ]
    for vlm in table:
        k = knobs[vlm]
        shown = {name: value for name, value in asdict(k).items() if name not in ("seed", "prior_accuracy", "reasoning_error_km")}
        lines.append(f"Knobs ({vlm}): " + ", ".join(f"{name}={value}" for name, value in shown.items()) + " (seed = the world's).")
    lines.append("")
    for vlm, columns in table.items():
        reference = columns[REFERENCE]
        lines += [
            f"**{vlm}**",
            "",
            "| column | Top-1 [95%] | questions / photo | input tokens / photo | cached / photo | full-price / photo | "
            "share of reference's full-price | $ / photo | Top-1 − reference [95%, paired] |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for label, f in columns.items():
            share = f.full_price_tokens / reference.full_price_tokens if reference.full_price_tokens else math.nan
            diff = "(reference)" if label == REFERENCE else f"{f.diff:+.3f} {_interval(f.diff_low, f.diff_high, signed=True)}"
            cost = f"{f.cost_usd:.5f}" if f.cost_usd is not None else "-"
            failed = f" ({f.failed} failed)" if f.failed else ""
            lines.append(
                f"| {label}{failed} | {f.top1:.3f} {_interval(f.top1_low, f.top1_high)} | {f.questions:.1f} | {f.input_tokens:,.0f} | "
                f"{f.cached_tokens:,.0f} | {f.full_price_tokens:,.0f} | {share:.0%} | {cost} | {diff} |"
            )
        lines.append("")
    lines += ["**Verdict** (issue #20's must-show):", ""] + verdicts(table) + [""]
    return "\n".join(lines)


def verdicts(table: dict[str, dict[str, Figures]]) -> list[str]:
    """Per VLM: the cheapest column whose paired Top-1 interval's lower bound clears the allowed loss, and whether
    it costs <= COST_TARGET of the reference's full-price input tokens; where none does, which come closest and why."""
    out = []
    for vlm, columns in table.items():
        tolerance = VLMS[vlm][2]
        reference = columns[REFERENCE]
        within = {label: f for label, f in columns.items() if label != REFERENCE and f.diff_low is not None and f.diff_low >= -tolerance}
        cheapest = min(within, key=lambda label: within[label].full_price_tokens, default=None)
        rule = f"paired 95% interval's lower bound >= -{tolerance}"
        if cheapest is None:
            out.append(f"- {vlm}: no column keeps Top-1 within {tolerance} of the adaptive tournament ({rule}):")
        else:
            f = within[cheapest]
            share = f.full_price_tokens / reference.full_price_tokens
            met = "MET" if share <= COST_TARGET else "NOT MET"
            out.append(
                f"- {vlm}: {met}. Cheapest column within {tolerance} ({rule}): **{cheapest}**, {f.full_price_tokens:,.0f} full-price input "
                f"tokens per photo = {share:.0%} of the adaptive tournament's {reference.full_price_tokens:,.0f} "
                f"(target <= {COST_TARGET:.0%}); Top-1 {f.diff:+.3f} {_interval(f.diff_low, f.diff_high, signed=True)}."
            )
        by_point = {label: f for label, f in columns.items() if label != REFERENCE and f.diff is not None and f.diff >= -tolerance}
        point = min(by_point, key=lambda label: by_point[label].full_price_tokens, default=None)
        if point is not None and point != cheapest:
            f = by_point[point]
            out.append(
                f"  - By the point estimate alone (Top-1 difference >= -{tolerance}) the cheapest would be {point} at "
                f"{f.full_price_tokens / reference.full_price_tokens:.0%} (Top-1 {f.diff:+.3f}), but its interval "
                f"{_interval(f.diff_low, f.diff_high, signed=True)} does not rule out a larger loss."
            )
        cheaper = sorted(
            (f.full_price_tokens, label) for label, f in columns.items()
            if label != REFERENCE and label not in within and f.full_price_tokens <= COST_TARGET * reference.full_price_tokens
        )  # fmt: skip
        for _, label in cheaper:
            f = columns[label]
            out.append(
                f"  - {label} costs {f.full_price_tokens / reference.full_price_tokens:.0%} but does not qualify: Top-1 "
                f"{f.diff:+.3f} {_interval(f.diff_low, f.diff_high, signed=True)}, lower bound below -{tolerance}."
            )
    return out


def plot(table: dict[str, dict[str, Figures]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter

    colours = {label: f"C{i}" for i, label in enumerate({**COLUMNS, **COSTLY, **DEBIAS})}  # one colour per column in both panels
    figure, axes = plt.subplots(1, len(table), figsize=(12, 5), dpi=110, sharex=True, sharey=True)
    for axis, (vlm, columns) in zip(axes, table.items()):
        points: dict[tuple[float, float], list[str]] = {}  # columns with the same figures share one marker
        for label, f in columns.items():
            points.setdefault((round(f.full_price_tokens), round(f.top1, 6)), []).append(label)
        for labels in points.values():
            f = columns[labels[0]]
            low = f.top1 - (f.top1_low if f.top1_low is not None else f.top1)
            high = (f.top1_high if f.top1_high is not None else f.top1) - f.top1
            marker = "*" if REFERENCE in labels else "s" if labels[0].startswith("setwise") else "o"
            axis.errorbar(
                [f.full_price_tokens], [f.top1], yerr=[[low], [high]], fmt=marker, color=colours[labels[0]], capsize=3,
                markersize=10 if marker == "*" else 6,
            )  # fmt: skip
            axis.annotate(" = ".join(labels), (f.full_price_tokens, f.top1), fontsize=7, xytext=(5, 3), textcoords="offset points")
        reference = columns[REFERENCE]
        axis.axvline(COST_TARGET * reference.full_price_tokens, color="0.6", linestyle="--", linewidth=0.8)
        axis.axhline(reference.top1 - VLMS[vlm][2], color="0.6", linestyle=":", linewidth=0.8)
        axis.set_xlim(left=0)
        axis.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:.0f}k"))
        axis.set_xlabel("full-price input tokens per photo (input - cached)")
        axis.set_title(vlm, fontsize=10)
        axis.grid(True, which="both", color="0.92")
    axes[0].set_ylabel("Top-1 with 95% bootstrap interval (pooled photos)")
    figure.suptitle(
        "SIMULATION: Top-1 against full-price input tokens per photo (dashed: 50% of the adaptive tournament; dotted: its Top-1 minus the allowed loss)",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    main()
