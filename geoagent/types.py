"""Pydantic models that cross the package's boundaries: candidates, priors, guesses, matches, results."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from geoagent.exif import ExifInfo

CandidateSource = Literal["index", "gazetteer", "reasoning", "exif"]


class Candidate(BaseModel):
    """A possible location. ``image_path`` is set when a reference photo stands behind it."""

    id: str
    lat: float
    lon: float
    country: str | None = None
    place: str | None = None
    source: CandidateSource
    retrieval_score: float | None = Field(default=None, description="Cosine similarity to the query, if retrieved.")
    score: float = 0.0
    rank: int = 0
    image_path: str | None = Field(default=None, exclude=True)


class CountryScore(BaseModel):
    """One country of the VLM's prior."""

    country: str
    p: float


class Guess(BaseModel):
    """One reasoning sample: where the VLM thinks the photo was taken, and why."""

    lat: float
    lon: float
    country: str
    confidence: float
    clues: list[str]
    sample: int


class Match(BaseModel):
    """One pairwise comparison; with position debiasing both orders are asked and disagreement is a tie."""

    a: str
    b: str
    winner: str | None  # None: a tie (the answers disagreed, or none came)
    votes: list[str | None]  # the candidate id each ask chose, in the order asked; None: that ask failed
    shown_first: list[str] = Field(default_factory=list)  # the candidate in slot A of each ask, in the order asked
    round: int | None = None  # tournament: the round it was played in (1 = first); other strategies: None

    @property
    def failed(self) -> bool:
        """Every ask failed: no answer at all, which is no tie (the evidence settled it)."""
        return bool(self.votes) and all(vote is None for vote in self.votes)


class SetMatch(BaseModel):
    """One set of a set-wise knockout: the query and several candidates in one question; the nearest goes on.

    Each ask shows the set in some order (slot A first); an answer that overturns a clear evidence lead is
    asked again in a rotated order (``position_debias``). When no answer stands, the set's best by evidence
    goes on (``winner`` None, ``went_on`` says who).
    """

    members: list[str]  # candidate ids, best by retrieval/prior evidence first
    winner: str | None  # the answer that stood; None: the answers disagreed, or none came
    went_on: str  # who went on to the next round: the winner, or else the best by evidence
    votes: list[str | None]  # the candidate id each ask chose, in the order asked; None: that ask failed
    shown: list[list[str]] = Field(default_factory=list)  # each ask's order, slot A first
    round: int = 1  # the knockout round it was played in (1 = first)

    @property
    def failed(self) -> bool:
        """Every ask failed: no answer at all (the evidence settled it)."""
        return bool(self.votes) and all(vote is None for vote in self.votes)


class PointwiseScore(BaseModel):
    id: str
    score: float


class FailedQuestion(BaseModel):
    """A VLM question that failed after its retries: the agent went on without its answer."""

    task: str  # prior | reasoning | pairwise | pointwise
    detail: str  # which question: "sample 2", "A=lyon/1.jpg B=paris/3.jpg"
    error: str


class LocateStats(BaseModel):
    """What one photo cost. ``vlm_calls`` counts requests actually sent (cache hits excluded)."""

    vlm_calls: int = 0
    cache_hits: int = 0
    asks: int = 0
    wall_s: float = 0.0
    input_tokens: int = Field(default=0, description="Prompt tokens of the requests sent, cached ones included.")
    cached_input_tokens: int = Field(default=0, description="Of those, tokens the provider read from its prefix cache (billed at its cached rate).")
    output_tokens: int = 0
    calls_by_task: dict[str, int] = Field(default_factory=dict)
    cost_usd: float | None = Field(default=None, description="US dollars for the requests sent; None if a model's price is unknown.")
    stages: dict[str, str] = Field(default_factory=dict)  # stage -> "ran", "off", or "skipped: why"
    failed_questions: list[FailedQuestion] = Field(default_factory=list)


class Trace(BaseModel):
    """Every stage's inputs and outputs, for --explain and for debugging prompts."""

    strategy: str
    pool: list[str] = Field(default_factory=list)
    submap: dict[str, list[str]] = Field(default_factory=dict)
    guesses: list[Guess] = Field(default_factory=list)
    consensus_guess: Guess | None = None
    matches: list[Match] = Field(default_factory=list)
    sets: list[SetMatch] = Field(default_factory=list)  # setwise: each set asked and who went on
    pointwise: list[PointwiseScore] = Field(default_factory=list)
    rewards: dict[str, float] = Field(default_factory=dict)  # georanker: candidate id -> reward, before fusion
    rewards_without_photo: list[str] = Field(default_factory=list)  # scored from the query photo and coordinates alone
    fusion: dict[str, dict[str, float]] = Field(default_factory=dict)  # candidate id -> term -> value
    prompts: dict[str, str] = Field(default_factory=dict)  # template name -> content hash
    timings_s: dict[str, float] = Field(default_factory=dict)


class ConfidenceFeatures(BaseModel):
    """The evidence behind one answer that says how likely it is to be right; a calibrator maps it to a probability."""

    score: float = Field(description="The uncalibrated confidence: softmax mass of the fused scores near the top.")
    margin: float = Field(description="Fused score of the top candidate minus the second's (0 with one candidate).")
    votes: float = Field(description="The top candidate's vote term: its share of matches won (0 without reranking).")
    retrieval: float = Field(description="The top candidate's retrieval term within the pool, in [0, 1].")
    prior: float = Field(description="The country prior's probability for the top candidate's country (0 without a prior).")
    reasoning: float = Field(description="exp(-distance from the reasoning consensus to the top / bandwidth); 0 without one.")
    near_duplicate: bool = Field(description="The photo is a copy of the top reference photo.")

    def vector(self) -> list[float]:
        return [self.score, self.margin, self.votes, self.retrieval, self.prior, self.reasoning, float(self.near_duplicate)]


class LocateResult(BaseModel):
    """The answer for one photo: a coordinate, where it is, how sure, and the ranked candidates.

    ``confidence`` is the probability that the answer lies within ``confidence_km`` of the truth when
    ``calibrated`` is true (a calibrator fitted by ``geoagent eval --calibrate``); otherwise it is the agent's
    uncalibrated score, which orders answers but is no probability. ``abstained``: the confidence was below
    ``agent.min_confidence``, so there is no coordinate; the best guess is still ``candidates[0]``.
    """

    image: str
    lat: float | None
    lon: float | None
    country: str | None
    place: str | None
    confidence: float
    candidates: list[Candidate]
    calibrated: bool = False
    confidence_km: float = 25.0
    abstained: bool = False
    confidence_features: ConfidenceFeatures | None = None
    prior: list[CountryScore] = Field(default_factory=list)
    match: Literal["near_duplicate"] | None = None  # the answer is a reference photo the query copies
    exif: ExifInfo | None = None  # the photo's own metadata, read before any model ran; None: it carries none
    source: Literal["visual", "exif"] = "visual"  # "exif": answered from EXIF GPS (agent.use_exif), no model ran
    stats: LocateStats = Field(default_factory=LocateStats)
    trace: Trace | None = None
