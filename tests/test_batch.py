"""geoagent batch: every photo journalled exactly once whatever kills the run, a torn line redone, bad items
journalled and retried on demand, CSV and GeoJSON written from the journal, memory flat with input size."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import indexed_world, run_cli, start_cli, world_retrieval_config, world_settings, write_world_config
from geoagent.batch.engines import load_engine
from geoagent.batch.formats import plan_output
from geoagent.batch.inputs import BatchInput, BatchInputError, BatchItem
from geoagent.batch.journal import Journal, failure_line
from geoagent.errors import ConfigError
from standin import StandinConfig, WorldJudge
from standin.markers import read_marker

KILL_POLL_S = 0.005


class RecordingJudge(WorldJudge):
    """The world's judge, noting the marker of the query photo of every question it answers."""

    def __init__(self, truth) -> None:
        super().__init__(truth)
        self.queries: list[int | None] = []

    def __call__(self, seen):
        self.queries.append(read_marker(seen.images[0]) if seen.images else None)
        return super().__call__(seen)


def path_list(path: Path, photos) -> Path:
    path.write_text("".join(f"{p}\n" for p in photos))
    return path


def journal(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def prediction(entry: dict) -> tuple:
    """What must not change between runs: the coordinate and the ranking (stats, timings may)."""
    return entry["image"], entry.get("lat"), entry.get("lon"), [c["id"] for c in entry.get("candidates", [])], entry.get("error")


def batch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("batch", *args, cwd=cwd)


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def start_batch(args: list[str], cwd: Path):
    """``geoagent batch ARGS`` started in the background (stderr kept for the test's messages)."""
    return start_cli("batch", *args, cwd=cwd)


def run_until_lines(args: list[str], journal_path: Path, lines: int, cwd: Path) -> None:
    """Start ``geoagent batch ARGS`` and SIGKILL it once the journal holds ``lines`` lines."""
    proc = start_batch(args, cwd)
    deadline = time.monotonic() + 300
    while lines_in(journal_path) < lines and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(KILL_POLL_S)
    if proc.poll() is not None:
        pytest.fail(f"the batch ended (exit {proc.returncode}) before it could be killed: {proc.stderr.read().decode()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


#: 8 countries x 9 places x (reference, decoy, query): 216 photos, the must-show's "200 photos" and a few more.
BIG_WORLD_PLACES = 9


@pytest.fixture(scope="module")
def big_world(tmp_path_factory):
    """A world of 216 photos and its index, for the kill-and-resume must-show (the session world has 144)."""
    return indexed_world(tmp_path_factory.mktemp("big-world"), places_per_country=BIG_WORLD_PLACES)


def test_a_batch_killed_twice_with_sigkill_journals_every_photo_once_at_little_extra_cost(big_world, standin, tmp_path):
    """The issue's must-show: a batch over 200+ photos (the big world's queries and references) is killed with
    SIGKILL twice, at different points, and rerun: every photo is in the journal exactly once, with the
    prediction of an uninterrupted run, and the three runs together send at most 1.15x the requests of one.
    The uninterrupted run goes alongside, to a stand-in of its own (its requests counted apart)."""
    world = big_world
    photos = [s.path for s in world.queries + world.references]
    assert len(photos) >= 200
    listing = path_list(tmp_path / "photos.txt", photos)
    # every stage on; five candidates (not ten) halve the pairwise questions, the bulk of the run's time
    agent = {"strategy": "tournament", "country_prior": True, "reasoning": True, "top_k": 5, "max_concurrent_photos": 4}
    backend = {"max_concurrency": 8}
    clean_server, server = (standin(judge=WorldJudge(world.truth), config=StandinConfig(latency_s=0.005)) for _ in range(2))

    clean_config = write_world_config(tmp_path / "clean.toml", world, clean_server, tmp_path / "clean-cache", backend=backend, **agent)
    clean = start_batch([str(listing), "--out", str(tmp_path / "clean.jsonl"), "--config", str(clean_config)], tmp_path)
    try:
        config = write_world_config(tmp_path / "g.toml", world, server, tmp_path / "cache", backend=backend, **agent)
        out = tmp_path / "run.jsonl"
        args = [str(listing), "--out", str(out), "--config", str(config)]
        for kill_at in (len(photos) // 4, len(photos) * 2 // 3):
            run_until_lines(args, out, kill_at, tmp_path)
            assert kill_at <= lines_in(out) < len(photos)  # killed mid-run
        final = batch(*args, cwd=tmp_path)
        assert final.returncode == 0, final.stderr
        _, clean_stderr = clean.communicate(timeout=300)
    finally:
        clean.kill()
    assert clean.returncode == 0, clean_stderr.decode()

    entries = journal(out)
    assert sorted(e["image"] for e in entries) == sorted(str(p) for p in photos)  # each exactly once
    assert sorted(map(prediction, entries)) == sorted(map(prediction, journal(tmp_path / "clean.jsonl")))
    assert len(server.chat_requests()) <= 1.15 * len(clean_server.chat_requests()), (len(server.chat_requests()), len(clean_server.chat_requests()))


def test_a_torn_last_line_is_cut_off_and_that_photo_redone(world, standin, tmp_path):
    """A crash in the middle of writing a line leaves it torn: the rerun says so, cuts it off and locates
    that photo again; the journal ends with one whole line per photo."""
    server = standin(judge=WorldJudge(world.truth))
    config = write_world_config(tmp_path / "g.toml", world, server, tmp_path / "cache", strategy="tournament")
    listing = path_list(tmp_path / "photos.txt", [q.path for q in world.queries[:5]])
    out = tmp_path / "run.jsonl"
    assert batch(str(listing), "--out", str(out), "--config", str(config), cwd=tmp_path).returncode == 0
    before = journal(out)
    data = out.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    out.write_bytes(data[: last + (len(data) - last) // 2])  # truncated mid-line

    proc = batch(str(listing), "--out", str(out), "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "torn last line" in proc.stderr and "this run: 1 located, 0 failed, 4 already journalled" in proc.stderr
    assert out.read_bytes().endswith(b"\n")
    assert sorted(map(prediction, journal(out))) == sorted(map(prediction, before))


def test_out_naming_a_file_that_is_not_a_journal_is_refused_and_left_untouched(world, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nnot a journal, and no newline at the end")
    proc = batch(str(world.root / "queries"), "--out", str(notes), cwd=tmp_path)
    assert proc.returncode == 2 and "notes.txt line 1: not a geoagent batch journal line" in proc.stderr, proc.stderr
    assert notes.read_text() == "my notes\nnot a journal, and no newline at the end"
    assert "Traceback" not in proc.stderr


def test_geojson_is_a_feature_collection_of_the_located_photos_and_csv_a_row_per_photo(world, standin, tmp_path):
    """GeoJSON: RFC 7946 FeatureCollection, one Point per located photo at [lon, lat], the prediction's other
    fields as properties, failures in a foreign member. CSV from the same journal: one row per photo, written
    without locating anything again (the second run's config could not even load an index)."""
    server = standin(judge=WorldJudge(world.truth))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    located = [q.path for q in world.queries[::6][:6]]  # six countries, Japan and the US among them
    listing = path_list(tmp_path / "photos.txt", [*located, broken])
    config = write_world_config(tmp_path / "g.toml", world, server, tmp_path / "cache", strategy="tournament")
    proc = batch(str(listing), "--out", str(tmp_path / "r.geojson"), "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 1 and f"{broken}: not an image" in proc.stderr, proc.stderr  # one photo failed

    entries = {e["image"]: e for e in journal(tmp_path / "r.journal.jsonl")}
    doc = json.loads((tmp_path / "r.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and "crs" not in doc
    assert len(doc["features"]) == len(located)
    for feature in doc["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Point"
        entry = entries[feature["properties"]["image"]]
        assert feature["geometry"]["coordinates"] == [entry["lon"], entry["lat"]]
        assert -180 <= entry["lon"] <= 180 and -90 <= entry["lat"] <= 90
        assert {"lat", "lon"}.isdisjoint(feature["properties"])
        assert feature["properties"]["country"] == entry["country"] and feature["properties"]["candidates"] == entry["candidates"]
    assert any(abs(f["geometry"]["coordinates"][0]) > 90 for f in doc["features"])  # some longitude beyond latitude's range: the order is lon, lat
    assert [f["image"] for f in doc["failures"]] == [str(broken)]

    unusable = write_world_config(tmp_path / "bad.toml", world, server, tmp_path / "cache", strategy="tournament")
    unusable.write_text(unusable.read_text().replace(str(world.root / "index"), str(tmp_path / "no-index")))
    converted = batch(str(listing), "--out", str(tmp_path / "r.csv"), "--config", str(unusable), cwd=tmp_path)
    assert converted.returncode == 1 and "this run: 0 located, 0 failed, 7 already journalled" in converted.stderr, converted.stderr
    with (tmp_path / "r.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image", "lat", "lon", "country", "place", "confidence", "calibrated", "abstained", "vlm_calls", "error"]
    assert sorted(r["image"] for r in rows) == sorted(entries)
    by_image = {r["image"]: r for r in rows}
    assert by_image[str(broken)]["lat"] == "" and "not an image" in by_image[str(broken)]["error"]
    first = entries[str(located[0])]
    assert float(by_image[str(located[0])]["lon"]) == first["lon"] and int(by_image[str(located[0])]["vlm_calls"]) == first["stats"]["vlm_calls"]


def test_bad_items_are_journalled_and_retry_failed_redoes_only_them(world, standin, tmp_path):
    """A missing file, a row without a path and a file that is no image are journalled with their errors and
    the batch goes on (exit 1). A plain rerun redoes nothing; --retry-failed asks only about the failed
    photos, and the journal still holds one line per photo."""
    judge = RecordingJudge(world.truth)
    server = standin(judge=judge)
    config = write_world_config(tmp_path / "g.toml", world, server, tmp_path / "cache", strategy="tournament")
    good, late, fixed = world.queries[0], world.queries[1], world.queries[2]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    table = tmp_path / "photos.csv"
    table.write_text(f"path,note\n{good.path},ok\nlater.jpg,missing\n,no path\nbroken.jpg,corrupt\n")
    args = [str(table), "--out", str(tmp_path / "run.jsonl"), "--config", str(config)]

    first = batch(*args, cwd=tmp_path)
    assert first.returncode == 1 and "Traceback" not in first.stderr, first.stderr
    errors = {e["image"]: e["error"] for e in journal(tmp_path / "run.jsonl") if "error" in e}
    assert errors == {
        str(tmp_path / "later.jpg"): f"{tmp_path / 'later.jpg'}: no such file",
        f"{table} line 4": f"{table} line 4: no path in this row",
        str(tmp_path / "broken.jpg"): f"{tmp_path / 'broken.jpg'}: not an image (or a format Pillow cannot read)",
    }
    good_line = next(line for line in (tmp_path / "run.jsonl").read_text().splitlines() if str(good.path) in line)

    judge.queries.clear()
    plain = batch(*args, cwd=tmp_path)
    assert plain.returncode == 1 and "this run: 0 located, 0 failed, 4 already journalled" in plain.stderr
    assert judge.queries == []

    shutil.copy(late.path, tmp_path / "later.jpg")
    shutil.copy(fixed.path, tmp_path / "broken.jpg")
    retried = batch(*args, "--retry-failed", cwd=tmp_path)
    assert retried.returncode == 1, retried.stderr  # the row without a path fails again
    assert "this run: 2 located, 1 failed, 1 already journalled" in retried.stderr
    assert judge.queries and set(judge.queries) == {late.marker, fixed.marker}
    lines = (tmp_path / "run.jsonl").read_text().splitlines()
    assert len(lines) == 4 and good_line in lines  # one line per photo; the good one untouched
    assert {e["image"] for e in journal(tmp_path / "run.jsonl") if "error" in e} == {f"{table} line 4"}


def test_a_server_lost_mid_batch_stops_it_journalling_no_failure_and_a_rerun_finishes(world, standin, tmp_path):
    """Photos lost to an unreachable server are the server's fault, not theirs: they are not journalled as
    failed (a plain rerun does them), the batch stops with exit 2, and a rerun with a server finishes it."""
    import threading

    server = standin(judge=WorldJudge(world.truth), config=StandinConfig(latency_s=0.01))
    backend = {"retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05, "max_retries": 1, "max_concurrency": 4,
               "outage_wait_s": 0.5}  # the server stays down: its questions wait half a second for it, not a minute
    config = write_world_config(tmp_path / "g.toml", world, server, tmp_path / "cache", backend=backend, strategy="tournament", max_concurrent_photos=2)
    listing = path_list(tmp_path / "photos.txt", [q.path for q in world.queries[:20]])
    out = tmp_path / "run.jsonl"

    def kill_after_lines(lines: int) -> None:
        deadline = time.monotonic() + 120
        while lines_in(out) < lines and time.monotonic() < deadline:
            time.sleep(KILL_POLL_S)
        server.kill()

    threading.Thread(target=kill_after_lines, args=(5,), daemon=True).start()
    stopped = batch(str(listing), "--out", str(out), "--config", str(config), cwd=tmp_path)
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr, stopped.stderr
    assert "could not be answered" in stopped.stderr and "rerun to finish" in stopped.stderr
    kept = journal(out)
    assert 5 <= len(kept) < 20 and not any("error" in e for e in kept)

    revived = standin(judge=WorldJudge(world.truth))
    config.write_text(config.read_text().replace(server.url, revived.url))
    finished = batch(str(listing), "--out", str(out), "--config", str(config), cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert sorted(e["image"] for e in journal(out)) == sorted(str(q.path) for q in world.queries[:20])


async def test_memory_stays_flat_from_100_to_1000_inputs(world, tmp_path):
    """Results go to the journal and INPUT is read as slots free up: ten times the photos (symlinks to the
    world's queries, retrieval only) must not raise the peak of Python memory by more than a few MB. Holding
    1,000 results, or a task per photo, would add more than ten (RSS is too noisy to tell: see
    benchmarks/batch_memory.py for it at 1,000 and 10,000 inputs)."""
    import tracemalloc

    from geoagent.batch.runner import run_batch
    from geoagent.config import Settings

    settings = Settings(retrieval=world_retrieval_config(world), agent={"strategy": "none"}, cache={"dir": tmp_path / "cache"})
    peaks = {}
    for count in (100, 1000):
        folder = tmp_path / f"links-{count}"
        folder.mkdir()
        for i in range(count):
            (folder / f"{i:05d}.jpg").symlink_to(world.queries[i % len(world.queries)].path)
        tracemalloc.start()
        try:
            report = await run_batch(settings, folder, plan_output(tmp_path / f"{count}.jsonl", None))
            peaks[count] = tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()
        assert report.journal_located == count == lines_in(tmp_path / f"{count}.jsonl")
    assert peaks[1000] - peaks[100] < 4, peaks


async def test_the_local_engine_reads_input_only_as_slots_free_up(world, world_retriever, standin, tmp_path):
    """However long INPUT, at most photos_in_flight() photos are taken from it beyond those finished."""
    from geoagent.agent.controller import GeoAgent

    server = standin(judge=WorldJudge(world.truth))
    settings = world_settings(world, server, tmp_path, strategy="tournament", max_concurrent_photos=3)
    engine = load_engine("local")(settings, agent=GeoAgent(settings, retriever=world_retriever))
    taken = 0

    async def photos():
        nonlocal taken
        for spot in world.queries * 3:
            taken += 1
            yield BatchItem(str(spot.path), spot.path)

    finished = 0
    async with engine:
        async for _item, outcome in engine.run(photos()):
            finished += 1
            assert taken - finished <= 3  # those in the three slots, nothing read ahead
            assert not isinstance(outcome, Exception), outcome
    assert finished == taken == len(world.queries) * 3


# --- the parts, directly -------------------------------------------------------------------------------


def test_input_kinds_are_read_in_a_stable_order_with_paths_relative_to_the_file(tmp_path):
    (tmp_path / "photos" / "b").mkdir(parents=True)
    for name in ("photos/b/2.JPG", "photos/a.png", "photos/b/1.jpg", "photos/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [i.key for i in BatchInput(tmp_path / "photos").items()] == [str(tmp_path / p) for p in ("photos/a.png", "photos/b/1.jpg", "photos/b/2.JPG")]
    assert BatchInput(tmp_path / "photos").count() == 3

    listing = tmp_path / "lists" / "l.txt"
    listing.parent.mkdir()
    listing.write_text("# a comment\n../photos/a.png\n\n  /abs/x.jpg  \n")
    assert [i.key for i in BatchInput(listing).items()] == [str(tmp_path / "photos/a.png"), "/abs/x.jpg"]
    assert BatchInput(listing).count() == 2

    table = tmp_path / "t.csv"
    table.write_bytes(b"lat,path\n1,photos/a.png\n2,\n3,caf\xe9.jpg\n")
    items = list(BatchInput(table).items())
    assert [i.key for i in items] == [str(tmp_path / "photos/a.png"), f"{table} line 3", f"{table} line 4"]
    assert [i.problem for i in items] == [None, "no path in this row", "not valid UTF-8 (save the CSV as UTF-8)"]
    assert BatchInput(table).count() == 3


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing", None, "no such folder or file"),
        ("photo.jpg", b"x", "a photo; batch takes a folder"),
        ("t.csv", b"file,lat\na,1\n", "no 'path' column"),
        ("list.txt", b"a.jpg\n\x00\x01", "not a text file of paths"),
    ],
)
def test_an_unusable_input_is_one_line_exit_2(name, content, message, tmp_path):
    source = tmp_path / name
    if content is not None:
        source.write_bytes(content)
    with pytest.raises(BatchInputError, match=message) as caught:
        BatchInput(source)
    assert caught.value.exit_code == 2
    proc = batch(str(source), "--out", str(tmp_path / "r.jsonl"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_outputs_are_planned_from_out_and_format(tmp_path):
    assert plan_output(tmp_path / "r.jsonl", None).target is None
    assert plan_output(tmp_path / "r.jsonl", "csv").journal == tmp_path / "r.jsonl"
    assert plan_output(tmp_path / "r.jsonl", "csv").target == tmp_path / "r.csv"
    geo = plan_output(tmp_path / "r.geojson", None)
    assert (geo.journal, geo.format, geo.target) == (tmp_path / "r.journal.jsonl", "geojson", tmp_path / "r.geojson")
    assert plan_output(tmp_path / "r.csv", None).journal == geo.journal  # one journal, either format
    with pytest.raises(BatchInputError, match="make them agree"):
        plan_output(tmp_path / "r.csv", "geojson")
    with pytest.raises(BatchInputError, match="not one of"):
        plan_output(tmp_path / "r.jsonl", "xml")


def test_a_later_line_supersedes_and_compaction_keeps_one_line_per_photo(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal.open(path) as j:
        j.record("a", failure_line("a", "boom"), failed=True)
        j.record("b", '{"image":"b","lat":1.0,"lon":2.0}', failed=False)
        j.record("a", '{"image":"a","lat":3.0,"lon":4.0}', failed=False)
        assert (len(j), j.located, j.failures, j.superseded) == (2, 2, 0, 1)
        assert [e["image"] for e in j.entries()] == ["b", "a"]
    with Journal.open(path) as j:  # what a rerun reads: the later line wins
        assert not j.failed("a") and j.superseded == 1
        assert j.compact()
        assert path.read_text() == '{"image":"b","lat":1.0,"lon":2.0}\n{"image":"a","lat":3.0,"lon":4.0}\n'
        j.record("c", failure_line("c", "x"), failed=True)  # still appendable after the rewrite
    assert lines_in(path) == 3


def test_a_journal_is_written_by_one_batch_at_a_time(tmp_path):
    """Locked from its first line; two batches that both started before the file existed cannot both create it."""
    with Journal.open(tmp_path / "j.jsonl") as first, Journal.open(tmp_path / "j.jsonl") as second:
        first.record("a", failure_line("a", "boom"), failed=True)
        with pytest.raises(BatchInputError, match="another geoagent batch is writing this journal"):
            second.record("b", failure_line("b", "boom"), failed=True)
        with pytest.raises(BatchInputError, match="another geoagent batch is writing this journal"):
            Journal.open(tmp_path / "j.jsonl")


def test_an_unknown_engine_names_the_ones_there_are(world, tmp_path):
    with pytest.raises(ConfigError, match=r"no engine 'spark' \(available: local, ray\)"):
        load_engine("spark")
    proc = batch(str(world.root / "queries"), "--out", str(tmp_path / "r.jsonl"), "--engine", "spark", cwd=tmp_path)
    assert proc.returncode == 2 and "--engine: no engine 'spark'" in proc.stderr and not (tmp_path / "r.jsonl").exists()
