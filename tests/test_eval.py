"""geoagent eval: metrics as the field defines them, datasets, side-by-side reports, prompt iteration, interrupts."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import run_cli, start_cli, write_world_config
from geoagent.eval.datasets import load_dataset
from geoagent.eval.metrics import Prediction, accuracy_at, geoscore, summarise
from geoagent.geo import haversine_km
from standin import StandinConfig, WorldJudge

PROMPT_HASH_HEX = 12  # geoagent/prompts.py keeps the first 12 hex digits of the sha256


def content_hashes(folder) -> dict[str, str]:
    """What a report must name for ``folder``: sha256 of each template's text, computed here independently."""
    return {
        path.stem: hashlib.sha256(path.read_text(encoding="utf-8").encode("utf-8")).hexdigest()[:PROMPT_HASH_HEX]
        for path in sorted(folder.glob("*.txt"))
    }


def differing(first: dict[str, str], second: dict[str, str]) -> set[str]:
    return {name for name in first.keys() | second.keys() if first.get(name) != second.get(name)}


def test_great_circle_distance_uses_r_6371():
    assert haversine_km(48.8566, 2.3522, 51.5074, -0.1278) == pytest.approx(343.5, abs=0.5)
    assert haversine_km(0, 0, 0, 180) == pytest.approx(math.pi * 6371, rel=1e-9)


def test_accuracy_is_strictly_less_than_and_failures_miss():
    errors = [0.5, 25.0, 24.99, math.inf]
    assert accuracy_at(errors, 25) == 0.5
    assert accuracy_at(errors, 1) == 0.25


def test_geoscore_formula():
    assert geoscore([0.0]) == pytest.approx(5000)
    assert geoscore([1492.7]) == pytest.approx(5000 / math.e)


def test_summary_counts_failures_and_retrieval_recall():
    rows = [
        Prediction(path="a", true_lat=0, true_lon=0, true_ref="r1", pred_lat=0, pred_lon=0, error_km=0.0,
                   retrieval_ranking=["r2", "r1"], final_ranking=["r1", "r2"], true_country="FR", pred_country="FR"),
        Prediction(path="b", true_lat=0, true_lon=0, true_ref="r3", true_country="FR", error="broken"),
    ]
    metrics = summarise(rows)
    assert metrics["failures"] == 1 and metrics["acc@1km"] == 0.5
    assert metrics["top1_before"] == 0.0 and metrics["top1_after"] == 0.5 and metrics["retrieval_recall@5"] == 0.5
    assert metrics["country_acc"] == 0.5


def test_im2gps_style_metadata_needs_the_image_folder(tmp_path):
    meta = tmp_path / "im2gps3k_places365.csv"
    meta.write_text("IMG_ID,AUTHOR,LAT,LON\n1.jpg,x,48.85,2.35\n2.jpg,y,north,2\n")
    with pytest.raises(Exception, match="needs the image folder: --images DIR"):
        load_dataset(meta)
    data = load_dataset(meta, tmp_path / "imgs")
    assert [i.path for i in data.items] == [tmp_path / "imgs" / "1.jpg"] and data.skipped == [("2.jpg", "invalid LAT/LON")]


def test_vigor_layout_names_each_query_true_tile(tmp_path):
    from geoagent.retrieval.index import read_source

    (tmp_path / "splits" / "Chicago").mkdir(parents=True)
    (tmp_path / "Chicago" / "satellite").mkdir(parents=True)
    (tmp_path / "Chicago" / "satellite" / "satellite_41.88_-87.63.png").write_bytes(b"")
    (tmp_path / "splits" / "Chicago" / "same_area_balanced_test.txt").write_text(
        "abc,41.8801,-87.6301,.jpg satellite_41.88_-87.63.png 1.0 2.0 satellite_41.89_-87.62.png 0 0\n"
    )
    data = load_dataset(tmp_path)
    assert data.items[0].ref == "Chicago/satellite/satellite_41.88_-87.63.png"
    assert (data.items[0].lat, data.items[0].lon) == (41.8801, -87.6301)
    assert [item.id for item in read_source(tmp_path)] == ["Chicago/satellite/satellite_41.88_-87.63.png"]


def test_two_configs_side_by_side_and_the_csv_agrees_with_the_report(standin, world, tmp_path):
    from geoagent.prompts import DEFAULT_PROMPTS_DIR

    server = standin(judge=WorldJudge(world.truth))
    retrieval_only = write_world_config(tmp_path / "retrieval.toml", world, server, tmp_path / "cache", strategy="none")
    agent = write_world_config(tmp_path / "agent.toml", world, server, tmp_path / "cache", strategy="tournament", reasoning=False)
    proc = run_cli("eval", str(world.queries_csv), "--config", str(retrieval_only), "--config", f"vlm={agent}",
                        "--limit", "16", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(report["columns"]) == ["retrieval", "vlm"] and report["partial"] is False
    with (tmp_path / "out" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert set(rows[0]) == {"config", "path", "true_lat", "true_lon", "pred_lat", "pred_lon", "error_km", "country_true", "country_pred", "vlm_calls",
                            "confidence", "abstained"}
    for label, column in report["columns"].items():
        mine = [r for r in rows if r["config"] == label]
        assert len(mine) == 16
        recomputed = sum(r["error_km"] != "" and float(r["error_km"]) < 25 for r in mine) / len(mine)
        assert column["metrics"]["acc@25km"] == pytest.approx(recomputed, abs=1e-4)
        assert set(column["prompts"]) >= {"pairwise", "prior", "reasoning"}
        assert column["prompts"] == content_hashes(DEFAULT_PROMPTS_DIR)  # neither column names a prompts folder
    assert report["columns"]["vlm"]["metrics"]["top1_after"] > report["columns"]["retrieval"]["metrics"]["top1_after"]
    vlm = report["columns"]["vlm"]  # every metric carries its 95% interval; the second column its paired difference
    low, high = vlm["intervals"]["acc@25km"]
    assert low <= vlm["metrics"]["acc@25km"] <= high
    assert vlm["versus"]["baseline"] == "retrieval" and "top1_after" in vlm["versus"]["differences"]
    assert report["columns"]["retrieval"]["versus"] is None
    assert "Against retrieval" in proc.stdout
    assert "| acc@25km |" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "acc@25km" in proc.stdout


def test_editing_the_pairwise_prompt_re_sends_only_pairwise_requests(standin, world, tmp_path):
    from geoagent.prompts import DEFAULT_PROMPTS_DIR

    server = standin(judge=WorldJudge(world.truth))
    prompts = tmp_path / "my-prompts"
    shutil.copytree(DEFAULT_PROMPTS_DIR, prompts)
    config = write_world_config(tmp_path / "c.toml", world, server, tmp_path / "cache", strategy="tournament", country_prior=True, reasoning=True)
    args = ("eval", str(world.queries_csv), "--config", str(config), "--prompts", str(prompts), "--limit", "6")
    assert run_cli(*args, cwd=tmp_path).returncode == 0
    server.reset_log()
    (prompts / "pairwise.txt").write_text((prompts / "pairwise.txt").read_text().replace("Which candidate", "Which one of the candidates"))
    proc = run_cli(*args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert server.chat_requests() and {r.schema_name for r in server.chat_requests()} == {"PairwiseAnswer"}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    reported = list(report["columns"].values())[0]["prompts"]
    assert reported == content_hashes(prompts)
    assert differing(reported, content_hashes(DEFAULT_PROMPTS_DIR)) == {"pairwise"}  # the copy differs by the edit only


def test_ctrl_c_writes_a_partial_report_and_a_rerun_resumes_from_the_cache(standin, world, tmp_path):
    server = standin(judge=WorldJudge(world.truth), config=StandinConfig(latency_s=0.15))
    config = write_world_config(tmp_path / "c.toml", world, server, tmp_path / "cache", strategy="tournament", reasoning=False, max_concurrent_photos=1)
    # A foreground command, as a user's Ctrl-C finds it: SIGINT not ignored (a shell's background jobs have it ignored).
    proc = start_cli("eval", str(world.queries_csv), "--config", str(config), "--out", str(tmp_path / "out"), cwd=tmp_path,
                     stdout=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while len([r for r in server.chat_requests() if r.status == 200]) < 40 and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    done = report["columns"]["c"]["metrics"]["n"]
    assert report["partial"] is True and 0 < done < len(world.queries)
    server.reset_log()
    rerun = run_cli("eval", str(world.queries_csv), "--config", str(config), "--limit", str(done), "--out", str(tmp_path / "again"), cwd=tmp_path)
    assert rerun.returncode == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())["columns"]["c"]["metrics"]
    assert again["vlm_calls"] == 0 and again["cache_hits"] > 0


def listed_hashes(stdout: str) -> dict[str, str]:
    """``geoagent prompts list`` lines ``  name   digest`` (the heading, which may wrap, matches none)."""
    return dict(re.findall(rf"^ +(\w+) +([0-9a-f]{{{PROMPT_HASH_HEX}}})$", stdout, flags=re.MULTILINE))


def test_prompts_list_shows_each_template_content_hash(tmp_path):
    """The listed digests are the templates' content hashes; editing one template changes its digest only."""
    from geoagent.prompts import DEFAULT_PROMPTS_DIR

    proc = run_cli("prompts", "list", cwd=tmp_path)
    assert proc.returncode == 0
    assert all(name in proc.stdout for name in ("pairwise", "pointwise", "prior", "reasoning", "pairwise_cross"))
    assert listed_hashes(proc.stdout) == content_hashes(DEFAULT_PROMPTS_DIR)

    edited = tmp_path / "edited"
    shutil.copytree(DEFAULT_PROMPTS_DIR, edited)
    (edited / "prior.txt").write_text((edited / "prior.txt").read_text() + "\nAnswer in JSON only.\n")
    proc = run_cli("prompts", "list", "--prompts", str(edited), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert listed_hashes(proc.stdout) == content_hashes(edited)
    assert differing(listed_hashes(proc.stdout), content_hashes(DEFAULT_PROMPTS_DIR)) == {"prior"}


def _refuse_constant(name: str) -> None:
    raise ValueError(f"not strict JSON: {name}")


def test_a_failed_photo_leaves_strict_json_and_bad_rows_are_named(standin, world, tmp_path):
    """Issue 18 minor points: with a photo that fails, report.json is strict JSON (an infinite median is null, never a
    bare Infinity); a missing photo is named on stderr (and counted as failed); a row with an empty path is skipped
    and named, never read as the CSV's own folder."""
    server = standin(judge=WorldJudge(world.truth))
    config = write_world_config(tmp_path / "c.toml", world, server, tmp_path / "cache", strategy="none")
    good = world.queries[0]
    dataset = tmp_path / "set.csv"
    dataset.write_text(f"path,lat,lon\n{good.path},{good.lat},{good.lon}\ngone.jpg,1,2\n,3,4\n")
    proc = run_cli("eval", str(dataset), "--config", str(config), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"missing {tmp_path / 'gone.jpg'}: no such file" in proc.stderr
    assert "skipped set.csv line 4: no path in this row" in proc.stderr
    with (tmp_path / "out" / "report.json").open() as fh:
        report = json.load(fh, parse_constant=_refuse_constant)
    column = next(iter(report["columns"].values()))
    assert report["photos"] == 2 and column["answered"] == 1 and [f["path"] for f in column["failures"]] == [str(tmp_path / "gone.jpg")]
    assert column["metrics"]["failures"] == 1
    assert any(value is None for value in column["metrics"].values())  # an infinite median or mean is null
