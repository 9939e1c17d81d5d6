"""Settings: named backend profiles, task routing, cache, retrieval and agent options.

Precedence, highest first: explicit overrides (CLI flags) > environment (``GEOAGENT_...``, nested
with ``__``) > the TOML file (``--config FILE`` or ``./geoagent.toml``) > defaults.
"""

from __future__ import annotations

import copy
import difflib
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
    model: str = "llava:7b"
    base_url: str | list[str] | None = Field(
        default=None,
        description="Server URL; None means the client's default (Ollama: http://127.0.0.1:11434). A list of URLs "
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
    max_concurrency: int = Field(default=4, ge=1, le=1024)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=4, ge=0, le=20)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int = 0
    max_tokens: int = Field(default=512, ge=16)
    retry_backoff_s: float = Field(default=0.5, ge=0, description="First backoff; doubles per attempt, with jitter.")
    retry_backoff_max_s: float = Field(default=30.0, ge=0)
    retry_after_max_s: float = Field(
        default=60.0, ge=0, description="The longest server-requested wait (Retry-After) honoured, as the openai SDK."
    )
    price_per_1k_prompt_tokens: float | None = Field(
        default=None, ge=0, description="US dollars; unset: litellm's bundled price table, where it lists the model."
    )
    price_per_1k_completion_tokens: float | None = Field(default=None, ge=0)
    context_tokens: int | None = Field(
        default=None, ge=256, description="Ollama num_ctx to send; unset: sized to each prompt, only ever growing."
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
        if value and looks_like_a_key(value):
            raise ValueError(
                "this looks like an API key, not the NAME of an environment variable (the value is not shown); "
                "remove it, put the key in a variable (export OPENAI_API_KEY=...) and write that variable's name here"
            )
        return value

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

    default: str = "local"
    prior: str | None = None
    reasoning: str | None = None
    pairwise: str | None = None
    pointwise: str | None = None

    def profile_for(self, task: str) -> str:
        if task != "default" and task not in TASKS:
            raise ValueError(f"unknown task {task!r}")
        return getattr(self, task) or self.default


class CacheConfig(_Section):
    dir: Path = Path("cache")
    enabled: bool = True


class RetrievalConfig(_Section):
    """Where candidates come from: a reference index, or (index unset) the world gazetteer."""

    index: Path | None = Field(default=None, description='Index folder; unset or "none" = the gazetteer.')
    clip_model: str = Field(default="ViT-B-32", description="An open_clip model name, or a path to a model-config JSON.")
    clip_pretrained: str = Field(default="laion2b_s34b_b79k", description='A pretrained tag, a checkpoint file, or "none".')
    seed: int = Field(default=0, description='Seeds random init when clip_pretrained = "none".')
    top_k: int = Field(default=10, ge=1, le=1000)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    batch_size: int = Field(default=32, ge=1)
    kmeans_k: int = Field(default=100, ge=1, description="Geographic k-means clusters (submaps).")
    gazetteer_min_population: int = Field(
        default=100_000, ge=15000, description="6,204 cities at 100,000; about 34,000 at 15,000 (finer, slower to embed once)."
    )
    gazetteer_prompt: str = "a photo taken in {place}, {country}"
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

    strategy: str = Field(default="tournament", description="none | pointwise | allpairs | tournament | sorting | georanker")
    top_k: int | None = Field(default=None, ge=1, le=200, description="Candidates reranked; unset: retrieval.top_k.")
    position_debias: bool | Literal["adaptive"] = Field(
        default="adaptive",
        description='true: ask both orders of every pair (disagreement is a tie); "adaptive": one order in a seeded '
        "random direction, the other only when the answer is not decisive; false: one order, candidate A first.",
    )
    adaptive_margin: float = Field(
        default=0.05, ge=0, description="adaptive: ask the other order too when an answer overturns an evidence lead this large."
    )
    vote_model: Literal["bradley_terry", "copeland"] = "bradley_terry"
    country_prior: bool = True
    prior_samples: int = Field(default=1, ge=1, le=32)
    prior_countries: int = Field(default=3, ge=1, description="Countries of the prior that a country submap keeps.")
    reasoning: bool = True
    reasoning_samples: int = Field(default=3, ge=1, le=32)
    reasoning_neighbours: int = Field(default=0, ge=0, description="Show the n nearest and n farthest references' coordinates.")
    reasoning_cluster_km: float = Field(default=300.0, gt=0, description="Guesses this close form one self-consistency cluster.")
    submap: Literal["none", "country", "kmeans"] = "none"
    submap_weight: float | None = Field(default=None, description="Unset: restrict retrieval to the submap; a number: boost it.")
    submap_clusters: int = Field(default=3, ge=1, description="k-means clusters kept around the reasoning estimate.")
    image_layout: Literal["separate", "composite"] = "separate"
    max_image_side: int = Field(default=768, ge=64, le=8192)
    view: Literal["ground", "cross"] = "ground"
    prompts_dir: Path | None = Field(default=None, description="Prompt templates folder; unset: the bundled prompts/.")
    fusion_votes: float = 1.0
    fusion_retrieval: float = 0.5
    fusion_prior: float = 0.2
    fusion_proximity: float = 0.2
    fusion_consensus: float = 0.3
    consensus_bandwidth_km: float = Field(default=25.0, gt=0)
    proximity_km: float = Field(default=500.0, gt=0)
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
    device: Literal["auto", "cuda", "cpu"] = "auto"
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

    backends: dict[str, BackendProfile] = Field(default_factory=lambda: {"local": BackendProfile()})
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    ranker: RankerConfig = Field(default_factory=RankerConfig)

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
