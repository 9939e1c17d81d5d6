"""The JSON shapes VLMs answer in. These are a public contract: prompt texts vary, these do not."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator

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


class PairwiseAnswer(BaseModel):
    reasoning: str
    choice: Literal["A", "B"]

    @field_validator("choice", mode="before")
    @classmethod
    def _letter(cls, value: object) -> object:
        return value.strip().strip(".").upper() if isinstance(value, str) else value


class PointwiseAnswer(BaseModel):
    reasoning: str
    score: float = Field(ge=0, le=10)
