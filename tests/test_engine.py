"""The OpenAI-compatible path against a real engine nobody here wrote: ``transformers serve`` running a tiny
random-weight Qwen2-VL built in the test session (no download, no network).

The model's answers are noise; the engine is real: its chat template, its image processor and token counting,
its error bodies, its handling of data-URL images. Each test states the engine behaviour the product relies on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
from PIL import Image

from conftest import run_cli, write_world_config
from engine.server import IGNORED_FIELDS, EngineServer
from engine.tiny_qwen2vl import MAX_PIXELS, MIN_PIXELS, TOKEN_PIXELS, build_tiny_qwen2vl, copy_answering_at_length
from geoagent.agent.answers import PairwiseAnswer
from geoagent.agent.rerank import Photo
from geoagent.config import Settings
from geoagent.errors import AnswerError, BackendError, UnreachableError
from geoagent.images import composite, encode_image
from geoagent.vlm import VLMPool
from geoagent.vlm.context import IMAGE_TOKENS, estimate_prompt_tokens
from geoagent.vlm.parsing import AnswerParseError, parse_answer
from geoagent.vlm.types import ChatMessage, ChatRequest, EncodedImage

pytest_plugins = ("engine.fixtures",)

#: The product's smallest allowed max_tokens: answers are noise anyway, and short noise is fast.
MAX_TOKENS = 16
#: Generous: the first request to a model loads it, and the machine running the tests may be busy.
TIMEOUT_S = 60.0
#: <|vision_start|> and <|vision_end|> around each image's <|image_pad|> run.
VISION_WRAP_TOKENS = 2
PROMPT = "Image 1 is the query photo, image 2 shows candidate A, image 3 shows candidate B. Which matches better?"

#: How a backend kind names the engine's model: (kind, model name prefix).
ROUTES = {"openai": ("openai", ""), "litellm-openai": ("litellm", "openai/")}


def engine_settings(engine: EngineServer, model: Path, route: str = "openai", **profile: object) -> Settings:
    """Settings whose default task goes to the engine's ``model`` through the backend named by ``route``."""
    kind, prefix = ROUTES[route]
    backend = {"kind": kind, "model": f"{prefix}{model}", "base_url": engine.url, "timeout_s": TIMEOUT_S,
               "max_retries": 3, "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05, "max_tokens": MAX_TOKENS,
               **profile}
    return Settings(backends={"engine": backend}, tasks={"default": "engine"}, cache={"enabled": False})


def chat_request(images: list[EncodedImage], prompt: str = PROMPT) -> ChatRequest:
    """One user message as the product builds it: the prompt, then the images in order, and the answer's schema."""
    return ChatRequest(
        messages=(ChatMessage("user", prompt, tuple(images)),),
        schema_name=PairwiseAnswer.__name__,
        schema=PairwiseAnswer.model_json_schema(),
        temperature=0.0,
        seed=0,
        max_tokens=MAX_TOKENS,
    )


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A picture with some structure (a JPEG of flat colour is not what photos look like)."""
    image = Image.effect_noise((width, height), 40 + seed).convert("RGB")
    return Image.blend(image, Image.new("RGB", (width, height), (40 * seed % 255, 120, 200)), 0.5)


def qwen2vl_image_tokens(width: int, height: int, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> int:
    """Qwen2-VL's rule: each side rounded to a multiple of 28, the area brought within [min, max] pixels, then one
    token per 28x28 block (14-pixel patches merged 2x2)."""
    factor = TOKEN_PIXELS
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return (h // factor) * (w // factor)


def expected_image_tokens(images: list[EncodedImage]) -> int:
    return sum(qwen2vl_image_tokens(image.width, image.height) + VISION_WRAP_TOKENS for image in images)


async def prompt_tokens(pool: VLMPool, images: list[EncodedImage]) -> int:
    """What the engine reports as the prompt's size, as the product's backend receives it."""
    completion = await pool.client("engine").backend.complete(chat_request(images))
    return completion.usage.input_tokens


async def chat_once(engine: EngineServer, model: Path) -> None:
    """One plain chat request, which makes an engine that loads on demand load ``model``."""
    client = openai.AsyncOpenAI(base_url=engine.url, api_key="not-needed", max_retries=0, timeout=TIMEOUT_S)
    try:
        await client.chat.completions.create(model=str(model), messages=[{"role": "user", "content": "hello"}],
                                             max_tokens=MAX_TOKENS)
    finally:
        await client.close()


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("route", list(ROUTES))
async def test_requests_reach_the_engine_and_its_noise_comes_back_as_text(route, engine, tiny_qwen2vl):
    """A chat request with an image, sent through the product's backend, is handled by the engine (its log says
    so) and its answer reaches the product as text, with the engine's token accounting."""
    pool = VLMPool(engine_settings(engine, tiny_qwen2vl, route))
    before = engine.requests_received()
    try:
        completion = await pool.client("engine").backend.complete(chat_request([encode_image(photo(224, 224), 768)]))
    finally:
        await pool.aclose()
    assert engine.requests_received() == before + 1
    assert isinstance(completion.text, str) and completion.text.strip()
    assert 0 < completion.usage.output_tokens <= MAX_TOKENS
    assert completion.usage.input_tokens > qwen2vl_image_tokens(224, 224)


async def test_an_engine_that_loads_on_demand_lists_a_model_only_once_it_has_answered_for_it(engine, tiny_qwen2vl, tmp_path):
    """``/v1/models`` of an engine started without a model lists what it has loaded (and its download cache,
    empty on a fresh machine), not what it can serve: a model absent from the listing still answers chat. The
    preflight must trust a chat request over the listing."""
    unloaded = shutil.copytree(tiny_qwen2vl, tmp_path / "never-asked-before")
    client = openai.AsyncOpenAI(base_url=engine.url, api_key="not-needed", max_retries=0, timeout=TIMEOUT_S)
    try:
        listed_before = [model.id async for model in client.models.list()]
        reply = await client.chat.completions.create(
            model=str(unloaded), messages=[{"role": "user", "content": "hello"}], max_tokens=MAX_TOKENS
        )
        listed_after = [model.id async for model in client.models.list()]
    finally:
        await client.close()
    assert str(unloaded) not in listed_before
    assert reply.choices[0].message.content is not None and reply.usage is not None and reply.usage.prompt_tokens > 0
    assert str(unloaded) in listed_after


async def test_the_products_image_order_and_the_composite_layout_are_accepted(engine, tiny_qwen2vl):
    """Query, A, B as three data-URL JPEGs of different sizes, and the same three as one composite picture: the
    engine accepts both and counts every image's tokens (the prompt grows by exactly each image's share)."""
    photos = [Photo.of(photo(w, h, seed=i), 768, label, keep_pixels=True) for i, (w, h, label) in
              enumerate([(640, 480, "query"), (300, 300, "A"), (360, 480, "B")])]
    separate = [p.encoded for p in photos]
    sheet = encode_image(composite([(p.pixels, p.encoded.label) for p in photos], 768), 768)
    pool = VLMPool(engine_settings(engine, tiny_qwen2vl))
    try:
        text_only, with_three, with_sheet = [await prompt_tokens(pool, images) for images in ([], separate, [sheet])]
    finally:
        await pool.aclose()
    assert with_three - text_only == expected_image_tokens(separate)
    assert with_sheet - text_only == expected_image_tokens([sheet])


async def test_prompt_tokens_grow_with_the_number_and_size_of_images_as_qwen2vl_counts(engine, tiny_qwen2vl):
    """``usage.prompt_tokens`` is the engine processor's count: per image, one token per 28x28 pixels after
    Qwen2-VL's resize plus the vision start/end tokens; three images cost three times one. This is the count the
    product's context-window estimate has to match."""
    # The strip (768 x 8 once downscaled) is below Qwen2-VL's minimum area and scaled up; the last is 768 x 576.
    sizes = [(56, 56), (2000, 20), (224, 224), (448, 336), (1000, 750)]
    images = [encode_image(photo(w, h, seed=i), 768) for i, (w, h) in enumerate(sizes)]
    pool = VLMPool(engine_settings(engine, tiny_qwen2vl))
    try:
        text_only = await prompt_tokens(pool, [])
        one_each = [await prompt_tokens(pool, [image]) - text_only for image in images]
        three_largest = await prompt_tokens(pool, [images[-1]] * 3) - text_only
    finally:
        await pool.aclose()
    assert one_each == [expected_image_tokens([image]) for image in images]
    assert one_each == sorted(one_each) and len(set(one_each)) == len(one_each)
    assert (images[-1].width, images[-1].height) == (768, 576) and one_each[-1] == 27 * 21 + VISION_WRAP_TOKENS
    assert three_largest == 3 * one_each[-1]


async def test_the_products_qwen_vl_estimate_is_within_a_fifth_of_the_engines_count_and_never_below(engine, tiny_qwen2vl):
    """The context-window estimate for the qwen-vl family against a real Qwen2-VL processor's count, for 1 and 3
    photos at the product's default size and shapes: per image it may round up but never under-count (a window
    too small cuts the query photo), and the whole prompt's estimate is within 20% of ``usage.prompt_tokens``."""
    shapes = [(1024, 768), (768, 1024), (900, 900)]  # landscape, portrait, square; downscaled to 768 by the product
    images = [encode_image(photo(w, h, seed=i), 768) for i, (w, h) in enumerate(shapes)]
    pool = VLMPool(engine_settings(engine, tiny_qwen2vl))
    try:
        text_only = await prompt_tokens(pool, [])
        counted = {n: await prompt_tokens(pool, images[:n]) for n in (1, 3)}
    finally:
        await pool.aclose()
    for n, total in counted.items():
        estimated_images = sum(IMAGE_TOKENS["qwen-vl"](image.width, image.height) for image in images[:n])
        assert total - text_only <= estimated_images <= 1.2 * (total - text_only), (n, total - text_only, estimated_images)
        estimate = estimate_prompt_tokens(chat_request(images[:n]), "qwen-vl")
        assert abs(estimate - total) <= 0.2 * total, (n, total, estimate)


async def test_response_format_is_accepted_but_not_applied(engine, tiny_qwen2vl):
    """The product always sends a JSON-schema ``response_format``; this engine accepts the request (no 4xx), says
    in its log that it ignores the field, and answers without following the schema: the prompt itself must ask
    for the JSON shape, and the parser must cope with whatever comes back."""
    pool = VLMPool(engine_settings(engine, tiny_qwen2vl))
    try:
        completion = await pool.client("engine").backend.complete(chat_request([]))
    finally:
        await pool.aclose()
    ignored = [line for line in engine.log_text().splitlines() if IGNORED_FIELDS in line]
    assert ignored and all("response_format" in line for line in ignored)
    with pytest.raises(AnswerParseError):
        parse_answer(completion.text, PairwiseAnswer)


@pytest.mark.parametrize(("route", "max_retries", "requests"), [("openai", 3, 2), ("litellm-openai", 3, 2), ("openai", 0, 1)])
async def test_noise_answers_fail_the_question_after_exactly_one_repair_within_the_budget(
    route, max_retries, requests, engine, tiny_qwen2vl
):
    """The tiny model's noise is not JSON: the question is re-asked once with the repair prompt, then given up
    with AnswerError, never costing more than 1 + max_retries requests (with no retry left, no repair is sent)."""
    pool = VLMPool(engine_settings(engine, tiny_qwen2vl, route, max_retries=max_retries))
    client = pool.client("engine")
    image = encode_image(photo(224, 224), 768)
    before = engine.requests_received()
    try:
        with pytest.raises(AnswerError) as failed:
            await client.ask(PROMPT, [image, image, image], PairwiseAnswer)
    finally:
        await pool.aclose()
    stats = failed.value.stats
    assert stats is not None and stats.requests == requests == engine.requests_received() - before
    assert stats.repairs == 1 and stats.requests <= 1 + max_retries
    assert ("after a repair re-ask" if requests == 2 else "no request left for a repair re-ask") in str(failed.value)
    assert "Traceback" not in str(failed.value)


async def test_a_model_the_engine_cannot_load_is_a_500_the_product_reports_as_a_retryable_server_error(engine, tmp_path):
    """Asked for a model it cannot find (offline, nothing cached), the engine answers 500 with a plain-text body,
    not a 404: the product takes it as a server error worth retrying ("gave up after", not a hard failure), names
    the status, and does not hang.

    One attempt (max_retries 0), on a fresh connection: after an unhandled error the engine's server closes the
    connection it answered on, and on a busy machine it may close it only after a quick retry was sent on it,
    which then reads as "connection failed" instead of the 500. Load must not change what this test sees."""
    missing = tmp_path / "no-such-model"
    pool = VLMPool(engine_settings(engine, missing, max_retries=0))
    try:
        with pytest.raises(BackendError) as failed:
            await pool.client("engine").ask("hello", [], PairwiseAnswer)
    finally:
        await pool.aclose()
    assert "gave up after 1 attempt: HTTP 500" in str(failed.value), str(failed.value)


async def test_a_hung_engine_costs_a_question_its_budget_in_timeouts_then_answers_again(engine, tiny_qwen2vl):
    """An engine that accepts connections but answers nothing (paused) fails the question after 1 + max_retries
    timeouts with one clear line; once it resumes, it works through the abandoned requests and answers again.

    Load cannot change the outcome: while paused the engine answers nothing however long it takes, so the short
    timeout only decides how soon the question gives up; the request after the resume gets the generous one (it
    waits behind the abandoned requests, which take what they take on a busy machine)."""
    timeout_s, max_retries = 0.5, 1
    pool = VLMPool(engine_settings(engine, tiny_qwen2vl, timeout_s=timeout_s, max_retries=max_retries))
    patient = VLMPool(engine_settings(engine, tiny_qwen2vl))
    before = engine.requests_received()
    engine.pause()
    try:
        with pytest.raises(BackendError) as failed:
            await pool.client("engine").ask("hello", [], PairwiseAnswer)
    finally:
        engine.resume()
    try:
        engine.wait_received(before + 1 + max_retries, timeout_s=TIMEOUT_S)  # the abandoned requests still run on the engine
        completion = await patient.client("engine").backend.complete(chat_request([]))
    finally:
        await pool.aclose()
        await patient.aclose()
    assert f"gave up after {1 + max_retries} attempts: no answer within {timeout_s:g} s" in str(failed.value)
    assert failed.value.stats is not None and failed.value.stats.requests == 1 + max_retries
    assert completion.usage.input_tokens > 0


async def test_locate_through_the_engine_answers_every_photo_and_lists_each_failed_question(world, engine, tiny_qwen2vl, tmp_path):
    """``geoagent locate`` through the openai backend against the engine: every pairwise question gets noise, is
    repaired once and fails; each photo is still answered (retrieval order), exit 0, no traceback, every failed
    question listed, and every request the run counts reached the engine.

    The model is a fresh copy the engine has never loaded, so its listing does not name it: the preflight
    warns, a chat request vouches for the model, and the run goes on."""
    model = Path(shutil.copytree(tiny_qwen2vl, tmp_path / "not-yet-loaded"))
    backend = {"kind": "openai", "model": str(model), "base_url": engine.url, "max_tokens": MAX_TOKENS,
               "timeout_s": TIMEOUT_S, "max_retries": 1, "retry_backoff_s": 0.01, "max_concurrency": 2}
    config = write_world_config(tmp_path / "g.toml", world, SimpleNamespace(url=engine.url), tmp_path / "cache",
                                backend=backend, strategy="tournament", top_k=3, country_prior=False, reasoning=False)
    photos = [str(q.path) for q in world.queries[:2]]
    before = engine.requests_received()
    proc = await asyncio.to_thread(run_cli, "locate", *photos, "--json", "--explain", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "2 of 2 photos located" in proc.stderr
    assert "the model listing does not name" in proc.stderr and "a chat request worked" in proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["image"] for line in lines] == photos
    for line in lines:
        stats = line["stats"]
        assert stats["failed_questions"] and len(stats["failed_questions"]) == stats["asks"]
        assert all(q["task"] == "pairwise" and "after a repair re-ask" in q["error"] for q in stats["failed_questions"])
        assert stats["vlm_calls"] == 2 * stats["asks"] and stats["input_tokens"] > 0
        retrieval = sorted(line["candidates"], key=lambda c: -c["retrieval_score"])
        assert [c["id"] for c in line["candidates"]] == [c["id"] for c in retrieval]  # no votes: retrieval's order
    probe = 1  # the preflight's chat request
    assert engine.requests_received() - before == probe + sum(line["stats"]["vlm_calls"] for line in lines)


async def test_check_reports_the_empty_listing_as_a_warning_and_the_chat_probe_as_ok(engine, tiny_qwen2vl, tmp_path):
    model = Path(shutil.copytree(tiny_qwen2vl, tmp_path / "fresh"))
    (tmp_path / "geoagent.toml").write_text(
        f'[backends.engine]\nkind = "openai"\nmodel = "{model}"\nbase_url = "{engine.url}"\ntimeout_s = {TIMEOUT_S}\n'
        '[tasks]\ndefault = "engine"\n'
    )
    proc = await asyncio.to_thread(run_cli, "check", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"engine: ok: a chat request to {model}" in proc.stdout
    assert f"warning: backend 'engine': the model listing does not name '{model}'" in proc.stderr


def test_the_tiny_model_is_built_offline_and_deterministically(tiny_qwen2vl, tmp_path):
    """The same seed writes the same files (weights, tokenizer, processor); another seed other weights. Built with
    the hub offline, so no test depends on a download."""
    again = build_tiny_qwen2vl(tmp_path / "again", seed=0)
    other = build_tiny_qwen2vl(tmp_path / "other", seed=1)
    assert folder_digest(again) == folder_digest(tiny_qwen2vl)
    assert (other / "model.safetensors").read_bytes() != (tiny_qwen2vl / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_qwen2vl / "tokenizer.json").read_bytes()


async def test_an_engine_killed_mid_request_makes_the_backend_unavailable_at_once(engine, tiny_qwen2vl, tmp_path):
    """The engine dies (SIGKILL) while generating an answer: the question fails as unreachable (not as a bad
    answer, not after a hang), and the client takes the server out so the next question fails at once without a
    request (a server that never answered this client is probed again later, not waited for). Runs last: the
    engine is restarted for any test after it."""
    slow = copy_answering_at_length(tiny_qwen2vl, tmp_path / "slow")  # every answer runs to max_tokens
    pool = VLMPool(engine_settings(engine, slow, max_retries=1, max_tokens=4000))
    client = pool.client("engine")
    before = engine.requests_received()
    try:
        question = asyncio.create_task(client.ask("hello", [], PairwiseAnswer))
        while engine.requests_received() == before and not question.done():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert not question.done(), "the answer should still be generating"
        engine.kill()
        with pytest.raises(UnreachableError) as failed:
            await question
        with pytest.raises(UnreachableError) as next_failed:
            await client.ask("another question", [], PairwiseAnswer)
    finally:
        await pool.aclose()
    # the dropped request, then a refused connection (nothing sent, so not a request)
    assert "cannot connect" in str(failed.value) and failed.value.stats is not None and failed.value.stats.requests == 1
    assert next_failed.value.stats is not None and next_failed.value.stats.requests == 0
