"""Session fixtures for the real engine: ``pytest_plugins = ("engine.fixtures",)`` in a test module (or the root
conftest) makes them available.

- ``tiny_qwen2vl``: the folder of a tiny random-weight Qwen2-VL, built once per session (seed 0).
- ``engine``: a running ``transformers serve`` that loads models on demand by folder path (one per session,
  restarted if a test killed it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.server import EngineServer
from engine.tiny_qwen2vl import build_tiny_qwen2vl


@pytest.fixture(scope="session")
def tiny_qwen2vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen2-VL folder (weights, tokenizer, processor, chat template), built offline."""
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-qwen2vl") / "model", seed=0)


@pytest.fixture(scope="session")
def engine_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[EngineServer]:
    """One ``transformers serve`` for the session; the tiny model is built while the engine starts."""
    server = EngineServer(tmp_path_factory.mktemp("engine"))
    server.launch()
    try:
        request.getfixturevalue("tiny_qwen2vl")
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def engine(engine_server: EngineServer) -> EngineServer:
    """The session's engine, running (restarted first if an earlier test killed it)."""
    engine_server.ensure_running()
    return engine_server
