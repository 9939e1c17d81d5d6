"""The JSON shapes VLMs answer in. These are a public contract: prompt texts vary, these do not."""

from __future__ import annotations

import functools
import string
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, create_model, field_validator

from geoagent.geo import country_names


def normalise_country(value: str) -> str:
    """ISO alpha-2 from a code or an English country name ("france" -> "FR"); unknown text is kept upper-cased."""
    text = value.strip()
    if len(text) == 2:
        return text.upper()
    by_name = {name.lower(): code for code, name in country_names().items()}
    return by_name.get(text.lower(), text.upper())


CountryCode = Annotated[str, AfterValidator(normalise_country)]


class CountryProbability(BaseModel):
    code: CountryCode = Field(description="ISO 3166-1 alpha-2 country code")
    probability: float = Field(ge=0.0, le=1.0)


class PriorAnswer(BaseModel):
    countries: list[CountryProbability] = Field(min_length=1)


class ReasoningAnswer(BaseModel):
    clues: list[str]
    country: CountryCode
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)
    confidence: float = Field(ge=0.0, le=1.0)


#: The letters candidates are shown under, in order: A, B, C, ... (so at most 26 in one question).
LETTERS = string.ascii_uppercase


class _Choice(BaseModel):
    """An answer naming one candidate by its letter; " b." reads as "B"."""

    @field_validator("choice", mode="before", check_fields=False)
    @classmethod
    def _letter(cls, value: object) -> object:
        return value.strip().strip(".").upper() if isinstance(value, str) else value


class PairwiseAnswer(_Choice):
    reasoning: str
    choice: Literal["A", "B"]


class SetwiseAnswer(_Choice):
    """Which of the candidates shown is nearest; ``choice`` allows only the letters shown (see :func:`setwise_answer`)."""

    reasoning: str
    choice: str


@functools.cache
def setwise_answer(size: int) -> type[SetwiseAnswer]:
    """The answer model of a question showing ``size`` candidates: a letter not shown fails validation, so the
    client's repair path asks again (and the JSON schema sent to the backend lists exactly the letters shown)."""
    if not 2 <= size <= len(LETTERS):
        raise ValueError(f"a set-wise question shows 2 to {len(LETTERS)} candidates, not {size}")
    letters = Literal[tuple(LETTERS[:size])]  # type: ignore[valid-type]
    return create_model("SetwiseAnswer", __base__=SetwiseAnswer, choice=(letters, ...))


class PointwiseAnswer(BaseModel):
    reasoning: str
    score: float = Field(ge=0, le=10)
