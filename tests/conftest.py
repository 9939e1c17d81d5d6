"""Shared fixtures: a stand-in VLM server per test, marker images, and settings pointing at the stand-in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Nothing in the suite may reach the Hugging Face Hub: the sandbox has no network and a test must not depend on
# one. Set here, before anything imports huggingface_hub (it reads the variable once), so the warm CLI helper
# (tests/warmcli.py) has it too and a test asking for it still gets a forked command, not a fresh interpreter.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from geoagent.config import Settings  # noqa: E402
from geoagent.images import encode_image  # noqa: E402
from geoagent.vlm.types import EncodedImage  # noqa: E402
from standin import StandinConfig, StandinServer, marked_scene, marker_judge  # noqa: E402
from warmcli import RUNNER as WARM_CLI  # noqa: E402

#: How each backend kind reaches the stand-in: (kind, model, which stand-in URL).
BACKEND_ROUTES = {
    "ollama": ("ollama", "llava:7b", "url"),
    "openai": ("openai", "llava:7b", "openai_url"),
    "litellm-openai": ("litellm", "openai/llava:7b", "openai_url"),
    "litellm-ollama": ("litellm", "ollama/llava:7b", "url"),
}

#: The longest files (80-150 s each on 2 cores), handed out first: ``--dist loadfile`` gives files to the workers
#: in collection order, and a long file handed out last keeps one worker busy while the other has nothing left.
LONGEST_FIRST = ("test_batch_ray.py", "test_agent.py", "test_batch.py", "test_ray_nodes.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The files of ``LONGEST_FIRST`` first; every other test keeps its place (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own folder (no stray ./geoagent.toml or cache/) with no GEOAGENT_* variables."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))  # shared caches (platformdirs) stay in the test
    for name in list(os.environ):
        if name.startswith("GEOAGENT_"):
            monkeypatch.delenv(name)


@pytest.fixture
def standin() -> Iterator[Callable[..., StandinServer]]:
    """Start stand-in servers: ``standin(judge=..., config=StandinConfig(...), port=...)``; all stop after the test."""
    servers: list[StandinServer] = []

    def start(judge: Any = marker_judge, config: StandinConfig | None = None, port: int = 0) -> StandinServer:
        server = StandinServer(judge, config, port).__enter__()
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


TINY_CLIP = str(Path(__file__).parent / "data" / "tiny-clip.json")


def indexed_world(root: Path, places_per_country: int):
    """A synthetic world under ``root`` (8 countries, each place with a look-alike decoy) and its reference
    index at ``root / "index"``, built with the tiny CLIP config."""
    from geoagent.config import RetrievalConfig
    from geoagent.retrieval.embedder import Embedder
    from geoagent.retrieval.index import build_index
    from standin.world import build_world

    built = build_world(root, places_per_country=places_per_country)
    config = RetrievalConfig(clip_model=TINY_CLIP, clip_pretrained="none", index=root / "index")
    build_index(built.references_csv, root / "index", Embedder.load(config))
    return built


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory):
    """A synthetic world (8 countries x 6 places, each with a look-alike decoy) and its reference index."""
    return indexed_world(tmp_path_factory.mktemp("world"), places_per_country=6)


@pytest.fixture(scope="session")
def world_retriever(world):
    """The world's retriever, loaded once and shared (loading the embedder takes seconds)."""
    from geoagent.config import RetrievalConfig
    from geoagent.retrieval.retriever import Retriever

    return Retriever.load_sync(RetrievalConfig(**world_retrieval_config(world)), world.root / "gazetteer-cache")


def world_retrieval_config(world) -> dict[str, Any]:
    return {"clip_model": TINY_CLIP, "clip_pretrained": "none", "index": str(world.root / "index")}


def world_settings(world, server: StandinServer, cache_dir: Path, route: str = "ollama", **agent: Any) -> Settings:
    """Settings for locating the world's queries against ``server``; prior and reasoning off unless asked."""
    kind, model, url_attr = BACKEND_ROUTES[route]
    backend = {"kind": kind, "model": model, "base_url": getattr(server, url_attr), "max_concurrency": 32, "timeout_s": 20,
               "retry_backoff_s": 0.01}
    return Settings(
        backends={"sim": backend},
        tasks={"default": "sim"},
        cache={"dir": cache_dir},
        retrieval=world_retrieval_config(world),
        agent={"country_prior": False, "reasoning": False, **agent},
    )


def write_world_config(path: Path, world, server: StandinServer, cache: Path, backend: dict[str, object] | None = None, **agent: object) -> Path:
    """A TOML config a user would write: the stand-in as Ollama, the world's index, ``[agent]`` keys as given
    (``backend`` adds or overrides keys of the backend profile)."""
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in agent.items())
    profile = {"kind": "ollama", "model": "llava:7b", "base_url": server.url, "max_concurrency": 16, "timeout_s": 20, **(backend or {})}
    path.write_text(
        "[backends.sim]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in profile.items()) +
        f'[tasks]\ndefault = "sim"\n[cache]\ndir = "{cache}"\n'
        f'[retrieval]\nclip_model = "{TINY_CLIP}"\nclip_pretrained = "none"\nindex = "{world.root / "index"}"\n'
        f"[agent]\n{lines}\n"
    )
    return path


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``geoagent ARGS`` in a new process, as a user would run it: forked from a helper that has PyTorch imported
    already (tests/warmcli.py), or a plain ``python -m geoagent`` when ``env`` changes what an import reads.
    ``subprocess.TimeoutExpired`` (the command killed) past ``timeout`` seconds."""
    full_env = {**os.environ, **(env or {})}
    warm = WARM_CLI.run(list(args), cwd, full_env, timeout=timeout)
    if warm is not None:
        return warm
    return subprocess.run([sys.executable, "-m", "geoagent", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def start_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, stdout: Any = subprocess.DEVNULL,
              stderr: Any = subprocess.PIPE, text: bool = False) -> Any:
    """``geoagent ARGS`` started in the background, as ``subprocess.Popen`` starts it (stdin /dev/null): forked
    from the warm helper (a :class:`warmcli.WarmProcess`) or, when ``env`` changes what an import reads, a plain
    ``python -m geoagent``. ``env`` is the whole environment (default: this process's)."""
    full_env = dict(os.environ if env is None else env)
    warm = WARM_CLI.start(list(args), cwd, full_env, stdout, stderr, text=text)
    if warm is not None:
        return warm
    return subprocess.Popen([sys.executable, "-m", "geoagent", *args], cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=stderr, text=text, preexec_fn=_ctrl_c_as_in_a_terminal)  # fmt: skip


def _ctrl_c_as_in_a_terminal() -> None:
    """SIGINT's default, as a command in a terminal has it (a test worker may ignore SIGINT, and children inherit
    that); the warm helper's children get the same."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
