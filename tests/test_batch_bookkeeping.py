"""Batch bookkeeping (issue 18 point 5, F10, F11): stale failures leave the exit code, a zero-filled journal tail
is cut off, nothing is written by a batch that fails at once, --out never overwrites what is not GeoAgent's own,
and the journal keys photos by their real path."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import run_cli, write_world_config
from geoagent.batch.inputs import RAW_FIELD, BatchInput, BatchInputError, photo_key
from geoagent.batch.journal import Journal, failure_line
from standin import WorldJudge


def batch(*args: str, cwd: Path):
    return run_cli("batch", *args, cwd=cwd)


def journal(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_csv_fixed_after_a_broken_line_reruns_to_exit_0(world, standin, tmp_path):
    """A CSV with a row without a path and a photo that is missing: exit 1. The user fixes the row and drops the
    missing photo's row, then reruns: exit 0 — the old "t.csv line 3" and missing-photo failures name nothing in
    INPUT any more, so they are dropped from the journal (and said so), not counted for ever."""
    server = standin(judge=WorldJudge(world.truth))
    config = write_world_config(tmp_path / "g.toml", world, server, tmp_path / "cache", strategy="none")
    good, fixed = world.queries[0].path, world.queries[1].path
    table = tmp_path / "photos.csv"
    table.write_text(f"path\n{good}\n\ngone.jpg\n".replace("\n\n", "\n,\n"))  # line 3: an empty path cell
    args = [str(table), "--out", str(tmp_path / "r.csv"), "--config", str(config)]
    first = batch(*args, cwd=tmp_path)
    assert first.returncode == 1, first.stderr
    assert {e["image"] for e in journal(tmp_path / "r.journal.jsonl") if "error" in e} == {f"{table} line 3", str(tmp_path / "gone.jpg")}

    table.write_text(f"path\n{good}\n{fixed}\n")
    second = batch(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "2 located, 0 failed" in second.stderr and "2 stale failures dropped (no longer in INPUT)" in second.stderr
    assert sorted(e["image"] for e in journal(tmp_path / "r.journal.jsonl")) == sorted([str(good), str(fixed)])
    assert "error" not in (tmp_path / "r.csv").read_text().splitlines()[1:]  # the output has no stale row either


def test_a_journal_with_a_zero_filled_tail_resumes(tmp_path):
    """Power loss on some filesystems leaves the file grown but its last blocks zeros: that tail is cut off like a
    torn line (said in torn_bytes), the whole lines before it are kept and the journal takes new lines."""
    path = tmp_path / "j.jsonl"
    with Journal.open(path) as j:
        j.record("a", '{"image":"a","lat":1.0,"lon":2.0}', failed=False)
        j.record("b", failure_line("b", "boom"), failed=True)
    kept = path.read_bytes()
    path.write_bytes(kept + b"\0" * 5000)
    with Journal.open(path) as j:
        assert j.torn_bytes == 5000 and len(j) == 2 and j.failed("b")
        j.record("c", '{"image":"c","lat":3.0,"lon":4.0}', failed=False)
    assert path.read_bytes() == kept + b'{"image":"c","lat":3.0,"lon":4.0}\n'
    path.write_bytes(kept + b"\0\0x")  # zeros then something else: not a torn write, not ours to cut
    with pytest.raises(BatchInputError, match="not a geoagent batch journal"):
        Journal.open(path)


def test_a_batch_that_fails_at_once_leaves_no_file(world, standin, tmp_path):
    """The model server is down: the batch stops before its first photo (exit 2) and leaves neither an empty
    journal nor an empty CSV behind; an empty INPUT folder is one line, exit 2, nothing written."""
    server = standin(judge=WorldJudge(world.truth))
    config = write_world_config(tmp_path / "g.toml", world, server, tmp_path / "cache", strategy="tournament")
    server.kill()
    proc = batch(str(world.root / "queries"), "--out", str(tmp_path / "out" / "r.csv"), "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "r.journal.jsonl").exists() and not (tmp_path / "out" / "r.csv").exists()

    (tmp_path / "empty").mkdir()
    proc = batch(str(tmp_path / "empty"), "--out", str(tmp_path / "e.jsonl"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{tmp_path / 'empty'}: no photos in this folder or its subfolders" in proc.stderr
    assert not (tmp_path / "e.jsonl").exists()


def test_out_never_overwrites_input_or_a_file_that_is_not_ours(world, standin, tmp_path):
    """F10: --out naming the input CSV, or an existing CSV/GeoJSON that is not an output of its journal, is one
    line, exit 2, the file untouched (checked before any model loads; with a working config, as a user has)."""
    server = standin(judge=WorldJudge(world.truth))
    (tmp_path / "geoagent.toml").write_text(write_world_config(tmp_path / "g.toml", world, server, tmp_path / "cache", strategy="none").read_text())
    photos = tmp_path / "photos.csv"
    photos.write_text(f"path\n{world.queries[0].path}\n")
    before = photos.read_bytes()
    proc = batch(str(photos), "--out", str(photos), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "that is INPUT" in proc.stderr, proc.stderr
    assert photos.read_bytes() == before and not (tmp_path / "photos.journal.jsonl").exists()

    mine = tmp_path / "mine.geojson"
    mine.write_text('{"my": "data"}')
    for target in (mine, tmp_path / "notes.csv"):
        if not target.exists():
            target.write_text("a,b\n1,2\n")
        content = target.read_bytes()
        proc = batch(str(photos), "--out", str(target), cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "exists and is not GeoAgent's output" in proc.stderr, proc.stderr
        assert target.read_bytes() == content
    # an existing journal beside it does not make a foreign file ours
    (tmp_path / "notes.journal.jsonl").write_text("")
    assert batch(str(photos), "--out", str(tmp_path / "notes.csv"), cwd=tmp_path).returncode == 2
    # GeoAgent's own output of its journal is rewritten as before
    for _ in range(2):
        proc = batch(str(photos), "--out", str(tmp_path / "r.csv"), cwd=tmp_path)
        assert proc.returncode == 0 and "wrote" in proc.stderr, proc.stderr


STRANGE_NAMES = [b"a\xff.jpg", b"a\\xff.jpg", b"b\n.jpg", b"b\\n.jpg"]  # shown alike in pairs


def test_photos_shown_alike_are_four_journal_keys(world, standin, tmp_path):
    """F11: a raw byte and its escape, a newline and a literal \\n: four photos, four located, exit 0; each
    journal line keeps the shown path in ``image`` and the real one, lossless, in ``image_bytes``."""
    folder = tmp_path / "strange"
    folder.mkdir()
    for name, spot in zip(STRANGE_NAMES, world.queries):
        shutil.copy(spot.path, os.fsdecode(os.fsencode(folder) + b"/" + name))
    server = standin(judge=WorldJudge(world.truth))
    config = write_world_config(tmp_path / "g.toml", world, server, tmp_path / "cache", strategy="none")
    proc = batch(str(folder), "--out", str(tmp_path / "r.jsonl"), "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "4 located, 0 failed" in proc.stderr and "named twice" not in proc.stderr
    entries = journal(tmp_path / "r.jsonl")
    assert sorted(base64.urlsafe_b64decode(e[RAW_FIELD]) for e in entries) == sorted(os.fsencode(folder) + b"/" + n for n in STRANGE_NAMES)
    assert len({e["image"] for e in entries}) == 2  # shown alike, kept apart
    rerun = batch(str(folder), "--out", str(tmp_path / "r.jsonl"), "--config", str(config), cwd=tmp_path)
    assert rerun.returncode == 0 and "0 located, 0 failed, 4 already journalled" in rerun.stderr, rerun.stderr


def test_keys_are_the_path_where_it_is_shown_as_it_is_and_old_journals_still_resume(tmp_path):
    """An ordinary name is its own key (journals stay as they were); a journal written before keys kept the bytes
    (the shown path as ``image``, nothing more) still resumes: its line counts for the first photo claiming it, as
    the older run located that one and counted the other as named twice."""
    assert photo_key("/p/café.jpg") == "/p/café.jpg"
    raw, literal = (os.fsdecode(b"/p/" + name) for name in STRANGE_NAMES[:2])
    assert photo_key(raw) != photo_key(literal) and "\0" in photo_key(raw)
    path = tmp_path / "old.jsonl"
    path.write_text('{"image":"/p/a\\\\xff.jpg","lat":1.0,"lon":2.0}\n{"image":"/p/c.jpg","lat":3.0,"lon":4.0}\n')
    with Journal.open(path) as j:
        shown = "/p/a\\xff.jpg"
        assert j.key_for(photo_key(raw), shown) == shown  # claimed: skipped on resume
        assert j.key_for(photo_key(literal), shown) == photo_key(literal)  # the other one is located now
        assert j.key_for("/p/c.jpg", "/p/c.jpg") == "/p/c.jpg"


def test_an_empty_csv_or_list_says_so(tmp_path):
    """The one line an INPUT naming no photo gets, per kind."""
    (tmp_path / "t.csv").write_text("path\n")
    (tmp_path / "l.txt").write_text("# nothing yet\n")
    assert BatchInput(tmp_path / "t.csv").nothing_to_do().endswith("no rows (a CSV INPUT names its photos in a path column, one a row)")
    assert "no paths" in BatchInput(tmp_path / "l.txt").nothing_to_do()


def test_a_journal_path_that_is_no_regular_file_is_refused_at_once(tmp_path):
    """--out naming a FIFO is one line, exit 2, never a read that waits for a writer."""
    fifo = tmp_path / "r.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(BatchInputError, match="not a regular file"):
        Journal.open(fifo)
