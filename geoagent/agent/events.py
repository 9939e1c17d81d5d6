"""What the agent tells a listener as it works: one small pydantic model per step of :meth:`GeoAgent.locate`.

A listener is a plain callable (``on_event``) handed to ``locate``; it is called on the event loop, so it must
return at once (put the event on a queue, say) and never raise. Without a listener no event is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from geoagent.types import Candidate, CountryScore, Guess, LocateResult, Match, PointwiseScore, SetMatch


class CandidatesRetrieved(BaseModel):
    """Retrieval's candidates, before any VLM reranking."""

    kind: Literal["candidates"] = "candidates"
    candidates: list[Candidate]


class PriorReady(BaseModel):
    """The VLM's country prior."""

    kind: Literal["prior"] = "prior"
    prior: list[CountryScore]


class GuessesReady(BaseModel):
    """The reasoning samples' guesses and their consensus (None when they disagree)."""

    kind: Literal["guesses"] = "guesses"
    guesses: list[Guess]
    consensus: Guess | None = None


class RerankStarted(BaseModel):
    """The pool about to be reranked (retrieval's candidates plus the consensus guess), or why it is not."""

    kind: Literal["rerank"] = "rerank"
    strategy: str
    pool: list[Candidate]
    skipped: str | None = None  # why reranking is skipped (or "off"); None when it runs


class MatchAnswered(BaseModel):
    """One pairwise comparison, decided."""

    kind: Literal["match"] = "match"
    match: Match


class SetAnswered(BaseModel):
    """One set of a set-wise knockout, decided: who went on."""

    kind: Literal["set"] = "set"
    set: SetMatch


class ScoreAnswered(BaseModel):
    """One candidate's pointwise score."""

    kind: Literal["score"] = "score"
    score: PointwiseScore


class Done(BaseModel):
    """The answer, exactly as ``locate`` returns it."""

    kind: Literal["done"] = "done"
    result: LocateResult


AgentEvent = Annotated[
    CandidatesRetrieved | PriorReady | GuessesReady | RerankStarted | MatchAnswered | SetAnswered | ScoreAnswered | Done,
    Field(discriminator="kind"),
]
#: The listener ``GeoAgent.locate(on_event=...)`` calls with each event as it happens.
OnEvent = Callable[[AgentEvent], None]
