"""The country prior: which countries the VLM thinks the photo shows, averaged over samples."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from geoagent.agent.answers import PriorAnswer
from geoagent.agent.prefix import photo_prefix
from geoagent.agent.questions import QuestionLog
from geoagent.prompts import PromptSet
from geoagent.types import CountryScore
from geoagent.vlm import CallStats, EncodedImage, VLMClient

MAX_COUNTRIES = 5


async def country_prior(
    client: VLMClient, query: EncodedImage, prompts: PromptSet, samples: int, stats: CallStats, log: QuestionLog
) -> list[CountryScore]:
    """Probabilities per country, averaged over the ``samples`` asks that were answered, most likely first
    (they sum to <= 1); empty when none was."""
    prompt = prompts.render("prior", max_countries=MAX_COUNTRIES)
    prefix = photo_prefix(prompts, query)
    asked = await asyncio.gather(
        *(
            log.ask(client.ask(prompt, [], PriorAnswer, task="prior", sample=i, prefix=prefix), "prior", f"sample {i}")
            for i in range(samples)
        )
    )
    answers = [answer for answer in asked if answer is not None]
    totals: dict[str, float] = defaultdict(float)
    for answer in answers:
        stats.add(answer.stats)
        mass = sum(c.probability for c in answer.value.countries)
        scale = 1 / mass if mass > 1 else 1.0  # models overshoot; never let one sample weigh more than 1
        for entry in answer.value.countries:
            totals[entry.code] += entry.probability * scale / len(answers)
    ranked = sorted(totals.items(), key=lambda item: -item[1])
    return [CountryScore(country=code, p=round(p, 4)) for code, p in ranked]
