"""The VLM layer end to end over real HTTP: every backend through its real client library against the stand-in."""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict

import pytest
from pydantic import BaseModel

from conftest import BACKEND_ROUTES, settings_for
from geoagent.errors import AnswerError, BackendError, ConfigError, UnreachableError
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
        assert answer.stats.requests == 1 and answer.stats.input_tokens > 0 and answer.stats.output_tokens > 0
    finally:
        await pool.aclose()
    expected_path = "/api/chat" if BACKEND_ROUTES[route][2] == "url" else "/v1/chat/completions"
    assert [r.path for r in server.chat_requests()] == [expected_path]  # litellm's ollama_chat/ keeps /api/chat


FAULT_TEST_RETRIES = 1  # small, so that back-to-back faults exhaust it and the per-question bound binds
FAULT_TEST_UNCAPPED = 100  # faults per question the stand-in allows: more than any budget, so only the client stops
FAULT_TEST_MAX_LOST = 0.15  # share of questions given up; about 4% expected (two faults in a row, 0.15 squared, ...)


@pytest.mark.parametrize("route", ROUTES)
async def test_200_concurrent_asks_survive_20_percent_faults(route, standin, marker_images, tmp_path):
    """503s, 429s with Retry-After, 500s, fenced and truncated JSON are absorbed by one retry layer; whatever the
    faults, no question costs more than 1 + max_retries requests (repair re-asks included), a question given up on
    transient errors used exactly that many, and giving up on one question leaves the others answered."""
    faults = Faults(http_503=0.05, http_429=0.05, http_500=0.05, fenced=0.025, truncated=0.025,
                    retry_after_s=0, seed=7, max_per_question=FAULT_TEST_UNCAPPED)
    server = standin(config=StandinConfig(faults=faults))
    settings = settings_for(route, server, tmp_path, max_concurrency=16, max_retries=FAULT_TEST_RETRIES)
    budget = 1 + FAULT_TEST_RETRIES
    pool = VLMPool(settings)
    images = [marker_images[i % len(marker_images)] for i in range(200)]
    prompts = [f"Which code is drawn? (question {i})" for i in range(200)]
    client = pool.for_task("default")
    try:
        answers = await asyncio.gather(
            *(client.ask(p, [img], MarkerAnswer) for p, img in zip(prompts, images)), return_exceptions=True
        )
    finally:
        await pool.aclose()
    sent = server.chat_requests()
    faults_seen = [r.fault for r in sent if r.fault]
    assert len(faults_seen) >= 20, "the stand-in should have injected faults"
    assert {"http_503", "http_429", "http_500", "fenced", "truncated"} <= set(faults_seen)

    # A repair re-ask repeats the question's prompt and appends its own, so the first "(question i)" names it.
    outcomes_by_question: dict[int, list[str]] = defaultdict(list)
    for request in sent:
        outcomes_by_question[int(re.search(r"\(question (\d+)\)", request.prompt).group(1))].append(request.fault or "ok")
    cost = {q: len(seen) for q, seen in outcomes_by_question.items()}
    assert set(cost) == set(range(200))
    assert max(cost.values()) <= budget, {q: seen for q, seen in outcomes_by_question.items() if len(seen) > budget}
    assert max(cost.values()) > 1, "the faults should have forced retries"

    given_up = {i: a for i, a in enumerate(answers) if isinstance(a, BaseException)}
    assert all(isinstance(a, (BackendError, AnswerError)) for a in given_up.values()), given_up
    assert all(cost[i] == budget for i, a in given_up.items() if isinstance(a, BackendError)), "gave up early"
    assert len(given_up) <= len(answers) * FAULT_TEST_MAX_LOST, f"{len(given_up)} of 200 questions lost to 20% faults"
    answered = {i: a for i, a in enumerate(answers) if i not in given_up}
    assert all(a.value.code == int(images[i].label.split("-")[1]) for i, a in answered.items())
    assert any(cost[i] > 1 for i in answered), "some answered question should have survived a fault"
    assert client.totals.requests == len(sent) and client.totals.failures == len(given_up)


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
    assert time.perf_counter() - started >= 1.0  # a lower bound: the wait asked for was kept (load only adds to it)
    assert [r.status for r in server.chat_requests()] == [429, 200]


@pytest.mark.parametrize("route", ROUTES)
async def test_a_hung_request_times_out_and_is_retried(route, standin, marker_images, tmp_path):
    """Every network call has a timeout: a hang costs one timeout, not forever."""
    server = standin(config=StandinConfig(faults=Faults(hang=1.0, max_per_question=1)))
    pool = VLMPool(settings_for(route, server, tmp_path, timeout_s=0.5))
    try:
        assert await ask_codes(pool, marker_images, 1) == [100]
    finally:
        await pool.aclose()
    # The answer came from a second request: the first was abandoned at its timeout (the stand-in would have
    # answered it only after hang_s, 30 s, and then there would be no retry), whatever the machine's load.
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
    """A refused connection is named at once with the fix: nothing was sent, so no request is counted or retried
    (the server is taken out and probed again later; see the recovery tests)."""
    if route.startswith("litellm"):
        import litellm  # noqa: F401  - its first import alone takes seconds: not what this test times
    server = standin()
    settings = settings_for(route, server, tmp_path)
    server.__exit__(None, None, None)  # nothing listens on that port any more
    pool = VLMPool(settings)
    try:
        with pytest.raises(BackendError, match=r"cannot connect to http://127.0.0.1:\d+.*; is .*running there\?") as info:
            await ask_codes(pool, marker_images, 1)
    finally:
        await pool.aclose()
    assert info.value.stats is not None and info.value.stats.requests == 0 and info.value.stats.failures == 1


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
    import asyncio

    from geoagent.vlm.cache import CachedAnswer, SqliteCache
    from geoagent.vlm.types import Usage

    async def write() -> None:
        cache = SqliteCache(directory)
        for i in range(count):
            await cache.put(f"{worker}-{i}", kind="ollama", model="m", task="t", entry=CachedAnswer(answer={"i": i}, usage=Usage()))
        assert cache.stopped is None  # no write failed (a failure would only have been a warning)
        await cache.aclose()

    asyncio.run(write())


def test_several_processes_can_write_the_cache_at_once(tmp_path):
    """Parallel eval runs share one cache: concurrent writers neither fail nor lose entries."""
    import multiprocessing

    import asyncio

    from geoagent.vlm.cache import SqliteCache

    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_entries, args=(str(tmp_path / "cache"), w, 150)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    async def read() -> None:
        cache = SqliteCache(tmp_path / "cache")
        assert (await cache.stats()).entries == 600
        assert (await cache.get("3-149")).answer == {"i": 149}
        await cache.aclose()

    asyncio.run(read())


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


async def test_a_repair_re_ask_spends_from_the_same_budget(standin, marker_images, tmp_path):
    """One question costs at most 1 + max_retries requests, its repair included (503s then bad JSON)."""
    server = standin(config=StandinConfig(faults=Faults(http_503=0.4, truncated=0.4, max_per_question=99, seed=3)))
    pool = VLMPool(settings_for("ollama", server, tmp_path, max_retries=2))
    client = pool.for_task("default")
    prompts = [f"Which code is drawn? (question {i})" for i in range(30)]
    try:
        await asyncio.gather(*(client.ask(p, marker_images[:1], MarkerAnswer) for p in prompts), return_exceptions=True)
    finally:
        await pool.aclose()
    per_question: dict[str, int] = {}
    for request in server.chat_requests():
        question = request.prompt.split("\n")[0]
        per_question[question] = per_question.get(question, 0) + 1
    assert set(per_question) == set(prompts)
    assert max(per_question.values()) == 3, per_question  # the budget is reached, never exceeded
    assert client.totals.repairs > 0


async def test_an_hour_long_retry_after_is_capped(standin, marker_images, tmp_path):
    """A server asking to wait an hour gets retry_after_max_s, not an hour."""
    server = standin(config=StandinConfig(faults=Faults(http_429=1.0, retry_after_s=3600, max_per_question=1)))
    pool = VLMPool(settings_for("openai", server, tmp_path, retry_after_max_s=0.5))
    started = time.perf_counter()
    try:
        # Waiting the hour would hit this guard; the capped wait (0.5 s) is far below it, however busy the machine.
        assert await asyncio.wait_for(ask_codes(pool, marker_images, 1), timeout=120) == [100]
    finally:
        await pool.aclose()
    assert time.perf_counter() - started >= 0.5  # the cap is a wait, not none (a lower bound: load only adds to it)
    assert [r.status for r in server.chat_requests()] == [429, 200]


async def test_cancelling_one_asker_leaves_the_others_their_shared_answer(standin, marker_images, tmp_path):
    """Identical questions share one request; the first asker giving up does not cancel it for the rest."""
    # No fixed sleeps (a busy machine stretches them past the request): the first asker is cancelled once both
    # askers are seen waiting on the one request, which the stand-in holds for 3 s.
    server = standin(config=StandinConfig(latency_s=3.0))
    pool = VLMPool(settings_for("ollama", server, tmp_path))
    client = pool.for_task("default")

    def waiting() -> int:
        return sum(shared.waiting for shared in client._inflight.values())

    try:
        first = asyncio.create_task(client.ask("code?", marker_images[:1], MarkerAnswer))
        second = asyncio.create_task(client.ask("code?", marker_images[:1], MarkerAnswer))
        while waiting() < 2 and not second.done():
            await asyncio.sleep(0.01)
        assert not second.done(), "the request ended before both askers shared it"
        first.cancel()
        answer = await asyncio.wait_for(second, timeout=120)
    finally:
        await pool.aclose()
    assert first.cancelled() and answer.value.code == 100
    assert len(server.chat_requests()) == 1


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


async def wait_until(condition, timeout_s: float = 20.0) -> None:
    """Poll ``condition`` (a bound on waiting, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_a_server_that_goes_down_mid_run_is_waited_for_and_back_for_everyone(standin, marker_images, tmp_path):
    """Recovery instead of a latch: a server that answered, then stops, is taken out and probed with backoff;
    the questions asked meanwhile wait, and once a server listens on that port again one probe puts it back for
    all of them: every one is answered by the same client, with one request each, and its status says it is back."""
    server = standin()
    settings = settings_for("ollama", server, tmp_path, probe_backoff_s=0.05, probe_backoff_max_s=0.2, outage_wait_s=60)
    pool = VLMPool(settings)
    client = pool.for_task("pairwise")
    try:
        assert await ask_codes(pool, marker_images, 1) == [100]
        port = port_of(server)
        server.kill()
        waiting = asyncio.create_task(ask_codes(pool, marker_images[1:6]))
        await wait_until(lambda: not client.status()[0].up)
        await asyncio.sleep(0.5)  # several probes fail meanwhile
        assert not waiting.done() and client.status()[0].down_since is not None
        revived = standin(port=port)
        assert await asyncio.wait_for(waiting, 30) == [101, 102, 103, 104, 105]
    finally:
        await pool.aclose()
    assert len(revived.chat_requests()) == 5 and client.totals.failures == 0
    status = pool.server_status()["test"][0]
    assert status.up and status.back_since is not None and status.answered == 6


async def test_a_server_down_since_the_start_fails_questions_at_once_and_is_still_probed(standin, marker_images, tmp_path):
    """A server that never answered is not waited for: an uncached question fails at once without a request (a
    cached one is still answered), yet the server is probed again, so once it listens the same client is answered."""
    server = standin()
    settings = settings_for("ollama", server, tmp_path, probe_backoff_s=0.05, probe_backoff_max_s=0.1)
    warm = VLMPool(settings)
    try:
        assert await ask_codes(warm, marker_images, 1) == [100]
    finally:
        await warm.aclose()
    port = port_of(server)
    server.kill()
    pool = VLMPool(settings)
    client = pool.for_task("pairwise")
    try:
        with pytest.raises(UnreachableError, match="cannot connect"):
            await client.ask("Which code is drawn?", marker_images[1:2], MarkerAnswer)
        assert client.totals.requests == 0  # a refused connection sends nothing
        assert await ask_codes(pool, marker_images, 1) == [100]  # cached
        revived = standin(port=port)
        answered = None
        for _ in range(100):  # a question arriving before the probe is due still fails at once
            try:
                answered = await client.ask("Which code is drawn?", marker_images[1:2], MarkerAnswer)
                break
            except UnreachableError:
                await asyncio.sleep(0.05)
    finally:
        await pool.aclose()
    assert answered is not None and answered.value.code == 101 and len(revived.chat_requests()) == 1


async def test_an_outage_longer_than_outage_wait_fails_the_waiting_question(standin, marker_images, tmp_path):
    """A question waits for a server that went down mid-run at most outage_wait_s, then fails naming the server,
    even when it is the one probing it (probes due more often than outage_wait_s do not renew its wait)."""
    server = standin()
    settings = settings_for("ollama", server, tmp_path, probe_backoff_s=0.05, probe_backoff_max_s=0.1, outage_wait_s=0.5)
    pool = VLMPool(settings)
    try:
        assert await ask_codes(pool, marker_images, 1) == [100]
        server.kill()
        with pytest.raises(UnreachableError, match=r"cannot connect to http://127.0.0.1:\d+"):
            await ask_codes(pool, marker_images[1:2])
    finally:
        await pool.aclose()


def test_litellm_is_imported_once_off_the_event_loop(tmp_path):
    """Importing litellm takes seconds: it happens in a worker thread during the preflight's check, so the event
    loop keeps running (in a fresh process, where litellm is not imported yet). Checked by the thread that
    imported it, seen by an import hook, not by timing the loop."""
    import subprocess
    import sys

    script = """
import asyncio, importlib.machinery, sys, threading
from geoagent.config import Settings
from geoagent.vlm import VLMPool

importers = []  # for each time litellm's code ran: was it on the main thread (the event loop's)?

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name != "litellm":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        execute = spec.loader.exec_module
        def exec_module(module):  # called by an import only (a find_spec looking for the package is not one)
            importers.append(threading.current_thread() is threading.main_thread())
            execute(module)
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Watch())

async def main():
    pool = VLMPool(Settings(backends={"h": {"kind": "litellm", "model": "openai/x", "base_url": "http://127.0.0.1:9/v1"}}, tasks={"default": "h"}))
    await pool.client("h").backend.check()
    await pool.client("h").backend.check()
    print("litellm" in sys.modules, importers)
asyncio.run(main())
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.stdout.split(maxsplit=1) == ["True", "[False]\n"], proc.stdout + proc.stderr  # once, off the main thread
