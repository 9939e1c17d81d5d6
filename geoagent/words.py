"""Counts in user-facing text: ``1 photo``, ``3 photos``."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` with its noun agreeing: ``count(1, "photo")`` is "1 photo"; ``plural`` where adding "s" is wrong."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
