"""Smoke test of an installed wheel, as a new user meets it. Run by .ci/run with the fresh venv's python, from an
empty folder outside the repository, so only the installed package can be imported.

1. `geoagent prompts list` finds the templates inside the installed package.
2. A retrieval-only `locate` over a tiny index built here from generated geotagged photos (random-weight CLIP).
3. A `locate` that renders every bundled prompt and asks the stand-in VLM (tests/standin, over real HTTP).
4. The plain install stays lean, and the missing extras say how to get them: a litellm profile stops with
   `pip install 'geoagent-vlm[hosted]'` (exit 2), `eval --out` writes its report without accuracy.png.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GEOAGENT = str(Path(sys.executable).parent / "geoagent")
WORK = Path.cwd()
TINY_CLIP = WORK / "tiny-clip.json"
#: Three places, three geotagged photos each.
PLACES = {"paris": (48.8566, 2.3522), "newyork": (40.7128, -74.0060), "tokyo": (35.6762, 139.6503)}


def cli(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    """The installed console script, as a user types it; stops the smoke on an unexpected exit code."""
    proc = subprocess.run([GEOAGENT, *args], cwd=WORK, capture_output=True, text=True, timeout=600)
    print(f"$ geoagent {' '.join(args)}  -> exit {proc.returncode}", flush=True)
    if proc.returncode != expect or "Traceback" in proc.stderr:
        sys.exit(f"smoke failed: expected exit {expect}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def check(condition: bool, message: str) -> None:
    if not condition:
        sys.exit(f"smoke failed: {message}")


def retrieval_config(index: Path) -> str:
    return f'[retrieval]\nclip_model = "{TINY_CLIP}"\nclip_pretrained = "none"\nindex = "{index}"\n[cache]\ndir = "{WORK / "cache"}"\n'


def installed_package() -> None:
    import geoagent

    location = Path(geoagent.__file__).resolve()
    check(not location.is_relative_to(REPO), f"geoagent imported from the source tree: {location}")
    listing = cli("prompts", "list").stdout.splitlines()
    check(str(location.parent) in listing[0], f"prompts not from the installed package: {listing[0]}")
    shipped = sorted(path.stem for path in (REPO / "geoagent" / "prompts" / "templates").glob("*.txt"))
    listed = sorted(line.split()[0] for line in listing[1:])
    check(listed == shipped, f"the wheel should list every template of the source tree {shipped}: {listing}")


def retrieval_only() -> None:
    from geoagent.eval.synthetic import save_with_gps, scene

    for p, (name, (lat, lon)) in enumerate(PLACES.items()):
        for k in range(3):
            save_with_gps(scene(10 * p + k, palette_seed=p), WORK / "photos" / f"{name}-{k}.jpg", lat + 0.01 * k, lon)
    (WORK / "geoagent.toml").write_text(retrieval_config(WORK / "index"))
    cli("index", "build", "photos", "--out", "index")
    result = json.loads(cli("locate", "photos/tokyo-1.jpg", "--strategy", "none", "--json").stdout)
    top = result["candidates"][0]
    check(top["id"].endswith("tokyo-1.jpg") and top["source"] == "index", f"an indexed photo should find itself: {top}")
    check(abs(result["lat"] - 35.6862) < 1e-3 and result["stats"]["vlm_calls"] == 0, f"wrong answer: {result}")
    cli("locate", "photos/tokyo-1.jpg", "--strategy", "none", "--map", "map.html")  # the wheel's vendored Leaflet
    page = (WORK / "map.html").read_text()
    check("Leaflet" in page and "GeoAgentMap" in page and "url(data:image/png;base64," in page, "the map lacks its inlined files")


def renders_the_bundled_prompts() -> None:
    sys.path.insert(0, str(REPO / "tests"))  # the stand-in VLM only; geoagent itself still comes from the venv
    from standin import StandinServer, WorldJudge
    from standin.world import build_world

    world = build_world(WORK / "world", places_per_country=2, countries=3)
    cli("index", "build", str(world.references_csv), "--out", "world-index")
    with StandinServer(WorldJudge(world.truth)) as server:
        config = WORK / "vlm.toml"
        config.write_text(
            f'[backends.sim]\nkind = "ollama"\nmodel = "llava:7b"\nbase_url = "{server.url}"\n[tasks]\ndefault = "sim"\n'
            f"[agent]\nstrategy = \"tournament\"\ncountry_prior = true\nreasoning = true\n{retrieval_config(WORK / 'world-index')}"
        )
        result = json.loads(cli("locate", str(world.queries[0].path), "--config", str(config), "--json").stdout)
        asked = {r.schema_name for r in server.chat_requests()}
    check(result["stats"]["vlm_calls"] > 0 and {"PairwiseAnswer", "PriorAnswer", "ReasoningAnswer"} <= asked, f"asked {asked}")


def missing_extras_say_how_to_get_them() -> None:
    lean = [name for name in ("litellm", "matplotlib", "pillow_heif", "starlette", "peft") if importlib.util.find_spec(name)]
    check(not lean, f"a plain install pulled in optional packages: {lean}")
    hosted = WORK / "hosted.toml"
    hosted.write_text(
        '[backends.claude]\nkind = "litellm"\nmodel = "anthropic/claude-sonnet-4-5"\n[tasks]\ndefault = "claude"\n'
        + retrieval_config(WORK / "index")
    )
    proc = cli("locate", "photos/paris-0.jpg", "--config", str(hosted), expect=2)
    check("pip install 'geoagent-vlm[hosted]'" in proc.stderr, f"no install hint: {proc.stderr}")
    labelled = WORK / "labelled.csv"
    labelled.write_text("path,lat,lon\n" + "".join(f"photos/{n}-0.jpg,{lat},{lon}\n" for n, (lat, lon) in PLACES.items()))
    retrieval_only_config = WORK / "retrieval-only.toml"
    retrieval_only_config.write_text(retrieval_config(WORK / "index") + '[agent]\nstrategy = "none"\n')
    proc = cli("eval", str(labelled), "--config", str(retrieval_only_config), "--out", "report")
    written = sorted(p.name for p in (WORK / "report").iterdir())
    check(written == ["predictions.csv", "report.json", "report.md"], f"eval wrote {written}")
    check("pip install 'geoagent-vlm[plot]'" in proc.stderr, f"no install hint: {proc.stderr}")
    proc = cli("serve", "--config", str(retrieval_only_config), expect=2)
    check("pip install 'geoagent-vlm[web]'" in proc.stderr, f"no install hint: {proc.stderr}")


def main() -> None:
    shutil.copy(REPO / "tests" / "data" / "tiny-clip.json", TINY_CLIP)
    installed_package()
    retrieval_only()
    renders_the_bundled_prompts()
    missing_extras_say_how_to_get_them()
    print("smoke: the installed wheel works", flush=True)


if __name__ == "__main__":
    main()
