"""The terminal (issue 11, part 5): `locate` on several photos shows a progress bar on stderr when stderr is a
terminal (a real pseudo-terminal here; with a pipe there is none, see test_near_duplicates.py's CLI run);
--explain draws a tournament as a bracket."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import struct
import subprocess
import sys
import termios

from rich.console import Console

from conftest import world_settings, write_world_config
from geoagent.agent.controller import GeoAgent
from geoagent.bracket import tournament_bracket
from geoagent.output import print_result
from geoagent.types import Match
from standin import StandinConfig, WorldJudge

BAR = "━"  # rich's bar glyph
TERMINAL_SIZE = struct.pack("HHHH", 40, 200, 0, 0)  # rows, columns: wide enough for the bar's every column


def run_with_terminal_stderr(args: list[str], cwd) -> tuple[int, str, str]:
    """``geoagent ARGS`` with stderr on a pseudo-terminal and stdout on a pipe: (exit code, stdout, terminal)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, TERMINAL_SIZE)
    proc = subprocess.Popen([sys.executable, "-m", "geoagent", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    screen = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    out = proc.stdout.read().decode()  # type: ignore[union-attr]
    proc.wait(timeout=60)
    os.close(master)
    return proc.returncode, out, screen.decode(errors="replace")


def test_locate_on_several_photos_shows_a_progress_bar_on_a_terminal(world, standin, tmp_path):
    """stderr a terminal: the bar counts the photos to 3/3 there, while the JSON goes to stdout alone (with stderr
    a pipe there is no bar: tests/test_near_duplicates.py's CLI run checks that on its three photos)."""
    server = standin(judge=WorldJudge(world.truth))
    config = write_world_config(tmp_path / "geoagent.toml", world, server, tmp_path / "cache")
    photos = [str(q.path) for q in world.queries[:3]]
    code, out, screen = run_with_terminal_stderr(["locate", *photos, "--strategy", "none", "--json", "--config", str(config)], tmp_path)
    assert code == 0, screen
    assert "locate" in screen and BAR in screen and "3/3" in screen
    assert [json.loads(line)["image"] for line in out.splitlines()] == photos
    assert '"image"' not in screen  # results piped away stay out of the terminal


def rendered(result, width: int = 240) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None)
    print_result(console, result, explain=True)
    return console.file.getvalue()  # type: ignore[attr-defined]


async def test_explain_draws_the_tournament_as_a_bracket(world, standin, world_retriever, tmp_path):
    """Six candidates: three first-round matches, a second round with a bye, a final; each round lists who met
    whom and who went on, in order, then the champion."""
    server = standin(judge=WorldJudge(world.truth), config=StandinConfig(capacity=64))
    async with GeoAgent(world_settings(world, server, tmp_path, strategy="tournament", top_k=6), retriever=world_retriever) as agent:
        result = await agent.locate(world.queries[3].path, explain=True)
    matches = result.trace.matches  # type: ignore[union-attr]
    assert sorted(m.round for m in matches) == [1, 1, 1, 2, 3]  # type: ignore[type-var]
    first, second, final = ([m for m in matches if m.round == r] for r in (1, 2, 3))
    later = {second[0].a, second[0].b, final[0].a, final[0].b}
    for m in first:  # a match's winner goes on; on a tie (winner None) the one better by evidence does
        assert (m.a in later) != (m.b in later) and m.winner in (None, m.a if m.a in later else m.b)
    went_on = {m.a if m.a in later else m.b for m in first}
    assert {second[0].a, second[0].b} <= went_on
    bye = (went_on - {second[0].a, second[0].b}).pop()  # three went on, two met: the third waited

    text = rendered(result)
    label = {c.id: f"#{c.rank} {c.place or c.id}" for c in result.candidates}
    sections = [text.index(title) for title in ("round 1 of 3", "round 2 of 3", "final", "champion:")]
    assert sections == sorted(sections)
    for start, end, played in zip(sections, sections[1:], (first, second, final)):
        block = text[start:end]
        for m in played:
            assert label[m.a] in block and label[m.b] in block
    assert "bye" in text[sections[1] : sections[2]] and label[bye] in text[sections[1] : sections[2]]
    champion = final[0].winner
    assert champion is None or f"champion: {label[champion]}" in text


def test_a_tie_shows_who_the_evidence_sent_on_and_a_failed_ask_says_so():
    """A first-round tie names the player found in the next round; a failed ask reads "failed"; a tied final is
    settled by the evidence."""
    matches = [
        Match(a="a", b="d", winner=None, votes=["a", "d"], shown_first=["d", "a"], round=1),
        Match(a="b", b="c", winner="b", votes=[None, "b"], shown_first=["b", "c"], round=1),
        Match(a="a", b="b", winner=None, votes=["a", "b"], shown_first=["a", "b"], round=2),
    ]
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(tournament_bracket(matches, {c: c.upper() for c in "abcd"}, pool=["a", "b", "c", "d"]))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "2 matches" not in text and "3 matches in 2 rounds, 2 ties" in text
    assert "tie → A (evidence)" in text and "failed" in text and "C → B" in text
    assert "champion: a tie in the final, settled by the evidence" in text


def test_a_match_whose_every_ask_failed_is_no_tie():
    """A match with no answer at all is said as such ("no answer"), not counted as a tie, in the bracket and in the
    list of matches the other strategies print (issue 18: a failure shown as "a tie")."""
    from geoagent.output import print_result
    from geoagent.types import Candidate, LocateResult, Trace

    matches = [
        Match(a="a", b="b", winner=None, votes=[None, None], shown_first=["a", "b"], round=1),
        Match(a="c", b="d", winner=None, votes=["c", "d"], shown_first=["c", "d"], round=1),
        Match(a="a", b="c", winner="a", votes=["a", "a"], shown_first=["a", "c"], round=2),
    ]
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(tournament_bracket(matches, {c: c.upper() for c in "abcd"}, pool=["a", "b", "c", "d"]))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "3 matches in 2 rounds, 1 tie, 1 with no answer" in text and "no answer → A (evidence)" in text

    candidates = [Candidate(id=c, lat=0.0, lon=float(i), source="index", score=1.0 - i / 10, rank=i + 1) for i, c in enumerate("ab")]
    result = LocateResult(image="p.jpg", lat=0.0, lon=0.0, country=None, place=None, confidence=0.5, candidates=candidates,
                          trace=Trace(strategy="allpairs", matches=[Match(a="a", b="b", winner=None, votes=[None, None])]))  # fmt: skip
    console = Console(file=io.StringIO(), width=200, color_system=None)
    print_result(console, result, explain=True)
    listed = console.file.getvalue()  # type: ignore[attr-defined]
    assert "1 match, 0 ties, 1 with no answer" in listed and "no answer (every ask failed)" in listed


async def test_other_strategies_keep_the_list_of_matches(world, standin, world_retriever, tmp_path):
    """allpairs has no rounds: --explain lists its matches as before, with no bracket."""
    server = standin(judge=WorldJudge(world.truth), config=StandinConfig(capacity=64))
    async with GeoAgent(world_settings(world, server, tmp_path, strategy="allpairs", top_k=3), retriever=world_retriever) as agent:
        result = await agent.locate(world.queries[3].path, explain=True)
    text = rendered(result)
    assert "3 matches, " in text and "round 1" not in text and "champion" not in text
    assert all(m.round is None for m in result.trace.matches)  # type: ignore[union-attr]
