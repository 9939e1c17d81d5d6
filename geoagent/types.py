"""Pydantic models that cross the package's boundaries: candidates, priors, guesses, matches, results."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

CandidateSource = Literal["index", "gazetteer", "reasoning"]


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
