"""Does `geoagent batch` hold its memory flat whatever the input size?

    .venv/bin/python benchmarks/batch_memory.py            # 1,000 and 10,000 inputs; writes benchmarks/results/batch_memory.md
    .venv/bin/python benchmarks/batch_memory.py 500 5000   # other sizes

A synthetic world (tests/standin/world.py: 48 query photos, 96 references, the tiny random-weight CLIP) and a
folder of N symlinks to its queries, located with `--strategy none` (retrieval only: cheap photos, so the
run is about the batch machinery, not the VLM). Each run is a fresh `geoagent batch` process: its peak RSS is
what the kernel reports for it (``os.wait4``, ``ru_maxrss``; it is reached while the models load), and its RSS
is sampled as the journal passes 10%, 50% and 90% of the photos, so any growth with the photos done shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SIZES = (1000, 10_000)
SAMPLE_S = 0.05
MILESTONES = (0.1, 0.5, 0.9)  # the RSS is noted as the journal passes these shares of the photos
TINY_CLIP = ROOT / "tests" / "data" / "tiny-clip.json"
RESULTS = ROOT / "benchmarks" / "results" / "batch_memory.md"


def rss_mib(pid: int) -> float | None:
    """The process's resident set now (Linux /proc), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def measure(folder: Path, count: int, config: Path, out: Path) -> dict[str, float]:
    """Run one batch over ``folder`` and report wall time, peak RSS and the RSS growth after the start."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "geoagent", "batch", str(folder), "--out", str(out), "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    noted: dict[float, float] = {}
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # not proc.poll(): wait4 also gives the child's rusage
        if pid:
            break
        done = lines_in(out) / count
        for share in MILESTONES:
            if share not in noted and done >= share and (rss := rss_mib(proc.pid)) is not None:
                noted[share] = rss
        time.sleep(SAMPLE_S)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0 or lines_in(out) != count:
        raise SystemExit(f"batch over {count} inputs failed: {proc.stderr.read().decode()[-2000:]}")
    return {"wall_s": wall, "peak_mib": usage.ru_maxrss / 1024, **{f"rss_{share:.0%}": noted.get(share, float("nan")) for share in MILESTONES}}


def main(sizes: tuple[int, ...]) -> None:
    from geoagent.config import RetrievalConfig
    from geoagent.retrieval.embedder import Embedder
    from geoagent.retrieval.index import build_index
    from standin.world import build_world

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        world = build_world(root / "world", places_per_country=6)
        build_index(world.references_csv, root / "index", Embedder.load(RetrievalConfig(clip_model=str(TINY_CLIP), clip_pretrained="none")))
        config = root / "g.toml"
        config.write_text(
            f'[retrieval]\nclip_model = "{TINY_CLIP}"\nclip_pretrained = "none"\nindex = "{root / "index"}"\n[agent]\nstrategy = "none"\n'
        )
        rows = []
        for count in sizes:
            folder = root / f"links-{count}"
            folder.mkdir()
            for i in range(count):
                (folder / f"{i:06d}.jpg").symlink_to(world.queries[i % len(world.queries)].path)
            figures = measure(folder, count, config, root / f"{count}.jsonl")
            rows.append((count, figures))
            print(count, figures, flush=True)

    lines = [
        "# geoagent batch: memory against input size",
        "",
        "Produced by `.venv/bin/python benchmarks/batch_memory.py` on this machine (2 CPU cores, no GPU): a folder of",
        "N symlinks to the test world's 48 query photos, `--strategy none`, tiny random-weight CLIP, one process per run.",
        "",
        "| inputs | wall (s) | photos/s | peak RSS (MiB) | RSS at 10% done | at 50% | at 90% |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for count, f in rows:
        at = " | ".join(f"{f[f'rss_{share:.0%}']:.0f}" for share in MILESTONES)
        lines.append(f"| {count:,} | {f['wall_s']:.1f} | {count / f['wall_s']:.0f} | {f['peak_mib']:.0f} | {at} |")
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(tuple(int(a) for a in sys.argv[1:]) or SIZES)
