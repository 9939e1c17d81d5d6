"""Backends against real servers' habits: context windows that cut prompts, re-pulled models, Retry-After, wrong URLs."""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from conftest import settings_for, world_settings
from geoagent.agent.controller import GeoAgent
from geoagent.config import BackendProfile, Settings
from geoagent.errors import BackendError
from geoagent.vlm import VLMPool
from geoagent.vlm.backend import create_backend, record_response, watch_response
from geoagent.vlm.context import ContextWindow, ContextWindowWarning, estimate_prompt_tokens, image_family, llava_next_tokens, qwen_vl_tokens
from geoagent.vlm.types import ChatMessage, ChatRequest, EncodedImage
from standin import Faults, StandinConfig, WorldJudge
from test_agent import locate_all, run_queries, top1
from test_vlm_client import MarkerAnswer, MarkerList


def _image(width: int, height: int) -> EncodedImage:
    return EncodedImage(data=b"", sha256=f"{width}x{height}", width=width, height=height)


def _request(images: int, width: int = 256, height: int = 192, max_tokens: int = 512) -> ChatRequest:
    """A system message of 30 characters and a user message of 300 with ``images`` pictures."""
    user = ChatMessage("user", "q" * 300, tuple(_image(width, height) for _ in range(images)))
    return ChatRequest((ChatMessage("system", "s" * 30), user), "PairwiseAnswer", {}, 0.0, 0, max_tokens)


# --- the estimate --------------------------------------------------------------------------------------


def test_image_costs_follow_each_encoder():
    """LLaVA 1.6 tiles by the best-fitting anyres grid; Qwen-VL spends a token per 28 x 28 pixels."""
    assert llava_next_tokens(768, 576) == 576 * (1 + 4)  # 672 x 672 grid: 4 tiles and the overview
    assert llava_next_tokens(256, 192) == 576 * (1 + 2)  # small: every grid holds it, 336 x 672 wastes least
    assert llava_next_tokens(1000, 250) == 576 * (1 + 3)  # a wide composite: 1008 x 336
    assert qwen_vl_tokens(768, 576) == 28 * 21 + 2


def test_family_comes_from_the_architecture_then_the_name():
    assert image_family("llava:7b") == "llava-next"
    assert image_family("bakllava:latest") == "llava"
    assert image_family("minicpm-v:8b", ["qwen2", "qwen2", "clip"]) == "minicpm-v"
    assert image_family("my-vision-model", ["gemma3"]) == "gemma3"
    assert image_family("hf.co/someone/qwen2.5-vl-7b:Q4") == "qwen-vl"
    assert image_family("something-new") == "llava-next"  # unknown: the largest common encoder


def test_prompt_estimate_and_window_by_hand():
    """Template 32 + system (8 + 30/3) + user (8 + 300/3) + images; the window adds the reply and rounds up to 2048."""
    request = _request(images=3)
    assert estimate_prompt_tokens(request, "llava-next") == 32 + 18 + 108 + 3 * 1728 == 5342
    assert estimate_prompt_tokens(request, "gemma3") == 32 + 18 + 108 + 3 * 256 == 926
    assert ContextWindow("llava:7b").size_for(request) == 6144  # 5342 + 512 = 5854 -> 6144
    assert ContextWindow("gemma3:4b").size_for(request) == 4096  # 1438 -> 2048, but never below 4096


def test_the_window_learns_from_prompt_eval_count_and_never_shrinks():
    window = ContextWindow("llava:7b")
    big, small = _request(images=3), _request(images=1)
    assert window.size_for(big) == 6144
    assert window.size_for(small) == 6144  # 1 image would fit 4096, but a change would reload the model
    assert window.observe(big, 6144, 2000) is False  # fewer than estimated (prompt cache): nothing learnt
    assert window.size_for(big) == 6144
    assert window.observe(big, 6144, 6000) is False  # 12% more than estimated: later prompts scaled up
    assert window.size_for(big) == 8192  # ceil(5342 * 6000 / 5342) + 512 = 6512 -> 8192
    assert window.observe(big, 8192, 8192) is True  # read the whole window: cut
    assert window.size_for(big) == 16384


def test_override_and_the_models_own_limits():
    request = _request(images=3)
    fixed = ContextWindow("llava:7b", override=1024)
    assert fixed.size_for(request) == 1024 and fixed.observe(request, 1024, 1024) is True and fixed.size_for(request) == 1024
    window = ContextWindow("unknown-model")
    window.learn_model("unknown-model", {"family": "gemma3"}, {"general.architecture": "gemma3"}, "num_ctx 8192\nstop <eos>")
    assert window.family == "gemma3" and window.size_for(request) == 8192  # the model's own num_ctx is a floor
    capped = ContextWindow("llava:7b")
    capped.learn_model("llava:7b", {"family": "llama"}, {"general.architecture": "llama", "llama.context_length": 4096}, "")
    assert capped.size_for(request) == 4096  # Ollama would cap at the trained length anyway
    assert capped.observe(request, 6144, 4096) is True  # so a full 4096 is a cut even though 6144 was asked


# --- context over the wire -----------------------------------------------------------------------------


SMALL_CONTEXT = 1800  # holds two 576-token images and the question, not three


@pytest.fixture
def small_context_server(standin, world):
    return standin(judge=WorldJudge(world.truth), config=StandinConfig(capacity=64, context_tokens=SMALL_CONTEXT))


@pytest.mark.parametrize("image_tokens", [576, llava_next_tokens], ids=["llava-1.5", "llava-1.6"])
async def test_a_small_default_context_cuts_nothing_and_reranking_still_lifts_top1(image_tokens, standin, world, world_retriever, tmp_path):
    """Ollama's default context would cut three-image questions; the backend sizes num_ctx so none is cut."""
    config = StandinConfig(capacity=64, context_tokens=SMALL_CONTEXT, image_tokens=image_tokens)
    server = standin(judge=WorldJudge(world.truth), config=config)
    baseline = top1(await locate_all(world, server, world_retriever, tmp_path / "none", strategy="none"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cut may be reported either
        pairs = await locate_all(world, server, world_retriever, tmp_path / "tournament", strategy="tournament")
    pairwise = server.chat_requests("PairwiseAnswer")
    assert pairwise and all(r.images == 3 for r in pairwise)
    assert all(r.prompt_tokens > SMALL_CONTEXT for r in pairwise), "without num_ctx every question would be cut"
    assert not any(r.truncated for r in server.chat_requests())
    assert len({r.options["num_ctx"] for r in pairwise}) == 1, "num_ctx changes reload the model"
    assert top1(pairs) >= baseline + 0.2


async def test_a_prompt_cut_anyway_is_reported_once_with_the_fixes(world, small_context_server, world_retriever, tmp_path):
    """A context_tokens too small is obeyed; the cut shows in prompt_eval_count and is named once, with its fixes."""
    server = small_context_server
    settings = world_settings(world, server, tmp_path, strategy="tournament")
    settings.backends["sim"] = settings.backends["sim"].model_copy(update={"context_tokens": 1024})
    agent = GeoAgent(settings, retriever=world_retriever)
    try:
        with pytest.warns(ContextWindowWarning) as caught:
            pairs = await run_queries(agent, world, limit=3)
    finally:
        await agent.aclose()
    assert len(caught.list) == 1, [str(w.message) for w in caught.list]
    message = str(caught.list[0].message)
    assert "backend 'sim'" in message and "1024" in message
    assert 'image_layout = "composite"' in message and "max_image_side" in message and "context_tokens" in message
    sent = server.chat_requests()
    assert sent and all(r.truncated and r.options["num_ctx"] == 1024 for r in sent)
    assert {r.status for r in sent} == {200}  # the model guessed, as a real one does
    assert len(pairs) == 3


@pytest.mark.parametrize("route", ["openai", "litellm-openai"])
async def test_an_openai_server_refusing_a_long_prompt_names_the_fixes(route, standin, marker_images, tmp_path):
    server = standin(config=StandinConfig(context_tokens=SMALL_CONTEXT))
    pool = VLMPool(settings_for(route, server, tmp_path))
    try:
        assert (await pool.for_task("prior").ask("List the codes.", marker_images[:2], MarkerList)).value.codes == [100, 101]
        with pytest.raises(BackendError) as info:
            await pool.for_task("prior").ask("List the codes.", marker_images[2:5], MarkerList)
    finally:
        await pool.aclose()
    message = str(info.value)
    assert "maximum context length is 1800 tokens" in message
    assert 'image_layout = "composite"' in message and "max_image_side" in message and "larger context" in message
    assert [r.status for r in server.chat_requests()] == [200, 400], "a prompt that cannot fit is not retried"


# --- model identity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["ollama", "openai"])
async def test_model_identity_changes_when_the_model_is_re_pulled(route, standin, tmp_path):
    server = standin()
    backend = create_backend("test", settings_for(route, server, tmp_path).backends["test"])
    try:
        before = await backend.model_identity()
        server.config.digests["llava:7b"] = "f" * 64
        after = await backend.model_identity()
    finally:
        await backend.aclose()
    assert before and after and before != after and "f" * 64 in after


@pytest.mark.parametrize("route", ["ollama", "openai"])
async def test_model_identity_of_an_unknown_model_is_none_and_a_dead_server_an_error(route, standin, tmp_path):
    server = standin()
    settings = settings_for(route, server, tmp_path, model="other:1b")
    backend = create_backend("test", settings.backends["test"])
    try:
        assert await backend.model_identity() is None
    finally:
        await backend.aclose()
    server.__exit__(None, None, None)  # nothing listens there any more
    backend = create_backend("test", settings.backends["test"])
    try:
        with pytest.raises(BackendError, match=r"cannot connect to http://127.0.0.1:\d+"):
            await backend.model_identity()
    finally:
        await backend.aclose()


# --- Retry-After on Ollama (over the wire: test_vlm_client.py::test_retry_after_is_honoured[ollama]) ---


async def test_each_concurrent_request_sees_its_own_response_headers():
    """The hook's record goes to the task that sent the request, however the requests interleave."""

    async def reply(request: httpx.Request) -> httpx.Response:
        wait = int(request.url.path.strip("/"))
        await asyncio.sleep(0.05 * (5 - wait))  # later requests answer first
        return httpx.Response(429, headers={"Retry-After": str(wait)})

    async with httpx.AsyncClient(transport=httpx.MockTransport(reply), event_hooks={"response": [record_response]}) as client:

        async def send(wait: int) -> float | None:
            with watch_response() as seen:
                await client.get(f"http://test/{wait}")
                await asyncio.sleep(0.3)  # the others answer meanwhile
                return seen.retry_after

        assert await asyncio.gather(*(send(wait) for wait in range(5))) == [0, 1, 2, 3, 4]


# --- a web page where the API should be ----------------------------------------------------------------


class _HTMLHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    page = b"<!DOCTYPE html><html><head><title>Router login</title></head><body>Please log in</body></html>"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _page(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.page)))
        self.end_headers()
        self.wfile.write(self.page)

    do_GET = do_POST = _page  # noqa: N815


@pytest.fixture
def html_server() -> Iterator[str]:
    """A server answering every path with 200 and an HTML page, as a proxy or a web app on the wrong port does."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _HTMLHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize(("kind", "suffix", "api"), [("ollama", "", "the Ollama API"), ("openai", "/v1", "an OpenAI-compatible API")])
async def test_an_html_page_at_base_url_is_named_not_a_crash(kind, suffix, api, html_server, marker_images, tmp_path):
    profile = BackendProfile(kind=kind, model="llava:7b", base_url=html_server + suffix, timeout_s=5, max_retries=2)
    expected = rf"backend 'local': {html_server}{suffix} answered with an HTML page, not {api}; is base_url right"
    backend = create_backend("local", profile)
    try:
        with pytest.raises(BackendError, match=expected):
            await backend.check()
        with pytest.raises(BackendError, match=expected):
            await backend.model_identity()
    finally:
        await backend.aclose()
    pool = VLMPool(Settings(backends={"local": profile}, cache={"dir": tmp_path / "cache"}))
    try:
        with pytest.raises(BackendError, match=expected):
            await pool.for_task("pairwise").ask("code?", marker_images[:1], MarkerAnswer)
        assert pool.totals().requests == 1  # not retried: another try gets the same page
    finally:
        await pool.aclose()


async def test_an_html_page_reaches_litellm_users_named_too(html_server, marker_images, tmp_path):
    """litellm quotes the page in a 500; that is still a wrong base_url, not a server worth retrying."""
    profile = BackendProfile(kind="litellm", model="openai/llava:7b", base_url=html_server + "/v1", timeout_s=5, max_retries=2)
    pool = VLMPool(Settings(backends={"local": profile}, cache={"dir": tmp_path / "cache"}))
    try:
        with pytest.raises(BackendError, match=rf"{html_server}/v1 answered with an HTML page, not an OpenAI-compatible API"):
            await pool.for_task("pairwise").ask("code?", marker_images[:1], MarkerAnswer)
        assert pool.totals().requests == 1
    finally:
        await pool.aclose()


@pytest.mark.parametrize("route", ["ollama", "openai"])
async def test_an_injected_400_refuses_the_question_without_retries(route, standin, marker_images, tmp_path):
    """The stand-in's http_400 fault is the refusal no retry fixes: one request, a BackendError naming it."""
    server = standin(config=StandinConfig(faults=Faults(http_400=1.0, max_per_question=1)))
    pool = VLMPool(settings_for(route, server, tmp_path))
    try:
        with pytest.raises(BackendError, match="HTTP 400.*image could not be processed"):
            await pool.for_task("pairwise").ask("code?", marker_images[:1], MarkerAnswer)
    finally:
        await pool.aclose()
    assert [(r.status, r.fault) for r in server.chat_requests()] == [(400, "http_400")]


def test_an_empty_model_listing_is_a_warning_when_a_chat_request_works(world, standin, tmp_path):
    """Engines that list nothing until a model is loaded (transformers serve) must not stop a run."""
    from conftest import run_cli, write_world_config
    from standin import WorldJudge

    server = standin(judge=WorldJudge(world.truth), config=StandinConfig(list_models=False))
    config = write_world_config(tmp_path / "g.toml", world, server, tmp_path / "cache", backend={"kind": "openai", "base_url": server.openai_url}, strategy="tournament")
    proc = run_cli("locate", str(world.queries[0].path), "--json", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "the model listing does not name 'llava:7b' (it lists: nothing)" in proc.stderr and "a chat request worked" in proc.stderr
    check = run_cli("check", "--config", str(config), cwd=tmp_path)
    assert check.returncode == 0 and "sim: ok: a chat request to llava:7b" in check.stdout


def test_a_missing_model_fails_the_chat_probe_too(standin, tmp_path):
    from conftest import run_cli

    server = standin(config=StandinConfig(list_models=False))
    (tmp_path / "geoagent.toml").write_text(f'[backends.local]\nkind = "openai"\nmodel = "llava:13b"\nbase_url = "{server.openai_url}"\n')
    proc = run_cli("check", cwd=tmp_path)
    assert proc.returncode == 1 and "no model 'llava:13b'" in proc.stdout


async def test_a_server_that_refuses_response_format_is_asked_without_it(standin, marker_images, tmp_path):
    """The first refusal costs one more request; later questions go without response_format (the prompt asks
    for the JSON shape), and the answers are right."""
    from pydantic import BaseModel

    class MarkerAnswer(BaseModel):
        code: int

    server = standin(config=StandinConfig(refuse_response_format=True))
    pool = VLMPool(settings_for("openai", server, tmp_path))
    client = pool.for_task("default")
    try:
        for i in range(3):
            answer = await client.ask(f'Which code is drawn? (question {i}) Answer with a JSON object: {{"code": <int>}}', marker_images[i : i + 1], MarkerAnswer)
            assert answer.value.code == 100 + i
    finally:
        await pool.aclose()
    assert [r.status for r in server.chat_requests()] == [400, 200, 200, 200]
