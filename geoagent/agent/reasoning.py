"""Chain-of-thought guesses: clues, then a coordinate; several samples reconciled by self-consistency."""

from __future__ import annotations

import asyncio

import numpy as np

from geoagent.agent.answers import ReasoningAnswer
from geoagent.agent.prefix import photo_prefix
from geoagent.agent.questions import QuestionLog
from geoagent.geo import cluster_by_distance, medoid
from geoagent.prompts import PromptSet
from geoagent.types import Candidate, Guess
from geoagent.vlm import CallStats, EncodedImage, VLMClient


def neighbour_block(prompts: PromptSet, candidates: list[Candidate], n: int) -> str:
    """The Img2Loc-style hint: coordinates of the nearest and farthest retrieved references."""
    if n <= 0 or not candidates:
        return ""
    ranked = sorted(candidates, key=lambda c: -(c.retrieval_score or 0.0))

    def lines(chosen: list[Candidate]) -> str:
        return "\n".join(f"- ({c.lat:.4f}, {c.lon:.4f})" for c in chosen)

    return "\n" + prompts.render("reasoning_neighbours", nearest=lines(ranked[:n]), farthest=lines(ranked[-n:][::-1])) + "\n"


async def reason(
    client: VLMClient,
    query: EncodedImage,
    prompts: PromptSet,
    samples: int,
    stats: CallStats,
    log: QuestionLog,
    *,
    neighbours: str = "",
) -> list[Guess]:
    """Up to ``samples`` independent guesses (each its own seed and cache entry); failed samples are left out."""
    prompt = prompts.render("reasoning", neighbours=neighbours)
    prefix = photo_prefix(prompts, query)
    answers = await asyncio.gather(
        *(
            log.ask(client.ask(prompt, [], ReasoningAnswer, task="reasoning", sample=i, prefix=prefix), "reasoning", f"sample {i}")
            for i in range(samples)
        )
    )
    guesses = []
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        stats.add(answer.stats)
        value = answer.value
        guesses.append(
            Guess(lat=value.latitude, lon=value.longitude, country=value.country, confidence=value.confidence, clues=value.clues, sample=i)
        )
    return guesses


def consensus(guesses: list[Guess], radius_km: float) -> Guess | None:
    """Self-consistency: the geographic medoid of the largest cluster of guesses."""
    if not guesses:
        return None
    lat, lon = np.array([g.lat for g in guesses]), np.array([g.lon for g in guesses])
    largest = cluster_by_distance(lat, lon, radius_km)[0]
    return guesses[largest[medoid(lat[largest], lon[largest])]]
