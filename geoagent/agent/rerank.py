"""Reranking strategies: ask a VLM about candidates (pointwise, in pairs or in sets) and turn answers into votes.

A strategy is one async function registered by name; it returns a vote in [0, 1] per candidate id. Each
round's questions go out at once; the VLM client bounds how many are in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from geoagent.agent.aggregate import bradley_terry, copeland, rank_votes
from geoagent.agent.answers import LETTERS, PairwiseAnswer, PointwiseAnswer, setwise_answer
from geoagent.agent.events import MatchAnswered, OnEvent, ScoreAnswered, SetAnswered
from geoagent.agent.prefix import photo_prefix
from geoagent.agent.questions import QuestionLog
from geoagent.geo import country_name
from geoagent.images import composite, encode_image
from geoagent.prompts import PromptSet
from geoagent.types import Candidate, Match, PointwiseScore, SetMatch
from geoagent.vlm import Answer, CallStats, EncodedImage, VLMClient
from geoagent.vlm.parsing import AnswerT
from geoagent.vlm.types import ImageRole


@dataclass
class Photo:
    """An image ready to send: its encoding, and downscaled pixels only where composites are drawn from it."""

    encoded: EncodedImage
    pixels: Image.Image | None = None

    @classmethod
    def of(cls, image: Image.Image, max_side: int, label: str = "", *, keep_pixels: bool = False, role: ImageRole = "query") -> Photo:
        encoded = encode_image(image, max_side, label, role)
        if not keep_pixels:
            return cls(encoded)
        pixels = image.copy()
        pixels.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return cls(encoded, pixels)


@dataclass
class Comparator:
    """Asks the questions a strategy needs and records every answer."""

    pairwise_client: VLMClient
    pointwise_client: VLMClient
    prompts: PromptSet
    query: Photo
    photos: dict[str, Photo | None]  # candidate id -> its reference photo, if it has one
    base: dict[str, float]  # tie-breaker: the retrieval/prior evidence per candidate id
    log: QuestionLog = field(default_factory=QuestionLog)
    layout: Literal["separate", "composite"] = "separate"
    view: Literal["ground", "cross"] = "ground"
    debias: bool | Literal["adaptive"] = True
    adaptive_margin: float = 0.1
    max_side: int = 768
    set_size: int = 4  # setwise: candidates per question
    stats: CallStats = field(default_factory=CallStats)
    matches: list[Match] = field(default_factory=list)
    sets: list[SetMatch] = field(default_factory=list)
    scores: list[PointwiseScore] = field(default_factory=list)
    on_event: OnEvent | None = None  # told each match, set and score as it is decided
    _questions: dict[tuple[str, ...], asyncio.Task[tuple[str, list[EncodedImage]]]] = field(default_factory=dict)

    def prefer(self, a: Candidate, b: Candidate) -> Candidate:
        """The tie-breaker: the candidate with more retrieval and prior evidence."""
        return self.best_by_evidence([a, b])

    async def _question(self, template: str, candidates: list[Candidate], slots: list[str]) -> tuple[str, list[EncodedImage]]:
        """The prompt and images for these candidates in these slots. A composite is drawn once per ordered
        pair, in a worker thread (drawing and encoding it would stall the event loop), and reused by every ask."""
        if self.layout != "composite":
            return self._render(template, candidates, slots)  # a template filled in: cheap
        key = (template, *(c.id for c in candidates))
        if key not in self._questions:
            self._questions[key] = asyncio.create_task(asyncio.to_thread(self._render, template, candidates, slots))
        return await asyncio.shield(self._questions[key])

    def _render(self, template: str, candidates: list[Candidate], slots: list[str]) -> tuple[str, list[EncodedImage]]:
        noun = "an aerial image" if self.view == "cross" else "a reference photo"
        word = "panel" if self.layout == "composite" else "image"
        query_noun = "street-level query photo" if self.view == "cross" else "query photo"
        with_photo = [(c, s) for c, s in zip(candidates, slots) if self.photos.get(c.id) is not None]
        if self.layout == "composite":
            parts = [f"The image shows panels side by side, labelled underneath: panel 1 is the {query_noun}"]
        else:
            parts = [f"Image 1 is the {query_noun}"]
        parts += [f"{word} {i} shows candidate {slot}" for i, (_, slot) in enumerate(with_photo, start=2)]
        layout = ", ".join(parts) + "."
        position = {c.id: i for i, (c, _) in enumerate(with_photo, start=2)}
        lines = {}
        for candidate, slot in zip(candidates, slots):
            where = f"{candidate.place or 'an unnamed place'}, {country_name(candidate.country)} ({candidate.lat:.4f}, {candidate.lon:.4f})"
            if candidate.id in position:
                lines[slot] = f"{noun} ({word} {position[candidate.id]}), taken near {where}"
            else:
                lines[slot] = f"no photo; the place {where}"
        values = {"layout": layout, "candidates": "\n".join(f"Candidate {s}: {lines[s]}" for s in slots), "letters": _letters(slots)}
        values |= {"candidate": lines[slots[0]]} if len(slots) == 1 else {f"candidate_{s.lower()}": lines[s] for s in slots}
        prompt = self.prompts.render(template, **values)
        photos = [self.photos[c.id] for c, _ in with_photo]
        if self.layout == "composite":
            panels = [(self.query.pixels, "query")] + [(p.pixels, s) for p, (_, s) in zip(photos, with_photo)]  # type: ignore[union-attr]
            return prompt, [encode_image(composite(panels, self.max_side), self.max_side)]
        return prompt, [self.query.encoded] + [p.encoded for p in photos]  # type: ignore[union-attr]

    def _ask(self, client: VLMClient, prompt: str, images: list[EncodedImage], schema: type[AnswerT], task: str) -> Awaitable[Answer[AnswerT]]:
        """Ask with the photo's shared prefix first (instructions, then the query image, as every other question of
        the photo opens), then the task's text and the candidates' images. A rendered question's first image is the
        query (separate layout); a composite carries the query inside, so only the instructions are shared."""
        if self.layout == "composite":
            return client.ask(prompt, images, schema, task=task, prefix=photo_prefix(self.prompts, None))
        assert images and images[0] is self.query.encoded, "a rendered question shows the query first"
        return client.ask(prompt, images[1:], schema, task=task, prefix=photo_prefix(self.prompts, self.query.encoded))

    def _template(self, task: str) -> str:
        return f"{task}_cross" if self.view == "cross" else task

    async def _choose(self, first: Candidate, second: Candidate) -> str | None:
        """One ask with ``first`` as A and ``second`` as B; the chosen candidate's id, None if the ask failed."""
        prompt, images = await self._question(self._template("pairwise"), [first, second], ["A", "B"])
        question = self._ask(self.pairwise_client, prompt, images, PairwiseAnswer, "pairwise")
        answer = await self.log.ask(question, "pairwise", f"A={first.id} B={second.id}")
        if answer is None:
            return None
        self.stats.add(answer.stats)
        return first.id if answer.value.choice == "A" else second.id

    async def compare(self, a: Candidate, b: Candidate, round_number: int | None = None) -> Match:
        """Which of ``a`` and ``b`` matches the query better (``round_number``: a tournament's round, for the trace).

        ``debias = true`` asks both orders; ``false`` one, ``a`` first; ``"adaptive"`` one in a random direction
        (seeded by the pair, so reruns hit the cache) — a random slot turns the model's first-position bias into
        noise instead of a systematic lean — and the other order only when the answer is not decisive (see
        :meth:`_decisive`). Disagreement is a tie, and so is a comparison whose every ask failed; when one of two
        asks failed, the other decides — except, in adaptive mode, an answer that overturns a clear evidence lead:
        it stands only when an ask in the other order confirms it, whichever ask produced it (a first ask that
        failed is asked once more for that confirmation), else the tie goes to the evidence.
        """
        first = [a, b] if self.debias != "adaptive" or self._a_first(a, b) else [b, a]
        winner, votes, orders = await self._settle([a, b], first, lambda order: self._choose(*order))
        match = Match(a=a.id, b=b.id, winner=winner, votes=votes, shown_first=[order[0].id for order in orders], round=round_number)
        self.matches.append(match)
        if self.on_event is not None:
            self.on_event(MatchAnswered(match=match))
        return match

    async def _settle(
        self, members: list[Candidate], first: list[Candidate], ask: Callable[[list[Candidate]], Awaitable[str | None]]
    ) -> tuple[str | None, list[str | None], list[list[Candidate]]]:
        """The position-debiasing rule shared by pairs and sets: (winner or None, each ask's vote, each ask's order).

        ``first``: the order of the first ask; the other order is ``first`` rotated by one (for a pair, swapped),
        so the candidate in slot A moves to the last slot. ``true`` asks both orders, ``false`` only ``first``,
        ``"adaptive"`` ``first`` and the rotation only when the answer is not :meth:`_decisive`.
        """
        second = first[1:] + first[:1]
        if self.debias == "adaptive":
            orders = [first]
            votes = [await ask(first)]
            if not self._decisive(votes[0], *members):
                orders.append(second)
                votes.append(await ask(second))
                if votes[0] is None and votes[1] is not None and not self._decisive(votes[1], *members):
                    orders.append(first)  # the lone answer overturns the evidence: confirm it as a first one would be
                    votes.append(await ask(first))
        elif self.debias:
            orders = [first, second]
            votes = list(await asyncio.gather(ask(first), ask(second)))
        else:
            orders = [first]
            votes = [await ask(first)]
        answered = {vote for vote in votes if vote is not None}
        winner = answered.pop() if len(answered) == 1 else None
        if self.debias == "adaptive" and winner is not None and not self._decisive(winner, *members) and votes.count(winner) < 2:
            winner = None  # overturns a clear evidence lead on one answer: unconfirmed, the evidence decides
        return winner, votes, orders

    def _a_first(self, a: Candidate, b: Candidate) -> bool:
        """A coin flip seeded by the query and the pair: the same match shows the same order on every rerun."""
        pair = "|".join(sorted((a.id, b.id)))
        digest = hashlib.sha256(f"{self.query.encoded.sha256}|{pair}".encode()).digest()
        return (digest[0] & 1) == (0 if a.id < b.id else 1)

    def _decisive(self, vote: str | None, *members: Candidate) -> bool:
        """One answer settles a match (or a set) unless it goes against clearly stronger retrieval and prior evidence.

        Where the evidence cannot tell the two apart, one answer (right ~90% of the time for a good VLM) is as
        good as two: on disagreement two would fall back to that same coin-flip evidence. Where the model
        overturns a clear evidence lead, it is asked again in the other order: a repeated verdict stands, a
        reversed one was position bias or noise, and the tie goes to the evidence. In a set, the lead is the
        strongest other member's over the chosen one.
        """
        if vote is None:
            return False
        strongest_other = max(self.base.get(c.id, 0.0) for c in members if c.id != vote)
        lead_against = strongest_other - self.base.get(vote, 0.0)
        return lead_against < self.adaptive_margin

    def best_by_evidence(self, members: Sequence[Candidate]) -> Candidate:
        """The tie-breaker of a set: the member with the most retrieval and prior evidence (the first on a tie)."""
        return max(members, key=lambda c: self.base.get(c.id, 0.0))

    async def _choose_from(self, order: list[Candidate]) -> str | None:
        """One set-wise ask showing ``order`` as A, B, C, ...; the chosen candidate's id, None if the ask failed."""
        slots = list(LETTERS[: len(order)])
        prompt, images = await self._question(self._template("setwise"), order, slots)
        question = self._ask(self.pairwise_client, prompt, images, setwise_answer(len(order)), "setwise")
        answer = await self.log.ask(question, "pairwise", " ".join(f"{s}={c.id}" for s, c in zip(slots, order)))
        if answer is None:
            return None
        self.stats.add(answer.stats)
        return order[slots.index(answer.value.choice)].id

    async def choose_set(self, members: list[Candidate], round_number: int) -> Candidate:
        """Which of ``members`` (best by evidence first) matches the query best: the one that goes on.

        Position bias is handled as :meth:`compare` does (see :meth:`_settle`): ``"adaptive"`` first shows the set
        rotated by a seeded offset (reruns hit the cache), ``true`` and ``false`` in seed order. When no answer
        stands, the best by evidence goes on.
        """
        first = members
        if self.debias == "adaptive":
            shift = self._rotation(members)
            first = members[shift:] + members[:shift]
        winner, votes, orders = await self._settle(members, first, self._choose_from)
        went_on = winner or self.best_by_evidence(members).id
        played = SetMatch(members=[c.id for c in members], winner=winner, went_on=went_on, votes=votes,
                          shown=[[c.id for c in order] for order in orders], round=round_number)
        self.sets.append(played)
        if self.on_event is not None:
            self.on_event(SetAnswered(set=played))
        return next(c for c in members if c.id == went_on)

    def _rotation(self, members: Sequence[Candidate]) -> int:
        """A slot offset seeded by the query and the set: the same set shows the same order on every rerun."""
        ids = "|".join(c.id for c in members)
        digest = hashlib.sha256(f"{self.query.encoded.sha256}|{ids}".encode()).digest()
        return int.from_bytes(digest[:4], "big") % len(members)

    async def winner(self, a: Candidate, b: Candidate, round_number: int | None = None) -> Candidate:
        match = await self.compare(a, b, round_number)
        if match.winner is None:
            return self.prefer(a, b)
        return a if match.winner == a.id else b

    async def score(self, candidate: Candidate) -> float | None:
        """The candidate's 0-10 score, None if the ask failed."""
        prompt, images = await self._question(self._template("pointwise"), [candidate], ["X"])
        question = self._ask(self.pointwise_client, prompt, images, PointwiseAnswer, "pointwise")
        answer = await self.log.ask(question, "pointwise", candidate.id)
        if answer is None:
            return None
        self.stats.add(answer.stats)
        scored = PointwiseScore(id=candidate.id, score=answer.value.score)
        self.scores.append(scored)
        if self.on_event is not None:
            self.on_event(ScoreAnswered(score=scored))
        return answer.value.score


Strategy = Callable[[list[Candidate], Comparator, str], Awaitable[dict[str, float]]]
STRATEGIES: dict[str, Strategy] = {}
#: Strategies scored by a trained model run locally, not by VLM questions: the controller hands them to
#: geoagent.ranker (the optional extra ``ranker``) instead of a Comparator.
MODEL_STRATEGIES = ("georanker",)


def strategy(name: str) -> Callable[[Strategy], Strategy]:
    def register(function: Strategy) -> Strategy:
        STRATEGIES[name] = function
        return function

    return register


@strategy("none")
async def keep_retrieval_order(pool: list[Candidate], comparator: Comparator, method: str) -> dict[str, float]:
    """No VLM: the ranking is retrieval's."""
    return {}


@strategy("pointwise")
async def pointwise(pool: list[Candidate], comparator: Comparator, method: str) -> dict[str, float]:
    """Score each candidate alone (K calls). VLMs calibrate absolute scores poorly: kept as a baseline.

    A candidate whose score failed gets the mean of the others': no vote for or against it.
    """
    scores = await asyncio.gather(*(comparator.score(c) for c in pool))
    known = [s for s in scores if s is not None]
    neutral = sum(known) / len(known) if known else 0.0
    return {c.id: (neutral if s is None else s) / 10 for c, s in zip(pool, scores)}


@strategy("allpairs")
async def allpairs(pool: list[Candidate], comparator: Comparator, method: str) -> dict[str, float]:
    """Every pair in one round (K(K-1)/2 matches; K(K-1) calls with debiasing), scored by Bradley-Terry or Copeland."""
    matches = await asyncio.gather(*(comparator.compare(a, b) for a, b in itertools.combinations(pool, 2)))
    ids = [c.id for c in pool]
    return bradley_terry(ids, matches) if method == "bradley_terry" else copeland(ids, matches)


async def knockout(
    pool: list[Candidate],
    comparator: Comparator,
    deal: Callable[[list[Candidate]], list[list[Candidate]]],
    play: Callable[[list[Candidate], int], Awaitable[Candidate]],
) -> dict[str, float]:
    """A knockout seeded by evidence: each round ``deal`` groups the candidates still in (best seed first; those
    left out have a bye), every group is played at once, and one of each goes on.

    The vote is how far a candidate got: the champion 1, first-round losers lowest.
    """
    alive = sorted(pool, key=lambda c: -comparator.base.get(c.id, 0.0))
    reached: dict[str, int] = {}
    round_number = 0
    while len(alive) > 1:
        round_number += 1
        groups = deal(alive)
        winners = await asyncio.gather(*(play(group, round_number) for group in groups))
        for group, winner in zip(groups, winners):
            for loser in group:
                if loser.id != winner.id:
                    reached[loser.id] = round_number
        alive = [c for c in alive if c.id not in reached]
    if alive:
        reached[alive[0].id] = round_number + 1
    top = max(reached.values(), default=1)
    return {cid: r / top for cid, r in reached.items()}


def _pairs(alive: list[Candidate]) -> list[list[Candidate]]:
    """Best against worst; with an odd number left, the best seed has a bye."""
    contenders = alive[len(alive) % 2 :]
    half = len(contenders) // 2
    return [[a, b] for a, b in zip(contenders[:half], reversed(contenders[half:]))]


def deal_sets(alive: list[Candidate], size: int) -> list[list[Candidate]]:
    """One round's sets of at most ``size``: just enough play that the survivors are a power of ``size``, so every
    later set is full and the whole knockout asks ceil((K-1)/(size-1)) sets. The best seeds have the byes; the
    others are dealt snake-wise (1st, 2nd, ... then back), so the strongest meet as late as they can."""
    n = len(alive)
    survivors = 1
    while survivors * size < n:
        survivors *= size
    full, rest = divmod(n - survivors, size - 1)
    sizes = [size] * full + ([rest + 1] if rest else [])
    players = iter(alive[n - sum(sizes) :])
    groups: list[list[Candidate]] = [[] for _ in sizes]
    left, forward = sum(sizes), True
    while left:
        for g in range(len(sizes)) if forward else reversed(range(len(sizes))):
            if left and len(groups[g]) < sizes[g]:
                groups[g].append(next(players))
                left -= 1
        forward = not forward
    return groups


@strategy("tournament")
async def tournament(pool: list[Candidate], comparator: Comparator, method: str) -> dict[str, float]:
    """Knockout seeded by retrieval evidence, best against worst: K-1 matches in ceil(log2 K) rounds."""
    return await knockout(pool, comparator, _pairs, lambda pair, r: comparator.winner(pair[0], pair[1], r))


@strategy("setwise")
async def setwise(pool: list[Candidate], comparator: Comparator, method: str) -> dict[str, float]:
    """Knockout over sets of ``set_size`` c: one question shows the query and up to c candidates and asks which is
    nearest; about ceil((K-1)/(c-1)) questions in ceil(log_c K) rounds, sets of a round at once.

    c = 2 is the tournament itself: the same questions (prompts, images, cache entries).
    """
    if comparator.set_size <= 2:
        return await tournament(pool, comparator, method)
    return await knockout(pool, comparator, lambda alive: deal_sets(alive, comparator.set_size), comparator.choose_set)


@strategy("sorting")
async def sorting(pool: list[Candidate], comparator: Comparator, method: str) -> dict[str, float]:
    """A full ranking by merge sort with the VLM as comparator (about K log2 K matches); halves sort concurrently."""

    async def merge_sort(items: list[Candidate]) -> list[Candidate]:
        if len(items) <= 1:
            return items
        middle = len(items) // 2
        left, right = await asyncio.gather(merge_sort(items[:middle]), merge_sort(items[middle:]))
        merged: list[Candidate] = []
        while left and right:
            best = await comparator.winner(left[0], right[0])
            merged.append((left if best is left[0] else right).pop(0))
        return merged + left + right

    ordered = await merge_sort(sorted(pool, key=lambda c: -comparator.base.get(c.id, 0.0)))
    return rank_votes([c.id for c in ordered])


def _letters(slots: Sequence[str]) -> str:
    """The letters an answer may name, as a prompt lists them: '"A", "B" or "C"'."""
    quoted = [f'"{slot}"' for slot in slots]
    return " or ".join([", ".join(quoted[:-1]), quoted[-1]]) if len(quoted) > 1 else "".join(quoted)
