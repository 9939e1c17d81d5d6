"""A stand-in VLM server: real HTTP on 127.0.0.1 speaking Ollama's and OpenAI's chat protocols.

It decodes the images it is sent, hands them with the prompt and the requested JSON schema to a judge that
decides the answer, and misbehaves on request: latency, a bounded parallel capacity whose queue answers 503
when full, and injected 500/503/429 (with Retry-After)/400, hangs, truncated JSON, fenced JSON and prose.
It also models a context window as Ollama and vLLM do: images cost tokens, an Ollama prompt longer than its
``num_ctx`` (or the default context) is cut from the start, and an OpenAI-protocol prompt that does not fit
is refused with a 400. Like OpenAI, it caches prompt prefixes: an OpenAI-protocol reply reports
``usage.prompt_tokens_details.cached_tokens`` for the longest prefix the model read before (from 1,024 tokens, in
128-token steps). It pulls models as Ollama does (``/api/pull`` streams NDJSON progress, layer by layer, from
a registry of the models that exist; ``/api/tags`` lists a pulled model from then on) and serves that registry's
manifests (``/v2/<namespace>/<name>/manifests/<tag>``). Every request is logged so tests can count what was sent.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from geoagent.vlm.context import LOW_DETAIL_TOKENS  # what an OpenAI image sent with detail "low" costs

FAULTS = ("http_503", "http_429", "http_500", "hang", "truncated", "fenced", "prose", "http_400")
#: What an injected HTTP fault says; 400 is the refusal a retry cannot fix.
FAULT_MESSAGES = {503: "server overloaded", 429: "rate limit reached", 500: "internal error", 400: "image could not be processed"}
#: What Ollama streams when the registry has no such model.
PULL_MISSING = "pull model manifest: file does not exist"
#: Characters per text token in the stand-in's token count (a tokenizer's usual ratio for English).
CHARS_PER_TOKEN = 4
#: OpenAI's prompt caching: a repeated prefix of at least this many tokens is cached, counted in steps of
#: PREFIX_CACHE_STEP tokens (OpenAI: 1,024 and 128), and reported as usage.prompt_tokens_details.cached_tokens.
PREFIX_CACHE_MIN = 1024
PREFIX_CACHE_STEP = 128


@dataclass
class Faults:
    """Probabilities per request; at most ``max_per_question`` faults hit any one question (its repairs included)."""

    http_503: float = 0.0
    http_429: float = 0.0
    http_500: float = 0.0
    hang: float = 0.0
    truncated: float = 0.0
    fenced: float = 0.0
    prose: float = 0.0
    http_400: float = 0.0  # "image could not be processed": not transient, the question fails
    retry_after_s: int = 0
    max_per_question: int = 2
    seed: int = 0

    @classmethod
    def mixed(cls, total: float, **kwargs: Any) -> Faults:
        """``total`` spread evenly over 503, 429, 500 and fenced JSON."""
        share = total / 4
        return cls(http_503=share, http_429=share, http_500=share, fenced=share, **kwargs)


@dataclass
class SeenRequest:
    """What the judge gets: the request as the server understood it."""

    protocol: str  # "ollama" | "openai"
    model: str
    prompt: str
    images: list[Image.Image]
    schema: dict[str, Any]
    schema_name: str
    options: dict[str, Any]
    truncated: bool = False  # the prompt was cut to fit the context: what is left may not hold the question
    prompt_tokens: int = 0  # tokens the model read (after any cut)
    cached_tokens: int = 0  # of those, served from the prefix cache (OpenAI protocol)


@dataclass
class LoggedRequest:
    path: str
    status: int
    protocol: str = ""
    schema_name: str = ""
    fault: str = ""
    prompt: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    images: int = 0  # images the chat request carried
    prompt_tokens: int = 0  # the whole prompt's size in the stand-in's token count
    context: int | None = None  # the context window that applied (None: unlimited)
    truncated: bool = False  # the prompt was cut from the start to fit ``context``
    model: str = ""  # the model a pull or show named
    cached_tokens: int = 0  # reported as read from the prefix cache (OpenAI protocol)
    body: bytes = b""  # the request body as received (chat requests, with StandinConfig.keep_bodies)


Judge = Callable[[SeenRequest], dict[str, Any]]
#: Tokens one image costs: a number, or a function of (width, height) for size-dependent encoders.
ImageTokens = int | Callable[[int, int], int]


@dataclass
class StandinConfig:
    models: tuple[str, ...] = ("llava:7b",)
    latency_s: float = 0.0
    capacity: int = 64
    queue: int = 256
    api_key: str | None = None
    hang_s: float = 30.0
    faults: Faults = field(default_factory=Faults)
    context_tokens: int | None = None  # the default context (Ollama without num_ctx; any OpenAI request); None: unlimited
    image_tokens: ImageTokens = 576  # LLaVA 1.5's cost per image
    digests: dict[str, str] = field(default_factory=dict)  # model -> digest in /api/tags (and /v1/models root); "re-pull" by changing it
    refuse_response_format: bool = False  # OpenAI protocol: answer 400 to structured-output requests, as some engines do
    list_models: bool = True  # False: /v1/models lists nothing, as an engine that has not loaded its model yet
    registry: dict[str, tuple[int, ...]] = field(default_factory=dict)  # models a pull can fetch: name -> layer sizes (bytes)
    pull_steps: int = 4  # progress lines per layer of a pull
    pull_line_s: float = 0.0  # wait before each progress line (a download that takes its time)
    hold_show: threading.Event | None = None  # /api/show waits until this is set (a preflight held up, for tests)
    prefix_cache: bool = True  # OpenAI protocol: report cached_tokens for prompt prefixes served before, as OpenAI does
    keep_bodies: bool = False  # keep each chat request's body in the log (tests comparing the bytes sent)

    def digest(self, model: str) -> str:
        return self.digests.get(model, hashlib.sha256(model.encode()).hexdigest())

    def layers(self, model: str) -> tuple[int, ...] | None:
        """The registry's layer sizes of ``model`` (however its name is spelled), or None if it has no such model."""
        wanted = short_name(model)
        return next((sizes for name, sizes in self.registry.items() if short_name(name) == wanted), None)


def short_name(model: str) -> str:
    """``model`` as Ollama resolves it, without its registry host: ``library/`` and ``:latest`` filled in."""
    path, last = model.rsplit("/", 1) if "/" in model else ("", model)
    parts = [p for p in path.split("/") if p][-1:] or ["library"]  # a host before the namespace is dropped
    return f"{parts[0]}/{last if ':' in last else last + ':latest'}"


def layer_digest(model: str, index: int) -> str:
    return "sha256:" + hashlib.sha256(f"{short_name(model)}#{index}".encode()).hexdigest()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    standin: StandinServer


class StandinServer:
    """Start with ``with StandinServer(judge) as server:``; ``server.url`` is the Ollama root, ``server.openai_url`` /v1."""

    def __init__(self, judge: Judge, config: StandinConfig | None = None, port: int = 0) -> None:
        self.judge = judge
        self.config = config or StandinConfig()
        self.log: list[LoggedRequest] = []
        self._lock = threading.Lock()
        self._rng = random.Random(self.config.faults.seed)
        self._faults_by_question: dict[str, int] = {}
        self._busy = 0
        self._prefixes: dict[str, set[str]] = {}  # model -> chained digests of every prompt prefix served
        self.max_busy = 0  # most chat requests in the server at once
        self.killed = False
        self._slots = threading.Semaphore(self.config.capacity)
        self._stopping = threading.Event()
        self._httpd = _Server(("127.0.0.1", port), _Handler)  # a port: restart a stopped server where it was
        self._httpd.standin = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def openai_url(self) -> str:
        return self.url + "/v1"

    def __enter__(self) -> StandinServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def kill(self) -> None:
        """Die as a crashed server does: stop listening, and drop open connections without answering (a
        plain stop leaves keep-alive connections served by their threads)."""
        self.killed = True
        self.__exit__(None, None, None)

    # --- accounting ---------------------------------------------------------------------------------

    def chat_requests(self, schema_name: str | None = None) -> list[LoggedRequest]:
        """Logged chat requests (either protocol), optionally only those asking for ``schema_name``."""
        with self._lock:
            chats = [r for r in self.log if r.path in ("/api/chat", "/v1/chat/completions")]
        return [r for r in chats if schema_name is None or r.schema_name == schema_name]

    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()

    def _record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.log.append(entry)

    def _cached_tokens(self, model: str, segments: list[_Segment]) -> int:
        """OpenAI's prompt caching: the longest prefix (in whole segments) of ``segments`` this model has read before,
        in PREFIX_CACHE_STEP-token steps, when at least PREFIX_CACHE_MIN tokens; then this prompt's prefixes are kept."""
        chain, digests = "", []
        for segment in segments:
            chain = hashlib.sha256(f"{chain}|{segment.role}|{segment.key}".encode()).hexdigest()
            digests.append(chain)
        with self._lock:
            seen = self._prefixes.setdefault(model, set())
            matched = next((i + 1 for i in range(len(digests) - 1, -1, -1) if digests[i] in seen), 0)
            seen.update(digests)
        tokens = sum(segment.tokens for segment in segments[:matched])
        return tokens // PREFIX_CACHE_STEP * PREFIX_CACHE_STEP if tokens >= PREFIX_CACHE_MIN else 0

    def _admit(self) -> bool:
        with self._lock:
            if self._busy >= self.config.capacity + self.config.queue:
                return False
            self._busy += 1
            self.max_busy = max(self.max_busy, self._busy)
            return True

    def _release(self) -> None:
        with self._lock:
            self._busy -= 1

    def _draw_fault(self, question: str) -> str:
        faults = self.config.faults
        with self._lock:
            if self._faults_by_question.get(question, 0) >= faults.max_per_question:
                return ""
            roll = self._rng.random()
            edge = 0.0
            for name in FAULTS:
                edge += getattr(faults, name)
                if roll < edge:
                    self._faults_by_question[question] = self._faults_by_question.get(question, 0) + 1
                    return name
        return ""


_DECODED: OrderedDict[str, Image.Image] = OrderedDict()  # small images by their data, least recently used first
_DECODED_LOCK = threading.Lock()
DECODED_KEEP = 256  # small images kept decoded (a world run asks about ~150 photos: its queries and references)
DECODED_SMALL = 320 * 320  # pixels: what is kept (the world's photos are 320 x 240): at most ~80 MB in all


def _decode_image(data: str) -> Image.Image:
    """The image sent as ``data``. A small one sent again (a query photo in every question about it) is
    decoded once; callers only read it."""
    with _DECODED_LOCK:
        image = _DECODED.get(data)
        if image is not None:
            _DECODED.move_to_end(data)
            return image
    raw = data.split(",", 1)[1] if data.startswith("data:") else data
    image = Image.open(io.BytesIO(base64.b64decode(raw)))
    image.load()
    if image.width * image.height <= DECODED_SMALL:
        with _DECODED_LOCK:
            _DECODED[data] = image
            if len(_DECODED) > DECODED_KEEP:
                _DECODED.popitem(last=False)
    return image


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: without this each reply waits ~40 ms
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr
        pass

    # --- plumbing -----------------------------------------------------------------------------------

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        if self._dead():
            return
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _send_ndjson(self, lines: list[dict[str, Any]]) -> None:
        """A streamed (chunked) application/x-ndjson reply, one JSON object a chunk, as Ollama streams progress."""
        if self._dead():
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for line in lines:
            time.sleep(self.server.standin.config.pull_line_s)
            data = json.dumps(line).encode() + b"\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _error(self, protocol: str, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        if protocol == "ollama":
            self._send_json(status, {"error": message}, headers)
        else:
            kind = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_exceeded"}
            self._send_json(status, {"error": {"message": message, "type": kind.get(status, "server_error"), "param": None, "code": None}}, headers)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        self.raw_body = raw
        return json.loads(raw or b"{}")

    # --- routes -------------------------------------------------------------------------------------

    def _dead(self) -> bool:
        if self.server.standin.killed:
            self.close_connection = True
            return True
        return False

    def do_GET(self) -> None:  # noqa: N802
        if self._dead():
            return
        standin = self.server.standin
        standin._record(LoggedRequest(path=self.path, status=200))
        models = standin.config.models
        if self.path == "/api/version":
            self._send_json(200, {"version": "0.12.0-standin"})
        elif self.path == "/api/tags":
            tags = [{"name": m, "model": m, "size": 0, "digest": standin.config.digest(m), "details": {"family": "llama", "families": ["llama", "clip"]}} for m in models]
            self._send_json(200, {"models": tags})
        elif self.path.startswith("/v2/") and "/manifests/" in self.path:
            self._manifest()
        elif self.path == "/standin/stats":  # for tests driving a stand-in in another process
            self._send_json(200, {"chat_requests": len(standin.chat_requests()), "max_busy": standin.max_busy})
        elif self.path == "/v1/models":
            if not self._authorised("openai"):
                return
            # vLLM names the weights it serves in ``root``
            listing = [{"id": m, "object": "model", "created": 0, "owned_by": "standin", "root": f"/weights/{m}@{standin.config.digest(m)}"} for m in models]
            listing = listing if standin.config.list_models else []
            self._send_json(200, {"object": "list", "data": listing})
        else:
            self._send_json(404, {"error": "404 page not found"})

    def do_POST(self) -> None:  # noqa: N802
        if self._dead():
            return
        standin = self.server.standin
        if self.path == "/api/pull":
            self._pull()
        elif self.path == "/api/show":
            body = self._body()
            name = body.get("model") or body.get("name")
            if standin.config.hold_show is not None:
                standin.config.hold_show.wait()
            standin._record(LoggedRequest(path=self.path, status=200 if name in standin.config.models else 404, model=name or ""))
            if name in standin.config.models:
                self._send_json(200, {
                    "modelfile": "", "parameters": "", "template": "", "modified_at": "2026-01-01T00:00:00Z",
                    "details": {"format": "gguf", "family": "llama", "families": ["llama", "clip"], "parameter_size": "7B", "quantization_level": "Q4_0"},
                    "model_info": {"general.architecture": "llama"}, "capabilities": ["completion", "vision"],
                })
            else:
                self._send_json(404, {"error": f"model '{name}' not found"})
        elif self.path == "/api/chat":
            self._chat("ollama")
        elif self.path == "/v1/chat/completions":
            self._chat("openai")
        else:
            standin._record(LoggedRequest(path=self.path, status=404))
            self._send_json(404, {"error": "404 page not found"})

    def _pull(self) -> None:
        """Ollama's /api/pull: progress lines per layer, then the model is listed; an unknown model is Ollama's error."""
        standin = self.server.standin
        body = self._body()
        name = str(body.get("model") or body.get("name") or "")
        stream = body.get("stream", True)
        layers = standin.config.layers(name)
        standin._record(LoggedRequest(path=self.path, status=200 if layers is not None else 500, model=name))
        if layers is None:
            if stream:  # the stream has begun when the manifest turns out missing: the error is a line of it
                self._send_ndjson([{"status": "pulling manifest"}, {"error": PULL_MISSING}])
            else:
                self._send_json(500, {"error": PULL_MISSING})
            return
        lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        steps = max(1, standin.config.pull_steps)
        for index, size in enumerate(layers):
            digest = layer_digest(name, index)
            lines += [
                {"status": f"pulling {digest[7:19]}", "digest": digest, "total": size, "completed": size * step // steps}
                for step in range(1, steps + 1)
            ]
        lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]
        with standin._lock:
            if name not in standin.config.models:
                standin.config.models = (*standin.config.models, name)
        if stream:
            self._send_ndjson(lines)
        else:
            self._send_json(200, {"status": "success"})

    def _manifest(self) -> None:
        """A registry's manifest (/v2/<namespace>/<name>/manifests/<tag>): the layers a pull would fetch, and their sizes."""
        standin = self.server.standin
        namespace_name, _, tag = self.path[len("/v2/") :].partition("/manifests/")
        model = f"{namespace_name}:{tag}"
        layers = standin.config.layers(model)
        if layers is None:
            self._send_json(404, {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]})
            return
        blob = "application/vnd.ollama.image.model"
        self._send_json(200, {
            "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": layer_digest(model, -1), "size": 0},
            "layers": [{"mediaType": blob, "digest": layer_digest(model, i), "size": size} for i, size in enumerate(layers)],
        })  # fmt: skip

    def _authorised(self, protocol: str) -> bool:
        expected = self.server.standin.config.api_key
        if expected is None or self.headers.get("Authorization") == f"Bearer {expected}":
            return True
        self._error(protocol, 401, "Incorrect API key provided.")
        return False

    def _chat(self, protocol: str) -> None:
        standin = self.server.standin
        entry = LoggedRequest(path=self.path, status=200, protocol=protocol)
        standin._record(entry)  # logged on arrival, so a request still hanging is counted
        self._chat_inner(protocol, entry)

    def _chat_inner(self, protocol: str, entry: LoggedRequest) -> None:
        standin = self.server.standin
        config = standin.config
        body = self._body()
        if not self._authorised(protocol):
            entry.status = 401
            return
        seen, segments = _parse_chat(protocol, body, config.image_tokens)
        if config.keep_bodies:
            entry.body = self.raw_body
        entry.schema_name, entry.prompt, entry.options = seen.schema_name, seen.prompt, seen.options
        entry.images, entry.prompt_tokens = len(seen.images), seen.prompt_tokens
        if seen.model not in config.models:
            entry.status = 404
            if protocol == "ollama":
                self._error(protocol, 404, f'model "{seen.model}" not found, try pulling it first')
            else:
                self._error(protocol, 404, f"The model `{seen.model}` does not exist or you do not have access to it.")
            return
        if protocol == "openai" and config.refuse_response_format and body.get("response_format"):
            entry.status = 400
            self._error(protocol, 400, "response_format is not supported by this model")
            return
        if not seen.schema:  # no structured output asked: a model still reads the JSON shape the prompt names
            seen.schema = _schema_named_in(seen.prompt)
            seen.schema_name = seen.schema.get("title", "")
        if not seen.schema and not seen.images:  # a plain chat, such as a health probe
            self._reply(protocol, seen, "OK")
            return
        context = (seen.options.get("num_ctx") if protocol == "ollama" else None) or config.context_tokens
        entry.context = context
        if context is not None and protocol == "openai":
            wanted = seen.prompt_tokens + int(body.get("max_tokens") or 0)
            if wanted > context:  # vLLM refuses what does not fit, in these words
                entry.status = 400
                self._error(protocol, 400, (
                    f"This model's maximum context length is {context} tokens. However, you requested {wanted} tokens "
                    f"({seen.prompt_tokens} in the messages, {wanted - seen.prompt_tokens} in the completion). "
                    "Please reduce the length of the messages or completion."
                ))
                return
        elif context is not None and seen.prompt_tokens > context:  # Ollama keeps the last num_ctx tokens, silently
            seen = _keep_last(seen, segments, context)
            entry.truncated = True
        if protocol == "openai" and config.prefix_cache and seen.model in config.models:
            seen.cached_tokens = entry.cached_tokens = standin._cached_tokens(seen.model, segments)
        if not standin._admit():
            entry.status, entry.fault = 503, "queue_full"
            self._error(protocol, 503, "server busy, please try again.  maximum pending requests exceeded")
            return
        try:
            with standin._slots:
                if config.latency_s:
                    time.sleep(config.latency_s)
                question = hashlib.sha256(json.dumps(_question_messages(body), sort_keys=True).encode()).hexdigest()
                fault = standin._draw_fault(question)
                entry.fault = fault
                if fault == "hang":
                    standin._stopping.wait(config.hang_s)
                    entry.status = 0
                    return
                if fault.startswith("http_"):
                    status = int(fault[5:])
                    entry.status = status
                    headers = {"Retry-After": str(config.faults.retry_after_s)} if status == 429 else None
                    self._error(protocol, status, FAULT_MESSAGES[status], headers)
                    return
                try:
                    answer = json.dumps(standin.judge(seen))
                except Exception as exc:  # a judge that cannot answer is a server error, as a real one would be
                    entry.status = 500
                    self._error(protocol, 500, f"stand-in judge failed: {exc}")
                    return
                if fault == "truncated":
                    answer = answer[: len(answer) // 2]
                elif fault == "fenced":
                    answer = f"```json\n{answer}\n```"
                elif fault == "prose":
                    answer = f"Looking at the image carefully, here is my answer: {answer} I hope this helps."
                self._reply(protocol, seen, answer)
        finally:
            standin._release()

    def _reply(self, protocol: str, seen: SeenRequest, text: str) -> None:
        prompt_tokens = seen.prompt_tokens
        completion_tokens = max(1, len(text) // CHARS_PER_TOKEN)
        if protocol == "ollama":
            self._send_json(
                200,
                {
                    "model": seen.model,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
                    "message": {"role": "assistant", "content": text},
                    "done": True,
                    "done_reason": "stop",
                    "total_duration": 1_000_000,
                    "load_duration": 1000,
                    "prompt_eval_count": prompt_tokens,
                    "prompt_eval_duration": 1000,
                    "eval_count": completion_tokens,
                    "eval_duration": 1000,
                },
            )
        else:
            self._send_json(
                200,
                {
                    "id": "chatcmpl-standin",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": seen.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {
                        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens,
                        "prompt_tokens_details": {"cached_tokens": seen.cached_tokens},
                    },
                },
            )


_SHAPE = re.compile(r"\{[^{}]*\}\s*\.?\s*$")
_SHAPE_KEY = re.compile(r'"(\w+)"\s*:')


def _schema_named_in(prompt: str) -> dict[str, Any]:
    """The properties of the JSON object a prompt ends by asking for ({"reasoning": ..., "choice": ...})."""
    shape = _SHAPE.search(prompt.strip())
    keys = _SHAPE_KEY.findall(shape.group()) if shape else []
    return {"title": "", "properties": {key: {} for key in keys}} if keys else {}


def _question_messages(body: dict[str, Any]) -> list[Any]:
    """What identifies a question across its retries and repair re-asks: its messages before any reply."""
    messages = body.get("messages", [])
    replied = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
    return messages[:replied]


@dataclass
class _Segment:
    """One run of the prompt as the model reads it: a message's text or one image, with its token cost."""

    role: str
    tokens: int
    text: str = ""
    image: Image.Image | None = None
    key: str = ""  # what identifies it in a prefix: the text, or a digest of the image as sent


def _text(role: str, text: str) -> _Segment:
    return _Segment(role, -(-len(text) // CHARS_PER_TOKEN), text=text, key=text)


def _image(role: str, data: str, cost: ImageTokens, detail: str | None = None) -> _Segment:
    """An image as sent (base64 or a data URL); ``detail: "low"`` (OpenAI) costs LOW_DETAIL_TOKENS whatever its size."""
    image = _decode_image(data)
    tokens = LOW_DETAIL_TOKENS if detail == "low" else cost if isinstance(cost, int) else cost(*image.size)
    key = hashlib.sha256(f"{detail}|{data}".encode()).hexdigest()
    return _Segment(role, tokens, image=image, key=key)


def _parse_chat(protocol: str, body: dict[str, Any], image_tokens: ImageTokens) -> tuple[SeenRequest, list[_Segment]]:
    """The request as the judge sees it (user text and images), and the whole prompt in reading order."""
    segments: list[_Segment] = []
    for message in body.get("messages", []):
        role = message.get("role", "")
        content = message.get("content")
        # Ollama puts a message's images before its text ([img-0] tags); OpenAI keeps the parts' order.
        segments.extend(_image(role, data, image_tokens) for data in message.get("images") or [])
        if isinstance(content, str):
            segments.append(_text(role, content))
        elif isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    segments.append(_text(role, part.get("text", "")))
                elif part.get("type") == "image_url":
                    spec = part["image_url"] if isinstance(part["image_url"], dict) else {"url": part["image_url"]}
                    segments.append(_image(role, spec["url"], image_tokens, spec.get("detail")))
    if protocol == "ollama":
        schema = body.get("format") if isinstance(body.get("format"), dict) else {}
        name = schema.get("title", "")
        options = body.get("options") or {}
    else:
        fmt = body.get("response_format") or {}
        spec = fmt.get("json_schema") or {}
        schema = spec.get("schema") or {}
        name = spec.get("name") or schema.get("title", "")
        options = {k: body[k] for k in ("temperature", "seed", "max_tokens") if k in body}
    seen = SeenRequest(protocol, body.get("model", ""), "", [], schema, name, options)
    return _seen_from(seen, segments), segments


def _seen_from(seen: SeenRequest, segments: list[_Segment]) -> SeenRequest:
    """``seen`` showing what ``segments`` hold: the user's text and images, and the tokens read."""
    user = [s for s in segments if s.role == "user"]
    prompt = "\n".join(s.text for s in user if s.image is None)
    images = [s.image for s in user if s.image is not None]
    return replace(seen, prompt=prompt, images=images, prompt_tokens=sum(s.tokens for s in segments))


def _keep_last(seen: SeenRequest, segments: list[_Segment], context: int) -> SeenRequest:
    """Cut from the start as Ollama does: the model reads the last ``context`` tokens; a partly cut image is lost."""
    kept: list[_Segment] = []
    room = context
    for segment in reversed(segments):
        if room <= 0:
            break
        if segment.tokens <= room:
            kept.append(segment)
        elif segment.image is None:
            kept.append(_Segment(segment.role, room, text=segment.text[-room * CHARS_PER_TOKEN :]))
        room -= segment.tokens
    cut = _seen_from(seen, kept[::-1])
    return replace(cut, truncated=True, prompt_tokens=context)
