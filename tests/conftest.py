"""Shared fixtures: a stand-in VLM server per test, marker images, and settings pointing at the stand-in."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from geoagent.config import Settings  # noqa: E402
from geoagent.images import encode_image  # noqa: E402
from geoagent.vlm.types import EncodedImage  # noqa: E402
from standin import StandinConfig, StandinServer, marked_scene, marker_judge  # noqa: E402

#: How each backend kind reaches the stand-in: (kind, model, which stand-in URL).
BACKEND_ROUTES = {
    "ollama": ("ollama", "llava:7b", "url"),
    "openai": ("openai", "llava:7b", "openai_url"),
    "litellm-openai": ("litellm", "openai/llava:7b", "openai_url"),
    "litellm-ollama": ("litellm", "ollama/llava:7b", "url"),
}


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own folder (no stray ./geoagent.toml or cache/) with no GEOAGENT_* variables."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("GEOAGENT_"):
            monkeypatch.delenv(name)


@pytest.fixture
def standin() -> Iterator[Callable[..., StandinServer]]:
    """Start stand-in servers: ``standin(judge=..., config=StandinConfig(...))``; all stop after the test."""
    servers: list[StandinServer] = []

    def start(judge: Any = marker_judge, config: StandinConfig | None = None) -> StandinServer:
        server = StandinServer(judge, config).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


@pytest.fixture(scope="session")
def marker_images() -> list[EncodedImage]:
    """Forty encoded test pictures; picture i carries marker 100 + i."""
    return [encode_image(marked_scene(100 + i), max_side=768, label=f"marker-{100 + i}") for i in range(40)]


def settings_for(route: str, server: StandinServer, tmp_path: Path, **profile: Any) -> Settings:
    """Settings whose default task goes to ``server`` through the backend named by ``route``."""
    kind, model, url_attr = BACKEND_ROUTES[route]
    backend = {"kind": kind, "model": model, "base_url": getattr(server, url_attr), "timeout_s": 5, "max_retries": 4,
               "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.2, "max_concurrency": 32, **profile}
    return Settings(backends={"test": backend}, tasks={"default": "test"}, cache={"dir": tmp_path / "cache"})
