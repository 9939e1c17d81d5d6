"""Answer parsing: what a VLM actually writes around its JSON is tolerated; what is wrong is named."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel

from geoagent.vlm.parsing import AnswerParseError, parse_answer


class Pairwise(BaseModel):
    reasoning: str
    choice: Literal["A", "B"]


@pytest.mark.parametrize(
    "text",
    [
        '{"reasoning": "snow", "choice": "B"}',
        '```json\n{"reasoning": "snow", "choice": "B"}\n```',
        '```\n{"reasoning": "snow", "choice": "B"}\n```',
        'Sure. {"reasoning": "snow", "choice": "B"} Hope that helps!',
        'First {"note": 1} then {"reasoning": "snow", "choice": "B"}',
    ],
)
def test_json_is_found_bare_fenced_or_in_prose(text):
    assert parse_answer(text, Pairwise) == Pairwise(reasoning="snow", choice="B")


def test_truncated_json_is_an_error_quoting_the_reply():
    with pytest.raises(AnswerParseError, match="no JSON object in the reply"):
        parse_answer('{"reasoning": "sn', Pairwise)


def test_schema_violations_name_the_field():
    with pytest.raises(AnswerParseError, match="choice"):
        parse_answer('{"reasoning": "x", "choice": "C"}', Pairwise)
