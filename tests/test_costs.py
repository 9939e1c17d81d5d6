"""What a photo costs: prompts that providers' prefix caches reuse, cached-token accounting, image detail and size.

Every question of a photo opens with the same bytes (instructions, then the query image), so a provider that
caches repeated prefixes serves them at its cached rate; the stand-in reports cached tokens as OpenAI does.
"""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from conftest import world_settings
from geoagent.agent.controller import GeoAgent
from geoagent.agent.prefix import photo_prefix
from geoagent.config import BackendProfile
from geoagent.errors import GeoAgentError
from geoagent.images import encode_image, open_image
from geoagent.prompts import PromptSet
from geoagent.vlm import ChatMessage, ChatRequest
from geoagent.vlm.backend import TransientError, create_backend
from geoagent.vlm.context import LOW_DETAIL_TOKENS, estimate_prompt_tokens, openai_image_tokens
from standin import StandinConfig, WorldJudge
from standin.server import PREFIX_CACHE_MIN, PREFIX_CACHE_STEP

#: GPT-4o mini's image cost (OpenAI's pricing page: 2,833 tokens base and 5,667 per 512-px tile at high detail).
MINI_BASE, MINI_TILE = 2833, 5667
PRICED_MODEL = "gpt-4o-mini"


def mini_image_tokens(width: int, height: int) -> int:
    return openai_image_tokens(width, height, base=MINI_BASE, tile=MINI_TILE)


async def locate_one(settings, retriever, photo: Path) -> Any:
    agent = GeoAgent(settings, retriever=retriever)
    try:
        return await agent.locate(photo)
    finally:
        await agent.aclose()


def every_task(world, server, tmp_path: Path, route: str, **agent: Any) -> list:
    """Settings that ask every kind of question about one photo: prior, reasoning, and (per strategy) pairwise or pointwise."""
    return [
        world_settings(world, server, tmp_path / "cache", route=route, strategy=strategy, country_prior=True, reasoning=True,
                       reasoning_samples=2, top_k=4, **agent)
        for strategy in ("tournament", "pointwise")
    ]  # fmt: skip


@pytest.mark.parametrize("route", ["ollama", "openai"])
async def test_every_question_of_a_photo_opens_with_the_same_bytes_through_the_query_image(route, world, world_retriever, standin, tmp_path):
    """The request bodies of all of one photo's questions (prior, reasoning samples, pairwise, pointwise) are
    byte-identical from their start through the end of the query image, in both protocols: nothing that depends
    on the task or the candidates comes before it, so a provider's prefix cache can reuse it."""
    server = standin(judge=WorldJudge(world.truth), config=StandinConfig(keep_bodies=True))
    query = world.queries[0]
    for settings in every_task(world, server, tmp_path, route):
        result = await locate_one(settings, world_retriever, query.path)
        assert not result.stats.failed_questions
    chats = server.chat_requests()
    assert {r.schema_name for r in chats} == {"PriorAnswer", "ReasoningAnswer", "PairwiseAnswer", "PointwiseAnswer"}
    encoded = encode_image(open_image(query.path), settings.agent.max_image_side)
    needle = encoded.b64.encode()
    # The prompt as sent: the raw bytes of the body's "messages" array (Ollama's client puts its options and schema
    # before it, OpenAI's after), from its start through the end of the query image.
    starts = [r.body.index(b'"messages":') for r in chats]
    ends = [r.body.index(needle) + len(needle) for r in chats]  # every question carries the query image
    assert len({end - start for start, end in zip(starts, ends)}) == 1, "the query image ends at the same byte of every prompt"
    prefixes = {r.body[start:end] for r, start, end in zip(chats, starts, ends)}
    assert len(prefixes) == 1, "one shared prefix through the query image"
    shared = prefixes.pop().decode()
    instructions = PromptSet().render("instructions")
    assert json.dumps(instructions)[1:-1] in shared  # the instructions come before it
    assert "Candidate" not in shared  # no candidate text before the query image
    # The query stays the first image the model reads: the stand-in's judge finds its marker first in every question.
    assert all(r.images >= 1 for r in chats)


def litellm_price(model: str) -> dict[str, float]:
    """The model's entry in litellm's bundled price table, read here by hand (not through geoagent's pricing)."""
    spec = importlib.util.find_spec("litellm")
    assert spec is not None and spec.origin is not None
    table = json.loads((Path(spec.origin).parent / "model_prices_and_context_window_backup.json").read_text())
    return table[model]


async def test_questions_after_a_photos_first_read_its_prefix_from_the_cache_and_cost_the_cached_rate(world, world_retriever, standin, tmp_path):
    """The issue's must-show: against an OpenAI-speaking stand-in that reports cached_tokens for repeated prefixes of
    at least 1,024 tokens, every question of a photo after its first has cached tokens, stats counts them, and
    cost_usd prices them at litellm's cached rate (computed here by hand from the table)."""
    config = StandinConfig(models=(PRICED_MODEL,), image_tokens=mini_image_tokens)
    server = standin(judge=WorldJudge(world.truth), config=config)
    settings = world_settings(world, server, tmp_path / "cache", route="openai", strategy="tournament", country_prior=True,
                              reasoning=True, reasoning_samples=3, top_k=5)  # fmt: skip
    settings.backends["sim"].model = PRICED_MODEL
    result = await locate_one(settings, world_retriever, world.queries[1].path)
    chats = server.chat_requests()
    assert len(chats) >= 6 and all(r.status == 200 for r in chats)
    assert sorted(r.cached_tokens > 0 for r in chats) == [False] + [True] * (len(chats) - 1), [r.cached_tokens for r in chats]
    assert all(r.cached_tokens >= PREFIX_CACHE_MIN and r.cached_tokens % PREFIX_CACHE_STEP == 0 for r in chats if r.cached_tokens)
    stats = result.stats
    assert stats.vlm_calls == len(chats)
    assert stats.cached_input_tokens == sum(r.cached_tokens for r in chats) > 0
    assert stats.input_tokens == sum(r.prompt_tokens for r in chats)
    price = litellm_price(PRICED_MODEL)
    full, cached, output = price["input_cost_per_token"], price["cache_read_input_token_cost"], price["output_cost_per_token"]
    assert cached < full
    expected = (stats.input_tokens - stats.cached_input_tokens) * full + stats.cached_input_tokens * cached + stats.output_tokens * output
    assert stats.cost_usd == pytest.approx(expected, rel=1e-9)
    assert stats.cost_usd < stats.input_tokens * full + stats.output_tokens * output  # the discount is applied


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _question(prefix: tuple[ChatMessage, ...]) -> ChatRequest:
    return ChatRequest(
        messages=(*prefix, ChatMessage("user", "Candidate A: somewhere\nWhich? {\"choice\": \"A\"}")),
        schema_name="PairwiseAnswer", schema={"type": "object"}, temperature=0.0, seed=0, max_tokens=32,
        prefix_messages=len(prefix),
    )  # fmt: skip


@pytest.mark.parametrize("mark", [True, False])
async def test_litellm_marks_the_shared_prefix_for_anthropic_when_the_profile_asks(mark, world, monkeypatch):
    """With ``cache_control = true`` the payload litellm builds for Anthropic carries cache_control on the query image,
    the prefix's last block (instructions are the system prompt before it); without it, no block is marked. Captured
    by litellm's own pre-call callback; the provider URL is a closed local port, so nothing leaves the machine."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm
    from litellm.integrations.custom_logger import CustomLogger

    payloads: list[dict[str, Any]] = []

    class Capture(CustomLogger):
        def log_pre_api_call(self, model: str, messages: Any, kwargs: dict[str, Any]) -> None:
            payloads.append(kwargs.get("additional_args", {}).get("complete_input_dict") or {})

    monkeypatch.setattr(litellm, "callbacks", [Capture()])
    profile = BackendProfile(kind="litellm", model="anthropic/claude-3-5-haiku-20241022", base_url=f"http://127.0.0.1:{_closed_port()}",
                             api_key_env="GEOAGENT_TEST_KEY", cache_control=mark, timeout_s=5)  # fmt: skip
    monkeypatch.setenv("GEOAGENT_TEST_KEY", "not-a-key")
    backend = create_backend("claude", profile)
    query = encode_image(open_image(world.queries[0].path), 256)
    with pytest.raises((GeoAgentError, TransientError)):
        await backend.complete(_question(photo_prefix(PromptSet(), query)))
    await backend.aclose()
    assert payloads, "litellm built the Anthropic request"
    sent = payloads[-1]
    assert sent["system"][0]["text"] == PromptSet().render("instructions")
    blocks = [block for message in sent["messages"] for block in message["content"]]
    marked = [i for i, block in enumerate(blocks) if "cache_control" in block]
    if mark:
        assert marked == [1] and blocks[1]["type"] == "image" and blocks[1]["cache_control"] == {"type": "ephemeral"}
        assert blocks[1]["source"]["data"] == query.b64  # the query image closes the prefix
        assert "Candidate A" in blocks[2]["text"]  # the task comes after it
    else:
        assert marked == []


async def test_detail_per_image_role_is_sent_and_counted(world, world_retriever, standin, tmp_path):
    """``query_detail`` / ``candidate_detail`` reach the server as image_url.detail per image (the query first, the
    candidates after); a low-detail image costs 85 tokens in the stand-in's count and in the estimate; candidates
    are encoded at ``candidate_image_side``, smaller than the query's ``max_image_side``."""
    server = standin(judge=WorldJudge(world.truth), config=StandinConfig(keep_bodies=True))
    settings = world_settings(world, server, tmp_path / "cache", route="openai", strategy="tournament", top_k=3,
                              max_image_side=512, candidate_image_side=128)  # fmt: skip
    settings.backends["sim"].query_detail = "high"
    settings.backends["sim"].candidate_detail = "low"
    result = await locate_one(settings, world_retriever, world.queries[2].path)
    assert not result.stats.failed_questions
    pairwise = server.chat_requests("PairwiseAnswer")
    assert pairwise
    for request in pairwise:
        body = json.loads(request.body)
        images = [part["image_url"] for m in body["messages"] if isinstance(m["content"], list) for part in m["content"] if part["type"] == "image_url"]
        assert [image["detail"] for image in images] == ["high"] + ["low"] * (len(images) - 1) and len(images) == 3
        text = sum(-(-len(part["text"]) // 4) for m in body["messages"] for part in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}]) if "text" in part)
        assert request.prompt_tokens == text + 576 + 2 * LOW_DETAIL_TOKENS  # the stand-in's 576 for the query, 85 per low one
        sides = [max(_size(image["url"])) for image in images]
        assert sides[0] > 128 and all(side <= 128 for side in sides[1:])


def _size(data_url: str) -> tuple[int, int]:
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).size


def test_the_estimate_counts_low_detail_images_at_85_tokens(world):
    """The token estimate follows the detail sent: a low-detail candidate costs 85 tokens, not its family's count."""
    query = encode_image(open_image(world.queries[0].path), 512)
    candidate = encode_image(open_image(world.queries[1].path), 512, role="candidate")
    request = ChatRequest(messages=(ChatMessage("user", "x", (query, candidate)),), schema_name="s", schema={}, temperature=0.0, seed=0, max_tokens=8)
    full = estimate_prompt_tokens(request, "llava")
    low = estimate_prompt_tokens(request, "llava", {"query": None, "candidate": "low"})
    assert full - low == 576 - LOW_DETAIL_TOKENS
    assert openai_image_tokens(1024, 768) == 85 + 170 * 4 and openai_image_tokens(4000, 300, "low") == 85



def test_eval_reports_tokens_and_cost_per_photo():
    """Eval's summary per column holds input, cached and output tokens and cost, summed and per photo, and the
    report table lists them."""
    from geoagent.eval.metrics import Prediction, summarise
    from geoagent.eval.runner import TABLE_METRICS

    rows = [
        Prediction(path="a", true_lat=0, true_lon=0, error_km=1.0, input_tokens=9000, cached_input_tokens=8000, output_tokens=40, cost_usd=0.002),
        Prediction(path="b", true_lat=0, true_lon=0, error_km=3.0, input_tokens=7000, cached_input_tokens=0, output_tokens=20, cost_usd=0.001),
    ]
    metrics = summarise(rows)
    assert (metrics["input_tokens"], metrics["cached_input_tokens"], metrics["output_tokens"]) == (16000, 8000, 60)
    assert (metrics["input_tokens_per_photo"], metrics["cached_input_tokens_per_photo"], metrics["output_tokens_per_photo"]) == (8000, 4000, 30)
    assert metrics["cost_usd"] == pytest.approx(0.003) and metrics["cost_usd_per_photo"] == pytest.approx(0.0015)
    assert {"cached_input_tokens", "input_tokens_per_photo", "cached_input_tokens_per_photo", "cost_usd_per_photo"} <= set(TABLE_METRICS)
