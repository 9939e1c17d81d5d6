"""Turn a model's reply into a validated answer: bare JSON, JSON in code fences, or JSON amid prose."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

AnswerT = TypeVar("AnswerT", bound=BaseModel)

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


class AnswerParseError(ValueError):
    """The reply holds no JSON object valid for the schema; the message says why, briefly."""


def _json_objects(text: str) -> list[Any]:
    """Every JSON object found in ``text``: whole, inside fences, then embedded in prose."""
    found: list[Any] = []
    candidates = [text.strip(), *(m.group(1).strip() for m in _FENCE.finditer(text))]
    for candidate in candidates:
        try:
            found.append(json.loads(candidate))
        except json.JSONDecodeError:
            continue
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        found.append(value)
    return [value for value in found if isinstance(value, dict)]


def parse_answer(text: str, schema: type[AnswerT]) -> AnswerT:
    """The first JSON object in ``text`` that validates against ``schema``."""
    objects = _json_objects(text)
    if not objects:
        snippet = text.strip().replace("\n", " ")[:80]
        raise AnswerParseError(f"no JSON object in the reply: {snippet!r}")
    first_error: ValidationError | None = None
    for value in objects:
        try:
            return schema.model_validate(value)
        except ValidationError as exc:
            first_error = first_error or exc
    assert first_error is not None
    detail = first_error.errors()[0]
    where = ".".join(str(p) for p in detail["loc"]) or "answer"
    raise AnswerParseError(f"{where}: {detail['msg']}")
