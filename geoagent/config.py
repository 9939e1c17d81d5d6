"""Settings: named backend profiles, task routing, cache, retrieval and agent options.

Precedence, highest first: explicit overrides (CLI flags) > environment (``GEOAGENT_...``, nested
with ``__``) > the TOML file (``--config FILE`` or ``./geoagent.toml``) > defaults.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from geoagent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG_FILE = Path("geoagent.toml")
TASKS = ("prior", "reasoning", "pairwise", "pointwise")


class _Section(BaseModel):
    # hide_input_in_errors: a value (a key pasted in the wrong place, say) never reaches an error's text
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)


_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")
MIN_TOKEN_CHARS = 16  # [serve] token_env: shorter tokens are refused
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_PREFIX = re.compile(r"^((sk|pk|rk|hf|gsk|xai|ghp|gho|github_pat|glpat)[-_]|AIza|AKIA)")  # as providers issue them
KEY_SHAPED_MIN_LENGTH = 20  # variable names are words; keys are long runs of mixed letters and digits


def looks_like_a_key(value: str) -> bool:
    """True for a secret pasted where a variable's NAME belongs: not a valid name, or a long token
    (a provider's key prefix, or letters of both cases mixed with digits)."""
    if not _ENV_NAME.fullmatch(value):
        return True
    if len(value) < KEY_SHAPED_MIN_LENGTH or not any(c.isdigit() for c in value):
        return False
    mixed_case = any(c.islower() for c in value) and any(c.isupper() for c in value)
    return mixed_case or bool(_KEY_PREFIX.match(value))


def a_variable_name(value: str, secret: str, noun: str, example: str) -> str:
    """``value`` if it is empty or the NAME of an environment variable; ValueError (not showing it) if it looks
    like ``secret`` itself pasted in its place."""
    if value and looks_like_a_key(value):
        raise ValueError(
            f"this looks like {secret}, not the NAME of an environment variable (the value is not shown); "
            f"remove it, put {noun} in a variable (export {example}=...) and write that variable's name here"
        )
    return value


def _check_url(value: str) -> str:
    """A server URL must say where: ``http(s)://host[:port][/path]``."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not a URL (expected http://HOST:PORT, e.g. http://127.0.0.1:11434)")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError("not a URL: its port is not a number (expected http://HOST:PORT)") from None
    return value.strip()


class ServerConfig(_Section):
    """One server of a profile (``[[backends.NAME.servers]]``): the same model, another machine or GPU."""

    url: str = Field(description="The server's URL, as base_url would give it (http://gpu1:11434, http://gpu2:8000/v1).")
    max_concurrency: int | None = Field(
        default=None, ge=1, le=1024, description="Requests in flight at once on this server; unset: the profile's max_concurrency."
    )

    @field_validator("url")
    @classmethod
    def _a_url(cls, value: str) -> str:
        return _check_url(value)


class BackendProfile(_Section):
    """One named VLM endpoint: which client, which model, where, and how hard to push it."""

    kind: str = Field(default="ollama", description="ollama | openai | litellm (a module in geoagent/vlm/backends/)")
    model: str = Field(default="llava:7b", description="The model name as the server lists it (`ollama list`, /v1/models).")
    base_url: str | list[str] | None = Field(
        default=None,
        description="Server URL; unset: the client's default (Ollama: http://127.0.0.1:11434). A list of URLs "
        "spreads the profile's questions over several servers of the same model (see also servers).",
    )
    servers: list[ServerConfig] = Field(
        default_factory=list,
        description="Several servers of the same model, each with its own url and max_concurrency "
        "([[backends.NAME.servers]] tables); instead of base_url.",
    )
    outage_wait_s: float = Field(
        default=60.0, ge=0,
        description="How long questions wait for servers that went down mid-run to come back (probed with backoff), "
        "counted from when they went down; past that they fail at once while the probes go on. A server down since "
        "the start is probed but not waited for.",
    )
    probe_backoff_s: float = Field(default=0.5, gt=0, description="First wait before a server taken out is probed again; doubles per failed probe.")
    probe_backoff_max_s: float = Field(default=10.0, gt=0, description="The longest wait between two probes of a server taken out.")
    take_out_after: int = Field(
        default=3, ge=1, le=100,
        description="Failures in a row (5xx, timeouts, dropped connections) after which one of several servers is "
        "taken out and probed later; a refused connection takes it out at once. A lone server is only taken out when unreachable.",
    )
    api_key_env: str = Field(default="", description="NAME of the environment variable holding the API key.")
    max_concurrency: int = Field(
        default=4, ge=1, le=1024, description="Requests in flight at once to each server of this profile (Ollama: up to OLLAMA_NUM_PARALLEL)."
    )
    timeout_s: float = Field(default=120.0, gt=0, description="Seconds one request may take, queueing at the server included.")
    max_retries: int = Field(
        default=4, ge=0, le=20, description="Retries of a request on connection errors, timeouts and HTTP 408/409/429/5xx."
    )
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="Sampling temperature sent with every question.")
    seed: int = Field(default=0, description="Sampling seed; sample i of a question uses seed + i.")
    max_tokens: int = Field(default=512, ge=16, description="The most tokens an answer may have.")
    retry_backoff_s: float = Field(default=0.5, ge=0, description="First backoff; doubles per attempt, with jitter.")
    retry_backoff_max_s: float = Field(default=30.0, ge=0, description="The longest backoff between two attempts.")
    retry_after_max_s: float = Field(
        default=60.0, ge=0, description="The longest server-requested wait (Retry-After) honoured, as the openai SDK."
    )
    price_per_1k_prompt_tokens: float | None = Field(
        default=None, ge=0, description="US dollars per 1,000 prompt tokens; unset: litellm's bundled price table, where it lists the model."
    )
    price_per_1k_completion_tokens: float | None = Field(
        default=None, ge=0, description="US dollars per 1,000 answer tokens; unset: litellm's bundled price table."
    )
    price_per_1k_cached_input_tokens: float | None = Field(
        default=None,
        ge=0,
        description=(
            "US dollars per 1,000 prompt tokens the provider read from its prefix cache (used with price_per_1k_prompt_tokens); "
            "unset: those cost price_per_1k_prompt_tokens, or litellm's table's cached rate when the profile sets no price."
        ),
    )
    context_tokens: int | None = Field(
        default=None, ge=256, description="Ollama num_ctx to send; unset: sized to each prompt, only ever growing."
    )
    query_detail: Literal["auto", "low", "high"] | None = Field(
        default=None,
        description=(
            "openai and litellm backends: image_url.detail sent with the query photo (OpenAI: low = 85 tokens at 512 px, "
            "high = 85 + 170 per 512-px tile); unset: not sent (the provider's default, auto)."
        ),
    )
    candidate_detail: Literal["auto", "low", "high"] | None = Field(
        default=None,
        description="openai and litellm backends: image_url.detail sent with candidates' photos (and composites); unset: not sent.",
    )
    cache_control: bool = Field(
        default=False,
        description=(
            "litellm backend: mark the end of the prefix every question of a photo shares (instructions, then the query "
            "image) with cache_control: {type: ephemeral}, which Anthropic needs to cache it (OpenAI caches without a mark)."
        ),
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from geoagent.vlm.backend import backend_kinds

        if value not in backend_kinds():
            raise ValueError(f"unknown backend kind '{value}' (known: {', '.join(backend_kinds())})")
        return value

    @field_validator("base_url")
    @classmethod
    def _urls(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty list of servers (give at least one URL, or leave base_url unset)")
            return [_check_url(url) for url in value]
        return _check_url(value) if value is not None else None

    @model_validator(mode="after")
    def _one_way_to_name_servers(self) -> BackendProfile:
        if self.servers and self.base_url is not None:
            raise ValueError("give either base_url or [[servers]] tables, not both")
        urls = [server.url for server in self.servers] if self.servers else self.base_url if isinstance(self.base_url, list) else []
        twice = sorted({url for url in urls if urls.count(url) > 1})
        if twice:
            raise ValueError(f"server {twice[0]} is named twice")
        return self

    def server_list(self) -> list[tuple[str | None, int]]:
        """Every server of this profile: (its URL, None for the client's default; its request slots)."""
        if self.servers:
            return [(s.url, s.max_concurrency or self.max_concurrency) for s in self.servers]
        if isinstance(self.base_url, list):
            return [(url, self.max_concurrency) for url in self.base_url]
        return [(self.base_url, self.max_concurrency)]

    def total_concurrency(self) -> int:
        """Requests of this profile in flight at once over all its servers."""
        return sum(slots for _, slots in self.server_list())

    def for_server(self, url: str | None, slots: int) -> BackendProfile:
        """This profile narrowed to one of its servers: what a backend, which talks to one server, is given."""
        return self.model_copy(update={"base_url": url, "servers": [], "max_concurrency": slots})

    @field_validator("api_key_env")
    @classmethod
    def _a_name_not_a_key(cls, value: str) -> str:
        return a_variable_name(value, "an API key", "the key", "OPENAI_API_KEY")

    def api_key(self, profile_name: str) -> str | None:
        """The key from the named environment variable; a clear error if it is named but unset."""
        if not self.api_key_env:
            return None
        value = os.environ.get(self.api_key_env)
        if not value:
            raise ConfigError(
                f"backend '{profile_name}': environment variable {self.api_key_env} is not set "
                f"(api_key_env names it); export {self.api_key_env}=<your key>"
            )
        return value


class TasksConfig(_Section):
    """Which backend profile serves which task; unset tasks fall back to ``default``."""

    default: str = Field(default="local", description="The profile serving every task not routed below.")
    prior: str | None = Field(default=None, description="The profile asking the country prior; unset: default.")
    reasoning: str | None = Field(default=None, description="The profile asking for clues and guesses; unset: default.")
    pairwise: str | None = Field(default=None, description="The profile comparing two candidates; unset: default.")
    pointwise: str | None = Field(default=None, description="The profile scoring one candidate; unset: default.")

    def profile_for(self, task: str) -> str:
        if task != "default" and task not in TASKS:
            raise ValueError(f"unknown task {task!r}")
        return getattr(self, task) or self.default


CACHE_SCHEMES = ("sqlite", "redis", "rediss")


class CacheConfig(_Section):
    """The response cache: an embedded SQLite file (the default) or a Redis server several machines share."""

    dir: Path = Field(default=Path("cache"), description="Folder of the SQLite cache file (responses.sqlite3), used when url is unset.")
    enabled: bool = Field(default=True, description="false: neither read nor write cached answers (as --no-cache).")
    url: str | None = Field(
        default=None,
        description='Where answers are kept: unset or "sqlite:///path/to/folder" = the SQLite file in that folder; '
        '"redis://host:6379/0" (or "rediss://" for TLS) = a Redis server. Never a password here: see password_env.',
    )
    password_env: str = Field(default="", description="NAME of the environment variable holding the Redis password (unset: none).")
    ttl_s: int | None = Field(
        default=None, ge=1, description="Seconds a cached answer stays usable (Redis expires it; SQLite ignores and prunes it); unset: forever."
    )
    timeout_s: float = Field(default=5.0, gt=0, description="Timeout of each connection and command to a cache server.")
    key_prefix: str = Field(default="geoagent:", description="Prefix of every Redis key (lets GeoAgent share a Redis database).")

    @field_validator("url")
    @classmethod
    def _a_cache_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from urllib.parse import urlsplit

        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme not in CACHE_SCHEMES:
            raise ValueError(f"not a cache URL: use sqlite:///FOLDER, redis://HOST:PORT/DB or rediss://HOST:PORT/DB (scheme {scheme or 'missing'!r})")
        if scheme != "sqlite" and urlsplit(value).password is not None:
            raise ValueError(
                "the URL holds a password (not shown): remove it, put it in an environment variable and name that variable in password_env"
            )
        return value

    @field_validator("password_env")
    @classmethod
    def _a_name_not_a_password(cls, value: str) -> str:
        if value and looks_like_a_key(value):
            raise ValueError("this looks like a password, not the NAME of an environment variable (the value is not shown)")
        return value

    def password(self) -> str | None:
        """The Redis password from the variable password_env names; a clear error when it is named but unset."""
        if not self.password_env:
            return None
        value = os.environ.get(self.password_env)
        if not value:
            raise ConfigError(f"cache: environment variable {self.password_env} is not set (password_env names it); export {self.password_env}=<the Redis password>")
        return value


#: Pillow's default Image.MAX_IMAGE_PIXELS (1024 * 1024 * 1024 // 4 // 3), written out so reading the settings
#: never imports Pillow; a test keeps the two equal.
PILLOW_MAX_PIXELS = 89_478_485


class ImagesConfig(_Section):
    """How photos are decoded (one limit for every decode: locate, batch, serve, index build)."""

    max_pixels: int = Field(
        default=PILLOW_MAX_PIXELS, ge=1,
        description="Largest image decoded, in pixels (width x height), checked from the file's header before any "
        "decoding; larger files are refused as possible decompression bombs. Default: Pillow's limit (about 89 Mpx).",
    )


class RetrievalConfig(_Section):
    """Where candidates come from: a reference index, or (index unset) the world gazetteer."""

    index: Path | None = Field(default=None, description='Index folder; unset or "none" = the gazetteer.')
    clip_model: str = Field(default="ViT-B-32", description="An open_clip model name, or a path to a model-config JSON.")
    clip_pretrained: str = Field(default="laion2b_s34b_b79k", description='A pretrained tag, a checkpoint file, or "none".')
    seed: int = Field(default=0, description='Seeds random init when clip_pretrained = "none".')
    top_k: int = Field(default=10, ge=1, le=1000, description="Candidates retrieved per photo.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(default="auto", description="Where CLIP runs; auto: a GPU when there is one.")
    batch_size: int = Field(default=32, ge=1, description="Images or texts embedded per CLIP forward pass.")
    kmeans_k: int = Field(default=100, ge=1, description="Geographic k-means clusters (submaps).")
    gazetteer_min_population: int = Field(
        default=100_000, ge=15000, description="6,204 cities at 100,000; about 34,000 at 15,000 (finer, slower to embed once)."
    )
    gazetteer_prompt: str = Field(
        default="a photo taken in {place}, {country}", description="The text embedded for each gazetteer place."
    )
    vectors_cache: Path | None = Field(
        default=None, description="Folder for model-keyed caches shared by every project (gazetteer vectors); unset: the user cache dir."
    )

    @field_validator("index", mode="before")
    @classmethod
    def _none_means_gazetteer(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    @field_validator("index", "vectors_cache")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None


class AgentConfig(_Section):
    """How the agent asks and decides. Setting country_prior and reasoning to false leaves retrieval + reranking."""

    strategy: str = Field(default="tournament", description="none | pointwise | allpairs | tournament | sorting | setwise | georanker")
    set_size: int = Field(
        default=4, ge=2, le=26,
        description="setwise: candidates shown in one question (labelled A, B, C, ...); a knockout over sets asks about "
        "(K-1)/(set_size-1) questions for K candidates. 2 asks exactly the tournament's pairwise questions.",
    )
    top_k: int | None = Field(default=None, ge=1, le=200, description="Candidates reranked; unset: retrieval.top_k.")
    position_debias: bool | Literal["adaptive"] = Field(
        default="adaptive",
        description='true: ask both orders of every pair (disagreement is a tie); "adaptive": one order in a seeded '
        "random direction, the other only when the answer is not decisive; false: one order, candidate A first. "
        "setwise: the other order is the set rotated by one (slot A's candidate moves last); true asks both, "
        '"adaptive" starts from a seeded rotation and asks the other only when the answer overturns an evidence lead, '
        "false asks once in seed order; when the answers disagree the set's best by evidence goes on.",
    )
    adaptive_margin: float = Field(
        default=0.05, ge=0, description="adaptive: ask the other order too when an answer overturns an evidence lead this large."
    )
    vote_model: Literal["bradley_terry", "copeland"] = Field(
        default="bradley_terry", description="How allpairs turns wins into scores: Bradley-Terry or Copeland win share."
    )
    country_prior: bool = Field(default=True, description="Ask which countries the photo may be from (a prior).")
    prior_samples: int = Field(default=1, ge=1, le=32, description="Prior answers sampled and averaged.")
    prior_countries: int = Field(default=3, ge=1, description="Countries of the prior that a country submap keeps.")
    reasoning: bool = Field(default=True, description="Ask for clues and a guessed position; the consensus guess joins the pool.")
    reasoning_samples: int = Field(default=3, ge=1, le=32, description="Reasoning answers sampled (self-consistency).")
    reasoning_neighbours: int = Field(default=0, ge=0, description="Show the n nearest and n farthest references' coordinates.")
    reasoning_cluster_km: float = Field(default=300.0, gt=0, description="Guesses this close form one self-consistency cluster.")
    submap: Literal["none", "country", "kmeans"] = Field(
        default="none", description="Restrict (or boost) retrieval to the prior's countries or to k-means clusters."
    )
    submap_weight: float | None = Field(default=None, description="Unset: restrict retrieval to the submap; a number: boost it.")
    submap_clusters: int = Field(default=3, ge=1, description="k-means clusters kept around the reasoning estimate.")
    image_layout: Literal["separate", "composite"] = Field(
        default="separate", description="composite: query | A | B in one labelled image, for single-image models."
    )
    max_image_side: int = Field(
        default=768, ge=64, le=8192, description="Images are EXIF-rotated, downscaled to this side and encoded once."
    )
    candidate_image_side: int = Field(
        default=512,
        ge=64,
        le=8192,
        description=(
            "Candidates' reference photos are downscaled to this side (the query to max_image_side): they are compared, "
            "not studied, and each costs tokens in every question that shows it."
        ),
    )
    view: Literal["ground", "cross"] = Field(
        default="ground", description="cross: street-level queries against aerial references (the cross-view prompts)."
    )
    prompts_dir: Path | None = Field(default=None, description="Prompt templates folder; unset: the bundled prompts/.")
    fusion_votes: float = Field(default=1.0, description="Weight of the reranking votes in the final score.")
    fusion_retrieval: float = Field(default=0.5, description="Weight of the retrieval similarity.")
    fusion_prior: float = Field(default=0.2, description="Weight of the prior probability of the candidate's country.")
    fusion_proximity: float = Field(default=0.2, description="Weight of the closeness to the reasoning estimate.")
    fusion_consensus: float = Field(default=0.3, description="Weight of the support from strong candidates nearby.")
    consensus_bandwidth_km: float = Field(
        default=25.0, gt=0, description="Candidates this close support each other; also the confidence radius."
    )
    proximity_km: float = Field(default=500.0, gt=0, description="The distance scale of closeness to the reasoning estimate.")
    max_concurrent_photos: int | None = Field(
        default=None, ge=1, description="Photos in flight at once; unset: enough to keep every backend's max_concurrency busy."
    )
    early_exit: bool = Field(
        default=True, description="Skip reranking when it cannot move the answer (every candidate within consensus_bandwidth_km)."
    )
    use_exif: bool = Field(
        default=False,
        description="Answer from the photo's EXIF GPS when it has one (no model runs); off: EXIF is shown beside the "
        "visual answer, which it may contradict (metadata can be stripped, wrong or planted). eval always turns it off.",
    )
    near_duplicate_similarity: float | Literal["off"] | None = Field(
        default=None,
        description="Cosine similarity from which the top reference counts as a copy of the photo and is the answer; "
        'unset: the threshold `index build` measured for the index (exact copies only for older indexes); "off": never.',
    )

    confidence_km: float = Field(
        default=25.0, gt=0,
        description="The distance a calibrated confidence speaks of: the probability that the answer lies within this "
        "many km of the truth. A calibration file carries its own and must agree.",
    )
    calibration: Path | None = Field(
        default=None,
        description="A calibration file written by `geoagent eval ... --calibrate FILE`: confidence becomes the "
        "probability that the answer is within confidence_km. Unset: confidence is the uncalibrated score (labelled so).",
    )
    min_confidence: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Below this confidence the answer is \"unknown\": abstained, no coordinate (the best guess stays the "
        "first candidate). Unset: every photo gets an answer. Meaningful as a probability only with a calibration.",
    )

    @field_validator("near_duplicate_similarity", mode="before")
    @classmethod
    def _similarity_or_off(cls, value: object) -> object:
        if value is None:
            return None
        if value is False or (isinstance(value, str) and value.strip().lower() in ("off", "false")):
            return "off"
        try:
            number = float(value) if not isinstance(value, bool) else None  # type: ignore[arg-type]
        except (TypeError, ValueError):
            number = None
        if number is None or not 0 < number <= 1:
            raise ValueError('a cosine similarity in (0, 1], "off", or unset for the threshold measured by `index build`')
        return number

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        from geoagent.agent.rerank import MODEL_STRATEGIES, STRATEGIES

        if value not in STRATEGIES and value not in MODEL_STRATEGIES:
            raise ValueError(f"unknown strategy '{value}' (known: {', '.join((*STRATEGIES, *MODEL_STRATEGIES))})")
        return value


class RankerConfig(_Section):
    """GeoRanker (strategy = "georanker"): a Qwen2-VL reward model with a LoRA adapter, run on this machine."""

    base_model: str = Field(
        default="Qwen/Qwen2-VL-7B-Instruct",
        description="A local model folder, or a Hugging Face name found in the local cache first (downloaded only if reachable).",
    )
    adapter: Path | None = Field(default=None, description="A peft adapter folder, e.g. GeoRanker's checkpoints/; required.")
    device: Literal["auto", "cuda", "cpu"] = Field(default="auto", description="Where the reward model runs; auto: a GPU when there is one.")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(default="auto", description="auto: bfloat16 on a GPU, float32 on the CPU.")
    batch_size: int = Field(default=8, ge=1, le=1024, description="Candidates per forward pass, from every photo in flight.")
    max_image_side: int = Field(default=640, ge=28, le=8192, description="Images are shrunk to this side first (28-pixel blocks).")

    @field_validator("base_model")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty: give a model folder or a Hugging Face name such as Qwen/Qwen2-VL-7B-Instruct")
        return value.strip()

    @field_validator("adapter", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("adapter")
    @classmethod
    def _expand_adapter(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None


class ServeConfig(_Section):
    """``geoagent serve``: who may use the page besides this computer's own browser (docs/guides/security.md)."""

    token_env: str = Field(
        default="",
        description="NAME of an environment variable holding the access token (at least 16 characters); "
        "set: the token is required on every address, loopback included. Unset: a token is generated per start "
        "for a non-loopback --host (printed once, with the page's URL), and none is asked on loopback.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Further host names the server answers to (the Host header), beyond the bound address, "
        "localhost, 127.0.0.1 and [::1]: the names other computers reach it by, e.g. a reverse proxy's.",
    )

    @field_validator("token_env")
    @classmethod
    def _a_name_not_a_token(cls, value: str) -> str:
        return a_variable_name(value, "a token", "the token", "GEOAGENT_SERVE_TOKEN")

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        for host in value:
            bare = host.strip()
            if bare.startswith("[") and bare.endswith("]"):
                bare = bare[1:-1]
            try:
                ipaddress.ip_address(bare)
            except ValueError:
                if not _HOST_NAME.fullmatch(bare):
                    raise ValueError(f"'{host}' is not a host name or an IP address (no scheme, no port), e.g. photos.example.org") from None
        return value

    def token(self) -> str | None:
        """The token from the named environment variable (None when none is named); ConfigError if it is
        named but unset or too short to resist guessing."""
        if not self.token_env:
            return None
        value = os.environ.get(self.token_env, "").strip()
        if not value:
            raise ConfigError(f"[serve] token_env names {self.token_env}, which is not set: export {self.token_env}=<a long random token>")
        if len(value) < MIN_TOKEN_CHARS:
            raise ConfigError(f"the token in {self.token_env} is shorter than {MIN_TOKEN_CHARS} characters: use a long random one")
        return value




class Settings(BaseSettings):
    """The whole configuration. Field names are the public TOML keys."""

    model_config = SettingsConfigDict(
        env_prefix="GEOAGENT_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
        hide_input_in_errors=True,
    )

    #: Set on the subclass that load_config validates its own merge of file, environment and overrides with.
    layers_merged: ClassVar[bool] = False

    backends: dict[str, BackendProfile] = Field(
        default_factory=lambda: {"local": BackendProfile()}, description="Named VLM endpoints, [backends.NAME] each."
    )
    tasks: TasksConfig = Field(default_factory=TasksConfig, description="Which backend profile serves which task.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="The response cache.")
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig, description="Where candidates come from.")
    agent: AgentConfig = Field(default_factory=AgentConfig, description="How the agent asks and decides.")
    ranker: RankerConfig = Field(default_factory=RankerConfig, description='GeoRanker, for strategy = "georanker".')
    serve: ServeConfig = Field(default_factory=ServeConfig, description="`geoagent serve`: who may reach the page.")
    images: ImagesConfig = Field(default_factory=ImagesConfig, description="How photos are decoded: one pixel limit for every decode.")

    @model_validator(mode="after")
    def _routes_exist(self) -> Settings:
        for task in ("default", *TASKS):
            name = getattr(self.tasks, task)
            if name is not None and name not in self.backends:
                known = ", ".join(sorted(self.backends)) or "none"
                raise ValueError(f"tasks.{task} routes to backend profile '{name}', which is not defined (defined: {known})")
        return self

    def routed_profiles(self, tasks: tuple[str, ...] = ("default", *TASKS)) -> list[str]:
        """Names of the backend profiles that serve ``tasks``."""
        return sorted({self.tasks.profile_for(task) for task in tasks})

    def profile(self, task: str) -> tuple[str, BackendProfile]:
        name = self.tasks.profile_for(task)
        return name, self.backends[name]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file is read by load_config, which names it in errors.
        return (init_settings,) if getattr(settings_cls, "layers_merged", False) else (init_settings, env_settings)


class _Merged(Settings):
    """Settings validated from the layers :func:`inspect_config` merged itself (pydantic runs a BaseSettings'
    sources even in ``model_validate``, which would read the environment a second time)."""

    layers_merged: ClassVar[bool] = True


#: Repairs tried when showing a broken configuration: each drops the keys that failed.
MAX_REPAIRS = 20


@dataclass
class _Layer:
    """One source of settings, its data (nested dicts as in the TOML), and how a message names it."""

    data: dict[str, Any]
    origin: Callable[[tuple[str, ...]], str]


@dataclass
class ConfigReport:
    """What :func:`inspect_config` found: the settings that parsed with the bad keys left out (None when the
    problem is not one key's), and one line per problem."""

    settings: Settings | None
    problems: list[str] = field(default_factory=list)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, nested tables merged key by key (as pydantic-settings merges its sources)."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _lookup(data: dict[str, Any], loc: tuple[str, ...]) -> bool:
    node: Any = data
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _drop(data: dict[str, Any], loc: tuple[str, ...]) -> None:
    node = data
    for part in loc[:-1]:
        node = node[part]
    del node[loc[-1]]


def _model_at(parent: tuple[str, ...]) -> type[BaseModel] | None:
    """The section model whose keys live at ``parent`` (``("backends", "local")`` -> BackendProfile)."""
    current: Any = Settings
    for part in parent:
        if isinstance(current, type) and issubclass(current, BaseModel):
            if part not in current.model_fields:
                return None
            current = current.model_fields[part].annotation
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        else:
            return None
    if get_origin(current) is dict:
        return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _sections() -> dict[str, type[BaseModel]]:
    """The TOML tables a key can live in, by how a user writes them."""
    found: dict[str, type[BaseModel]] = {}
    for name in Settings.model_fields:
        model = _model_at((name,))
        if model is not None:
            found[name] = model
        elif (model := _model_at((name, "NAME"))) is not None:
            found[f"{name}.NAME"] = model
    return found


def _suggestion(loc: tuple[str, ...]) -> str:
    """' (did you mean ...?)' for an unknown key: a close key of the same table, or the same key elsewhere."""
    *parent, key = loc
    model = _model_at(tuple(parent))
    if model is not None:
        close = difflib.get_close_matches(key, list(model.model_fields), n=1)
        if close:
            return f" (did you mean '{close[0]}'?)"
    for section, section_model in _sections().items():
        if key in section_model.model_fields and (model is None or section_model is not model):
            return f" (did you mean [{section}] {key}?)"
    return ""


def validation_message(error: Any) -> str:
    """A pydantic error's message as a user reads it: no 'Value error, ' prefix, lower-case start."""
    message = str(error["msg"]).removeprefix("Value error, ")
    return message[:1].lower() + message[1:]


def _describe(error: Any, origin: str) -> str:
    loc = tuple(str(part) for part in error["loc"])
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{key}'{_suggestion(loc)}"
    if not loc:
        return f"{origin}: {validation_message(error)}"
    return f"{origin}: {key}: {validation_message(error)}"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 by definition; tomllib reads the whole file as such
        raise ConfigError(f"{path}: not UTF-8 at byte {exc.start} (save the config file as UTF-8)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None


def _env_layer() -> tuple[_Layer, list[str]]:
    """``GEOAGENT_*`` variables as settings, and a problem line for each variable naming no known table."""
    prefix = str(Settings.model_config.get("env_prefix", "")).upper()
    delimiter = str(Settings.model_config.get("env_nested_delimiter", "__"))
    names: dict[tuple[str, ...], str] = {}
    problems: list[str] = []
    for name in sorted(os.environ):
        if not name.upper().startswith(prefix):
            continue
        path = tuple(name[len(prefix) :].lower().split(delimiter))
        names[path] = name
        if len(path) > 1 and path[0] not in Settings.model_fields:  # a one-word name may be a key's variable
            problems.append(f"environment variable {name}: unknown key '{path[0]}'{_suggestion(path[:1])}")
    try:
        data = EnvSettingsSource(Settings)()
    except SettingsError as exc:  # a whole table in one variable, not valid JSON
        tables = [name for path, name in names.items() if len(path) == 1 and path[0] in Settings.model_fields]
        raise ConfigError(f"environment variable {' or '.join(tables) or 'GEOAGENT_...'}: not valid JSON ({exc})") from None

    def origin(loc: tuple[str, ...]) -> str:
        for end in range(len(loc), 0, -1):
            if loc[:end] in names:
                return f"environment variable {names[loc[:end]]}"
        return "environment"

    return _Layer(data, origin), problems


def _find_config_file(path: str | Path | None) -> Path | None:
    if path is not None:
        return Path(path).expanduser()
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def inspect_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *, repair: bool = True) -> ConfigReport:
    """Build Settings from the file (explicit or ``./geoagent.toml``), environment and overrides, and say what
    is wrong, one line per problem naming the file or variable and the key.

    With ``repair``, a bad key is dropped (its default takes its place) and the rest tried again, so the
    settings that did parse can be shown beside the problems.
    """
    toml_file = _find_config_file(path)
    file_origin = str(toml_file) if toml_file else "configuration"
    file_layer = _Layer(_read_toml(toml_file) if toml_file else {}, lambda _loc: file_origin)
    env_layer, problems = _env_layer()
    override_layer = _Layer(copy.deepcopy(overrides or {}), lambda _loc: "overrides")
    layers = [file_layer, env_layer, override_layer]  # lowest precedence first
    for _ in range(MAX_REPAIRS):
        merged: dict[str, Any] = {}
        for layer in layers:
            merged = _merge(merged, layer.data)
        try:
            return ConfigReport(_Merged(**merged), problems)
        except ValidationError as err:
            repaired = False
            for error in err.errors():
                loc = tuple(str(part) for part in error["loc"])
                source = next((candidate for candidate in reversed(layers) if loc and _lookup(candidate.data, loc)), None)
                problems.append(_describe(error, source.origin(loc) if source else file_origin))
                if source is not None:
                    _drop(source.data, loc)
                    repaired = True
            if not (repair and repaired):
                break
    return ConfigReport(None, problems)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build Settings from the file (explicit or ``./geoagent.toml``), environment and overrides.

    Raises ConfigError with one line naming the file, variable or key and the problem.
    """
    report = inspect_config(path, overrides, repair=False)
    if report.problems or report.settings is None:
        raise ConfigError(report.problems[0] if report.problems else "configuration: invalid")
    return report.settings
