"""Near-duplicate similarities for an index and its CLIP: is the calibrated threshold right for your model?

    .venv/bin/python benchmarks/near_duplicates.py INDEX [--config geoagent.toml] [--sample 256] [--json]
    .venv/bin/python benchmarks/near_duplicates.py --world      # the stand-in world, tiny random-weight CLIP

For a sample of the index's own photos it embeds copies (re-encoded at JPEG quality 60; also halved in size;
also cropped by 5% a side) and finds each photo's most similar reference taken more than 1 km away, then
prints both distributions, the threshold they give (geoagent/retrieval/duplicates.py says how) and how many
of each lie above it: every copy should, no different photo should. ``index build`` does the same on 64
photos; a bigger ``--sample`` checks that its threshold holds. The embedder comes from the configuration
(``[retrieval]``), as for ``locate``, and must be the one the index was built with.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from geoagent.config import RetrievalConfig, load_config  # noqa: E402
from geoagent.retrieval.duplicates import CALIBRATION_SAMPLE, NearDuplicateCalibration, calibrate  # noqa: E402
from geoagent.retrieval.embedder import Embedder  # noqa: E402
from geoagent.retrieval.index import ReferenceIndex, build_index  # noqa: E402

TINY_CLIP = ROOT / "tests" / "data" / "tiny-clip.json"
PERCENTILES = (0, 5, 50, 95, 100)


def measure(index_dir: Path, retrieval: RetrievalConfig, sample: int) -> tuple[NearDuplicateCalibration, float | None]:
    """(this run's measurement, the threshold stored at build time)."""
    index = ReferenceIndex.open(index_dir)
    embedder = Embedder.load(retrieval)
    index.check_embedder(embedder.spec)
    table = index.table
    measured = calibrate(table.vectors, table.lat, table.lon, lambda row: index.entries[row].path, embedder, sample=sample)
    stored = index.manifest.near_duplicates
    return measured, stored.threshold if stored else None


def report(measured: NearDuplicateCalibration, stored: float | None) -> dict[str, object]:
    threshold = measured.threshold
    rows: dict[str, object] = {}
    for name, values in [*measured.copies.items(), (f"different photo > {measured.distinct_km:g} km", measured.distinct)]:
        found = np.asarray(values, dtype=np.float64)
        rows[name] = {
            "n": len(found),
            **{f"p{p}": round(float(np.percentile(found, p)), 6) for p in PERCENTILES if len(found)},
            "above_threshold": int((found >= threshold).sum()) if threshold is not None else None,
        }
    return {
        "sampled": measured.sampled,
        "threshold": threshold,
        "distinct_bound": measured.distinct_bound,
        "separated": measured.separated,
        "stored_threshold": stored,
        "similarities": rows,
    }


def print_table(summary: dict[str, object]) -> None:
    print(f"{'':28} {'n':>4} " + " ".join(f"{'p' + str(p):>8}" for p in PERCENTILES) + f" {'>= threshold':>13}")
    for name, row in summary["similarities"].items():  # type: ignore[attr-defined]
        cells = " ".join(f"{row.get('p' + str(p), float('nan')):>8.5f}" for p in PERCENTILES)
        print(f"{name:28} {row['n']:>4} {cells} {row['above_threshold'] if row['above_threshold'] is not None else '-':>13}")
    print(
        f"threshold {summary['threshold']} (different photos plausibly up to {summary['distinct_bound']}; copies told apart: "
        f"{', '.join(summary['separated']) or 'none'}); stored at build time: {summary['stored_threshold']}"  # type: ignore[arg-type]
    )


def world_index(scratch: Path) -> tuple[Path, RetrievalConfig]:
    """The stand-in world (96 references: 48 places and a look-alike decoy 20-80 km from each), indexed."""
    from standin.world import build_world

    world = build_world(scratch / "world", places_per_country=6)
    retrieval = RetrievalConfig(clip_model=str(TINY_CLIP), clip_pretrained="none")
    build_index(world.references_csv, scratch / "index", Embedder.load(retrieval))
    return scratch / "index", retrieval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index", nargs="?", type=Path, help="an index folder")
    parser.add_argument("--config", type=Path, help="the configuration naming the embedder (default ./geoagent.toml)")
    parser.add_argument("--sample", type=int, default=CALIBRATION_SAMPLE, help=f"photos copied (default {CALIBRATION_SAMPLE})")
    parser.add_argument("--world", action="store_true", help="measure the stand-in world with the tiny random-weight CLIP")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    if (args.index is None) == (not args.world):
        parser.error("give an INDEX or --world")
    with tempfile.TemporaryDirectory() as scratch:
        index_dir, retrieval = world_index(Path(scratch)) if args.world else (args.index, load_config(args.config).retrieval)
        summary = report(*measure(index_dir, retrieval, args.sample))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table(summary)


if __name__ == "__main__":
    main()
