"""The VLM layer end to end over real HTTP: every backend through its real client library against the stand-in."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import BaseModel

from conftest import BACKEND_ROUTES, settings_for
from geoagent.errors import AnswerError, BackendError, ConfigError
from geoagent.vlm import VLMPool
from standin import Faults, StandinConfig

ROUTES = list(BACKEND_ROUTES)


class MarkerAnswer(BaseModel):
    code: int


class MarkerList(BaseModel):
    codes: list[int]


async def ask_codes(pool: VLMPool, images, n: int | None = None) -> list[int]:
    client = pool.for_task("pairwise")
    answers = await asyncio.gather(*(client.ask("Which code is drawn?", [img], MarkerAnswer) for img in images[:n]))
    return [a.value.code for a in answers]


@pytest.mark.parametrize("route", ROUTES)
async def test_answers_come_from_the_images_sent_in_order(route, standin, marker_images, tmp_path):
    """Images reach the server intact and in order, and the validated answer reflects them."""
    server = standin()
    pool = VLMPool(settings_for(route, server, tmp_path))
    try:
        answer = await pool.for_task("prior").ask("List the codes.", marker_images[3:6], MarkerList)
        assert answer.value.codes == [103, 104, 105]
        assert answer.stats.requests == 1 and answer.stats.prompt_tokens > 0 and answer.stats.completion_tokens > 0
    finally:
        await pool.aclose()
    expected_path = "/api/chat" if BACKEND_ROUTES[route][2] == "url" else "/v1/chat/completions"
    assert [r.path for r in server.chat_requests()] == [expected_path]  # litellm's ollama_chat/ keeps /api/chat


@pytest.mark.parametrize("route", ROUTES)
async def test_200_concurrent_asks_survive_20_percent_faults(route, standin, marker_images, tmp_path):
    """503s, 429s with Retry-After, 500s and fenced JSON are absorbed by one retry layer, within budget."""
    server = standin(config=StandinConfig(faults=Faults.mixed(0.2, retry_after_s=0, seed=7)))
    settings = settings_for(route, server, tmp_path, max_concurrency=16)
    pool = VLMPool(settings)
    images = [marker_images[i % len(marker_images)] for i in range(200)]
    prompts = [f"Which code is drawn? (question {i})" for i in range(200)]
    client = pool.for_task("default")
    try:
        answers = await asyncio.gather(*(client.ask(p, [img], MarkerAnswer) for p, img in zip(prompts, images)))
    finally:
        await pool.aclose()
    assert [a.value.code for a in answers] == [int(img.label.split("-")[1]) for img in images]
    sent = server.chat_requests()
    faults = [r.fault for r in sent if r.fault]
    assert len(faults) >= 20, "the stand-in should have injected faults"
    assert {"http_503", "http_429", "http_500", "fenced"} <= set(faults)
    assert len(sent) <= 200 * (1 + settings.backends["test"].max_retries)
    assert client.totals.requests == len(sent) and client.totals.failures == 0


@pytest.mark.parametrize("route", ROUTES)
async def test_identical_rerun_is_served_from_cache_and_keeps_no_secret(route, standin, marker_images, tmp_path, monkeypatch):
    """A second identical run sends nothing; the API key never reaches the cache files."""
    secret = "sk-standin-SECRET-0123456789abcdef"
    monkeypatch.setenv("STANDIN_KEY", secret)
    server = standin(config=StandinConfig(api_key=secret))
    settings = settings_for(route, server, tmp_path, api_key_env="STANDIN_KEY")
    first = VLMPool(settings)
    try:
        assert await ask_codes(first, marker_images, 12) == list(range(100, 112))
    finally:
        await first.aclose()
    assert len(server.chat_requests()) == 12
    server.reset_log()

    second = VLMPool(settings)
    try:
        assert await ask_codes(second, marker_images, 12) == list(range(100, 112))
        assert second.totals().cache_hits == 12 and second.totals().requests == 0
    finally:
        await second.aclose()
    assert server.chat_requests() == []
    cache_files = list((tmp_path / "cache").rglob("*"))
    assert cache_files
    for path in cache_files:
        data = path.read_bytes()
        assert secret.encode() not in data and b"STANDIN_KEY" not in data


@pytest.mark.parametrize("route", ["ollama", "openai", "litellm-openai"])
async def test_retry_after_is_honoured(route, standin, marker_images, tmp_path):
    """A 429 with Retry-After: 1 delays the retry by at least a second, then succeeds."""
    server = standin(config=StandinConfig(faults=Faults(http_429=1.0, retry_after_s=1, max_per_question=1)))
    pool = VLMPool(settings_for(route, server, tmp_path))
    started = time.perf_counter()
    try:
        assert await ask_codes(pool, marker_images, 1) == [100]
    finally:
        await pool.aclose()
    assert time.perf_counter() - started >= 1.0
    assert [r.status for r in server.chat_requests()] == [429, 200]


@pytest.mark.parametrize("route", ROUTES)
async def test_a_hung_request_times_out_and_is_retried(route, standin, marker_images, tmp_path):
    """Every network call has a timeout: a hang costs one timeout, not forever."""
    server = standin(config=StandinConfig(faults=Faults(hang=1.0, max_per_question=1)))
    pool = VLMPool(settings_for(route, server, tmp_path, timeout_s=0.5))
    started = time.perf_counter()
    try:
        assert await ask_codes(pool, marker_images, 1) == [100]
    finally:
        await pool.aclose()
    assert time.perf_counter() - started < 10
    assert len(server.chat_requests()) == 2


@pytest.mark.parametrize("route", ROUTES)
async def test_truncated_json_gets_one_repair_then_a_clear_error(route, standin, marker_images, tmp_path):
    """An invalid answer is re-asked once; if the repair is invalid too, the error names the answer type."""
    server = standin(config=StandinConfig(faults=Faults(truncated=1.0, max_per_question=1)))
    pool = VLMPool(settings_for(route, server, tmp_path))
    try:
        answer = await pool.for_task("default").ask("code?", marker_images[:1], MarkerAnswer)
        assert answer.value.code == 100 and answer.stats.repairs == 1 and answer.stats.requests == 2
    finally:
        await pool.aclose()

    broken = standin(config=StandinConfig(faults=Faults(truncated=1.0, max_per_question=99)))
    pool = VLMPool(settings_for(route, broken, tmp_path / "other"))
    try:
        with pytest.raises(AnswerError, match="invalid MarkerAnswer answer after a repair"):
            await pool.for_task("default").ask("code?", marker_images[:1], MarkerAnswer)
    finally:
        await pool.aclose()
    assert len(broken.chat_requests()) == 2


@pytest.mark.parametrize("route", ROUTES)
async def test_persistent_5xx_gives_up_after_max_retries(route, standin, marker_images, tmp_path):
    """Attempts are 1 + max_retries, never multiplied by a client's own retries."""
    server = standin(config=StandinConfig(faults=Faults(http_503=1.0, max_per_question=99)))
    pool = VLMPool(settings_for(route, server, tmp_path, max_retries=2))
    try:
        with pytest.raises(BackendError, match="gave up after 3 attempts"):
            await ask_codes(pool, marker_images, 1)
    finally:
        await pool.aclose()
    assert len(server.chat_requests()) == 3


@pytest.mark.parametrize(
    ("route", "hint"),
    [("ollama", "run `ollama pull llava:13b`"), ("openai", "no model 'llava:13b'"), ("litellm-openai", "no model 'openai/llava:13b'")],
)
async def test_missing_model_fails_fast_with_the_fix(route, hint, standin, marker_images, tmp_path):
    server = standin()
    model = BACKEND_ROUTES[route][1].replace("7b", "13b")
    pool = VLMPool(settings_for(route, server, tmp_path, model=model))
    try:
        with pytest.raises(BackendError, match=hint.replace("(", r"\(").replace("`", "`")):
            await ask_codes(pool, marker_images, 1)
    finally:
        await pool.aclose()
    assert len(server.chat_requests()) == 1


@pytest.mark.parametrize("route", ["openai", "litellm-openai"])
async def test_rejected_key_names_the_variable_not_the_value(route, standin, marker_images, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_KEY", "sk-wrong-key-0123456789")
    server = standin(config=StandinConfig(api_key="sk-right"))
    pool = VLMPool(settings_for(route, server, tmp_path, api_key_env="STANDIN_KEY"))
    try:
        with pytest.raises(BackendError) as info:
            await ask_codes(pool, marker_images, 1)
    finally:
        await pool.aclose()
    assert "STANDIN_KEY" in str(info.value) and "sk-wrong" not in str(info.value)
    assert "HTTP 401" in str(info.value)


@pytest.mark.parametrize("route", ROUTES)
async def test_unreachable_server_fails_fast_and_says_where(route, standin, marker_images, tmp_path):
    server = standin()
    settings = settings_for(route, server, tmp_path)
    server.__exit__(None, None, None)  # nothing listens on that port any more
    pool = VLMPool(settings)
    started = time.perf_counter()
    try:
        with pytest.raises(BackendError, match=r"cannot connect to http://127.0.0.1:\d+.*; is .*running there\?"):
            await ask_codes(pool, marker_images, 1)
    finally:
        await pool.aclose()
    assert time.perf_counter() - started < 3


async def test_a_named_but_unset_key_variable_is_a_config_error(standin, tmp_path):
    server = standin()
    pool = VLMPool(settings_for("openai", server, tmp_path, api_key_env="GEOAGENT_TEST_UNSET_KEY"))
    with pytest.raises(ConfigError, match="environment variable GEOAGENT_TEST_UNSET_KEY is not set"):
        pool.for_task("default")


async def test_concurrency_is_capped_per_profile(standin, marker_images, tmp_path):
    """At most max_concurrency requests are in the server at once."""
    server = standin(config=StandinConfig(latency_s=0.05))
    pool = VLMPool(settings_for("ollama", server, tmp_path, max_concurrency=4))
    try:
        assert await ask_codes(pool, marker_images, 24) == list(range(100, 124))
    finally:
        await pool.aclose()
    assert server.max_busy == 4


async def test_identical_concurrent_asks_share_one_request(standin, marker_images, tmp_path):
    server = standin(config=StandinConfig(latency_s=0.05))
    pool = VLMPool(settings_for("ollama", server, tmp_path))
    client = pool.for_task("default")
    try:
        answers = await asyncio.gather(*(client.ask("code?", marker_images[:1], MarkerAnswer) for _ in range(10)))
    finally:
        await pool.aclose()
    assert {a.value.code for a in answers} == {100}
    assert len(server.chat_requests()) == 1
    assert client.totals.asks == 10 and client.totals.requests == 1


async def test_samples_are_distinct_questions_with_distinct_seeds(standin, marker_images, tmp_path):
    server = standin()
    pool = VLMPool(settings_for("ollama", server, tmp_path, seed=5))
    client = pool.for_task("default")
    try:
        for sample in range(3):
            await client.ask("code?", marker_images[:1], MarkerAnswer, sample=sample)
        await client.ask("code?", marker_images[:1], MarkerAnswer, sample=1)  # cached
    finally:
        await pool.aclose()
    assert [r.options["seed"] for r in server.chat_requests()] == [5, 6, 7]


async def test_tasks_route_to_their_own_profiles(standin, marker_images, tmp_path):
    """The prior can go to one server while pairwise goes to another."""
    hosted, local = standin(), standin()
    settings = settings_for("openai", hosted, tmp_path)
    settings.backends["local"] = settings_for("ollama", local, tmp_path).backends["test"]
    settings.tasks.pairwise = "local"
    pool = VLMPool(settings)
    try:
        await pool.for_task("prior").ask("code?", marker_images[:1], MarkerAnswer)
        await pool.for_task("pairwise").ask("code?", marker_images[1:2], MarkerAnswer)
    finally:
        await pool.aclose()
    assert [r.protocol for r in hosted.chat_requests()] == ["openai"]
    assert [r.protocol for r in local.chat_requests()] == ["ollama"]


def _write_entries(directory: str, worker: int, count: int) -> None:
    from geoagent.vlm.cache import CachedAnswer, ResponseCache
    from geoagent.vlm.types import Usage

    cache = ResponseCache(directory)
    for i in range(count):
        cache.put_sync(f"{worker}-{i}", kind="ollama", model="m", task="t", entry=CachedAnswer(answer={"i": i}, usage=Usage()))
    cache.close()


def test_several_processes_can_write_the_cache_at_once(tmp_path):
    """Parallel eval runs share one cache: concurrent writers neither fail nor lose entries."""
    import multiprocessing

    from geoagent.vlm.cache import ResponseCache

    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_entries, args=(str(tmp_path / "cache"), w, 150)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    cache = ResponseCache(tmp_path / "cache")
    assert cache.stats().entries == 600
    assert cache.get_sync("3-149").answer == {"i": 149}
    cache.close()


async def test_a_server_echoing_the_key_never_puts_it_in_an_error(standin, marker_images, tmp_path, monkeypatch):
    secret = "sk-echoed-0123456789abcdef"
    monkeypatch.setenv("STANDIN_KEY", secret)

    def echo(seen):  # a misbehaving server: its error text repeats what it was sent
        raise ValueError(f"bad request with key {secret}")

    server = standin(judge=echo)
    pool = VLMPool(settings_for("openai", server, tmp_path, api_key_env="STANDIN_KEY", max_retries=0))
    try:
        with pytest.raises(BackendError) as info:
            await ask_codes(pool, marker_images, 1)
    finally:
        await pool.aclose()
    assert secret not in str(info.value) and "[redacted]" in str(info.value)
