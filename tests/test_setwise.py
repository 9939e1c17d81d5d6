"""Set-wise reranking (``strategy = "setwise"``): one question shows the query and up to c candidates and asks
which is nearest; a knockout over sets, against the stand-in over real HTTP.

The stand-in picks the candidate nearest the truth 95% of the time, with a 5% first-position bias (its
provisional ``_nearest_choice``; see standin/judge.py).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter

import pytest

from conftest import run_cli, world_settings, write_world_config
from geoagent.agent.controller import GeoAgent
from geoagent.agent.events import SetAnswered
from geoagent.agent.rerank import deal_sets
from geoagent.types import Candidate, LocateResult
from geoagent.words import count
from standin import StandinConfig, StandinServer, WorldJudge

SETWISE_QUERIES = 16  # photos of the world the cost checks run on (the accuracy check runs on all)


@pytest.fixture(scope="module")
def module_server(world):
    """One stand-in for the module."""
    with StandinServer(WorldJudge(world.truth), StandinConfig(capacity=64)) as started:
        yield started


@pytest.fixture
def server(module_server):
    """The module's stand-in, its request log emptied for this test."""
    module_server.reset_log()
    return module_server


async def locate(world, server, retriever, cache_dir, limit=None, explain=False, on_event=None, **agent_cfg) -> list[tuple[object, LocateResult]]:
    agent = GeoAgent(world_settings(world, server, cache_dir, **agent_cfg), retriever=retriever)
    try:
        pairs = []
        for query in world.queries[:limit]:
            pairs.append((query, await agent.locate(query.path, explain=explain, on_event=on_event)))
        return pairs
    finally:
        await agent.aclose()


async def locate_photo(world, server, retriever, cache_dir, photo, **agent_cfg) -> LocateResult:
    """One photo with the trace, as the CLI's defaults would locate it (set-wise, prior and reasoning off)."""
    agent = GeoAgent(world_settings(world, server, cache_dir, strategy="setwise", **agent_cfg), retriever=retriever)
    try:
        return await agent.locate(photo, explain=True)
    finally:
        await agent.aclose()


def top1(pairs) -> float:
    return sum(result.candidates[0].id == query.ref for query, result in pairs) / len(pairs)


def questions(server: StandinServer) -> Counter:
    """What was sent, as a multiset (requests run concurrently, so their order is not the point)."""
    return Counter((r.schema_name, r.prompt, r.images) for r in server.chat_requests())


@pytest.fixture(scope="module")
def tournament_run(world, module_server, world_retriever, tmp_path_factory):
    """The adaptive tournament on the cost photos: its results, its requests, and its (now warm) cache."""
    cache = tmp_path_factory.mktemp("tournament-cache")
    module_server.reset_log()
    pairs = asyncio.run(locate(world, module_server, world_retriever, cache, limit=SETWISE_QUERIES, strategy="tournament"))
    return pairs, questions(module_server), cache


async def test_set_size_two_asks_exactly_the_tournaments_questions(world, tournament_run, server, world_retriever, tmp_path):
    """c = 2 is the tournament: the same prompts with the same images, as many of them, the same answers; and
    against the tournament's cache it sends nothing, so every question has the tournament's cache key."""
    tournament_pairs, tournament_questions, tournament_cache = tournament_run
    server.reset_log()
    pairs = await locate(world, server, world_retriever, tmp_path / "cold", limit=SETWISE_QUERIES, strategy="setwise", set_size=2)
    assert questions(server) == tournament_questions
    assert sum(tournament_questions.values()) > SETWISE_QUERIES  # the comparison is about real questions
    assert [[c.id for c in r.candidates] for _, r in pairs] == [[c.id for c in r.candidates] for _, r in tournament_pairs]
    server.reset_log()
    warm = await locate(world, server, world_retriever, tournament_cache, limit=SETWISE_QUERIES, strategy="setwise", set_size=2)
    assert server.chat_requests() == []
    assert all(r.stats.vlm_calls == 0 and r.stats.cache_hits > 0 for _, r in warm)


async def test_a_warm_rerun_of_setwise_sends_nothing(world, server, world_retriever, tmp_path):
    """A rerun of set-wise (c = 4, adaptive debiasing) is answered from the cache: 0 requests, the same answers."""
    first = await locate(world, server, world_retriever, tmp_path, limit=SETWISE_QUERIES, strategy="setwise")
    assert server.chat_requests("SetwiseAnswer")
    server.reset_log()
    second = await locate(world, server, world_retriever, tmp_path, limit=SETWISE_QUERIES, strategy="setwise")
    assert server.chat_requests() == []
    assert all(r.stats.vlm_calls == 0 and r.stats.cache_hits > 0 for _, r in second)
    assert [[c.id for c in r.candidates] for _, r in first] == [[c.id for c in r.candidates] for _, r in second]


def test_the_knockout_deals_ceil_k_minus_one_over_c_minus_one_sets():
    """For every K and c the sets dealt round by round number ceil((K-1)/(c-1)), hold at most c candidates each,
    never repeat a candidate within a round, and leave the byes to the best seeds."""
    for size in range(3, 7):
        for k in range(1, 40):
            alive = [Candidate(id=f"c{i}", lat=0, lon=0, source="index") for i in range(k)]  # best seed first
            sets = 0
            while len(alive) > 1:
                groups = deal_sets(alive, size)
                dealt = [c.id for g in groups for c in g]
                assert len(dealt) == len(set(dealt)) and all(2 <= len(g) <= size for g in groups), (k, size, groups)
                byes = [c.id for c in alive if c.id not in dealt]
                assert byes == [c.id for c in alive[: len(byes)]], (k, size, byes)
                sets += len(groups)
                winners = {g[0].id for g in groups}  # say the best seed of each set wins
                alive = [c for c in alive if c.id in byes or c.id in winners]
            assert sets == math.ceil((k - 1) / (size - 1)), (k, size, sets)


async def test_setwise_asks_the_knockouts_questions_and_reports_each_set(world, server, world_retriever, tmp_path):
    """With c = 4 and one ask per set (position_debias = false) a photo with K candidates costs ceil((K-1)/3)
    requests, all set-wise; each set is in the trace and was told to a listener as it was decided."""
    told = []
    pairs = await locate(world, server, world_retriever, tmp_path, limit=SETWISE_QUERIES, explain=True, on_event=told.append,
                         strategy="setwise", set_size=4, position_debias=False)
    sent = server.chat_requests()
    assert {r.schema_name for r in sent} == {"SetwiseAnswer"}
    assert all(r.images == 1 + r.prompt.count("\nCandidate ") for r in sent)  # the query, then one image per candidate
    for _, result in pairs:
        k = len(result.candidates)
        assert result.trace is not None and len(result.trace.sets) == math.ceil((k - 1) / 3), (k, result.trace.sets)
        assert result.stats.vlm_calls == len(result.trace.sets) and result.stats.calls_by_task == {"pairwise": len(result.trace.sets)}
        assert all(len(s.members) <= 4 and s.went_on in s.members and len(s.votes) == 1 for s in result.trace.sets)
    told_sets = [event.set for event in told if isinstance(event, SetAnswered)]
    assert told_sets == [s for _, r in pairs for s in r.trace.sets]
    assert all(json.loads(SetAnswered(set=s).model_dump_json())["kind"] == "set" for s in told_sets)


async def test_the_composite_layout_sends_each_set_as_one_labelled_picture(world, server, world_retriever, tmp_path):
    """With image_layout = "composite" each set-wise question is one picture whose panels the prompt names (the
    query, then one per candidate letter), and the knockout asks as many questions as with separate images."""
    separate = await locate(world, server, world_retriever, tmp_path / "separate", limit=8, strategy="setwise", position_debias=False)
    server.reset_log()
    composite = await locate(world, server, world_retriever, tmp_path / "composite", limit=8, strategy="setwise",
                             position_debias=False, image_layout="composite")
    sent = server.chat_requests()
    assert sent and all(r.schema_name == "SetwiseAnswer" and r.images == 1 for r in sent)
    for r in sent:
        letters = [line[len("Candidate ")] for line in r.prompt.splitlines() if line.startswith("Candidate ")]
        assert "panel 1 is the query photo" in r.prompt and all(f"panel {i} shows candidate {x}" in r.prompt for i, x in enumerate(letters, 2))
    assert [r.stats.vlm_calls for _, r in composite] == [r.stats.vlm_calls for _, r in separate]


async def test_setwise_locates_about_as_well_as_the_tournament(world, server, world_retriever, tmp_path):
    """On the default knobs set-wise (c = 4, adaptive) lifts Top-1 over retrieval alone as the tournament does,
    and stays within 0.1 of it, with fewer requests per photo."""
    runs = {}
    for strategy in ("none", "tournament", "setwise"):
        runs[strategy] = await locate(world, server, world_retriever, tmp_path / strategy, strategy=strategy)
    scores = {strategy: top1(pairs) for strategy, pairs in runs.items()}
    calls = {strategy: sum(r.stats.vlm_calls for _, r in pairs) for strategy, pairs in runs.items()}
    print(f"top1 {scores}; requests {calls} for {len(world.queries)} photos")
    assert scores["setwise"] >= scores["none"] + 0.2, scores
    assert scores["setwise"] >= scores["tournament"] - 0.1, scores
    assert calls["setwise"] < calls["tournament"], calls


class LetterOutOfRange:
    """The world judge, except that set-wise questions are first answered with a letter that was not shown (and,
    with ``repair``, answered properly when the client's repair re-ask follows)."""

    def __init__(self, judge: WorldJudge, repair: bool) -> None:
        self.judge, self.repair = judge, repair

    def __call__(self, seen):
        answer = self.judge(seen)
        if seen.schema_name == "SetwiseAnswer" and not (self.repair and "could not be used" in seen.prompt):
            return {"reasoning": "the fifth one", "choice": "Z"}
        return answer


@pytest.mark.parametrize("repair", [True, False])
async def test_a_letter_not_shown_is_repaired_or_fails_the_question_not_the_photo(repair, world, world_retriever, tmp_path):
    """An answer naming a letter that was not shown fails validation: the client re-asks once, and the repaired
    answer counts; when the re-ask names one too, the question is recorded as failed and the evidence decides."""
    with StandinServer(LetterOutOfRange(WorldJudge(world.truth), repair), StandinConfig(capacity=64)) as odd:
        pairs = await locate(world, odd, world_retriever, tmp_path, limit=4, explain=True, strategy="setwise", position_debias=False)
        sent = odd.chat_requests("SetwiseAnswer")
    for _, result in pairs:
        sets = result.trace.sets
        assert result.lat is not None and sets
        assert result.stats.vlm_calls == 2 * len(sets)  # every question, then its repair re-ask
        if repair:
            assert not result.stats.failed_questions and all(s.winner is not None for s in sets)
        else:
            assert len(result.stats.failed_questions) == len(sets) and all(s.failed and s.winner is None for s in sets)
            assert all("invalid SetwiseAnswer answer after a repair re-ask" in q.error for q in result.stats.failed_questions)
            assert all(s.went_on == s.members[0] for s in sets)  # no answer: the best by evidence goes on
    assert sum("could not be used" in r.prompt for r in sent) == len(sent) // 2


async def test_explain_shows_each_set_and_its_winner(world, server, world_retriever, tmp_path):
    """`geoagent locate --explain` prints every set of the knockout (its candidates) and who went on. The sets are
    known from the same question asked in process first: the CLI answers from that cache, so its trace is the same."""
    photo = world.queries[2].path
    result = await locate_photo(world, server, world_retriever, tmp_path / "cache", photo)
    label = {c.id: f"#{c.rank} {c.place or c.id}" for c in result.candidates}
    sets = result.trace.sets
    assert len(sets) == math.ceil((len(result.candidates) - 1) / 3)
    config = write_world_config(tmp_path / "geoagent.toml", world, server, tmp_path / "cache", strategy="setwise",
                                country_prior=False, reasoning=False)
    server.reset_log()
    shown = run_cli("locate", str(photo), "--config", str(config), "--explain", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert server.chat_requests() == []  # answered from the cache: the very questions whose sets are checked below
    lines = shown.stdout.splitlines()
    assert any(f"set-wise knockout: {count(len(sets), 'set')} in" in line for line in lines), shown.stdout
    for s in sets:
        row = next((line for line in lines if all(label[m] in line for m in s.members)), None)
        assert row is not None, (s, shown.stdout)
        assert f"went on: {label[s.went_on]}" in row, row
