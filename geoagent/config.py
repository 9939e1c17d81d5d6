"""Settings: named backend profiles, task routing, cache, retrieval and agent options.

Precedence, highest first: explicit overrides (CLI flags) > environment (``GEOAGENT_...``, nested
with ``__``) > the TOML file (``--config FILE`` or ``./geoagent.toml``) > defaults.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from geoagent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG_FILE = Path("geoagent.toml")
TASKS = ("prior", "reasoning", "pairwise", "pointwise")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackendProfile(_Section):
    """One named VLM endpoint: which client, which model, where, and how hard to push it."""

    kind: str = Field(default="ollama", description="ollama | openai | litellm (a module in geoagent/vlm/backends/)")
    model: str = "llava:7b"
    base_url: str | None = Field(
        default=None, description="Server URL; None means the client's default (Ollama: http://127.0.0.1:11434)."
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

    @field_validator("index", mode="before")
    @classmethod
    def _none_means_gazetteer(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    @field_validator("index")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None


class AgentConfig(_Section):
    """How the agent asks and decides. Setting country_prior and reasoning to false leaves retrieval + reranking."""

    strategy: str = Field(default="tournament", description="none | pointwise | allpairs | tournament | sorting")
    top_k: int | None = Field(default=None, ge=1, le=200, description="Candidates reranked; unset: retrieval.top_k.")
    position_debias: bool | Literal["adaptive"] = Field(
        default=True,
        description='true: ask both orders of every pair (disagreement is a tie); "adaptive": one order in a seeded '
        "random direction, the other only when the answer is not decisive; false: one order, candidate A first.",
    )
    adaptive_margin: float = Field(
        default=0.1, ge=0, description="adaptive: ask the other order too when an answer overturns an evidence lead this large."
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
    max_concurrent_photos: int = Field(default=4, ge=1)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        from geoagent.agent.rerank import STRATEGIES

        if value not in STRATEGIES:
            raise ValueError(f"unknown strategy '{value}' (known: {', '.join(STRATEGIES)})")
        return value


class Settings(BaseSettings):
    """The whole configuration. Field names are the public TOML keys."""

    model_config = SettingsConfigDict(
        env_prefix="GEOAGENT_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    backends: dict[str, BackendProfile] = Field(default_factory=lambda: {"local": BackendProfile()})
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)

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
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)


def _format_validation_error(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{loc}'"
    if first["type"] == "value_error" and not loc:
        return f"{origin}: {first['msg'].removeprefix('Value error, ')}"
    return f"{origin}: {loc or 'config'}: {first['msg']}"


def _check_toml(path: Path) -> None:
    try:
        with path.open("rb") as fh:
            tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build Settings from the file (explicit or ``./geoagent.toml``), environment and overrides.

    Raises ConfigError with one line naming the file or key and the problem.
    """
    toml_file: Path | None = None
    if path is not None:
        toml_file = Path(path).expanduser()
        _check_toml(toml_file)
    elif DEFAULT_CONFIG_FILE.is_file():
        toml_file = DEFAULT_CONFIG_FILE
        _check_toml(toml_file)

    settings_cls: type[Settings] = Settings
    if toml_file is not None:
        settings_cls = type(
            "Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": toml_file}}
        )
    origin = str(toml_file) if toml_file else "configuration"
    try:
        return settings_cls(**(overrides or {}))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None
