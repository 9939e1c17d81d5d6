"""`geoagent setup` (issue 17, part 1): from nothing to ready, over real HTTP against the stand-in speaking Ollama
(`/api/pull` streaming its progress, `/api/tags` listing what was pulled, a registry's manifests), with the tiny
random-weight CLIP of the other tests; offline CLIP weights and hosted keys named with what to do, never a traceback."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx

from conftest import TINY_CLIP, run_cli, world_retrieval_config
from geoagent.config import Settings
from geoagent.setup import FIRST_COMMAND, StepProgress, backend_step, candidates_step, clip_step, run_setup
from standin import StandinConfig
from standin.server import PULL_MISSING

LAYERS = (3_000_000, 120_000, 4_096)  # the stand-in registry's llava:7b, in bytes a layer
FEW_PLACES = 5_000_000  # gazetteer_min_population: a handful of cities, embedded in a blink by the tiny CLIP


def retrieval(tmp_path: Path) -> dict[str, object]:
    """The tiny random-weight CLIP and a small gazetteer, its vectors cached under ``tmp_path``."""
    return {"clip_model": TINY_CLIP, "clip_pretrained": "none", "gazetteer_min_population": FEW_PLACES,
            "vectors_cache": str(tmp_path / "vectors")}  # fmt: skip


def write_config(path: Path, base_url: str, model: str = "llava:7b", **retrieval_keys: object) -> Path:
    """A geoagent.toml a user would write: one Ollama profile, the response cache and the retrieval keys."""
    keys = {**retrieval(path.parent), **retrieval_keys}
    path.write_text(
        f'[backends.local]\nkind = "ollama"\nmodel = {json.dumps(model)}\nbase_url = "{base_url}"\ntimeout_s = 20\n'
        f'[cache]\ndir = "{path.parent / "cache"}"\n[retrieval]\n' + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    )
    return path


def settings_for(server_url: str, tmp_path: Path, model: str = "llava:7b", kind: str = "ollama", **profile: object) -> Settings:
    backend = {"kind": kind, "model": model, "base_url": server_url, "timeout_s": 20, **profile}
    return Settings(backends={"local": backend}, tasks={"default": "local"}, cache={"dir": tmp_path / "cache"},
                    retrieval=retrieval(tmp_path))  # fmt: skip


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


async def test_setup_pulls_a_missing_model_with_streamed_progress_then_check_passes(standin, tmp_path):
    """The stand-in lacks llava:7b: setup pulls it through the streaming API, every layer's bytes reported as they
    arrive up to its size, the model is listed from then on, the closing check passes and the next command is the
    first locate; `geoagent check` agrees, and a second `geoagent setup` finds everything ready and pulls nothing."""
    server = standin(config=StandinConfig(models=(), registry={"llava:7b": LAYERS}, pull_steps=4))
    seen: list[StepProgress] = []
    told: list[str] = []
    report = await run_setup(settings_for(server.url, tmp_path), on_progress=seen.append, on_result=lambda r: told.append(r.step))

    assert [s.state for s in report.steps] == ["done", "ready", "done"], report.steps
    assert told == ["backend local", "CLIP weights", "gazetteer"]  # each result told as its step ends
    pulled = report.steps[0]
    assert pulled.fetch_bytes == sum(LAYERS) and "pulled llava:7b" in pulled.summary and "in 3 layers" in pulled.summary
    layers = [e for e in seen if e.step == "backend local" and e.total]
    by_layer: dict[str, list[int]] = {}
    for event in layers:
        by_layer.setdefault(event.label, []).append(event.completed or 0)
    assert sorted(max(done) for done in by_layer.values()) == sorted(LAYERS)  # every layer reported to its end
    assert all(done == sorted(done) and len(done) == 4 for done in by_layer.values())  # growing, line by line
    assert {e.status for e in seen if not e.total} >= {"pulling manifest", "verifying sha256 digest", "success"}
    places = [e for e in seen if e.unit == "places"]
    assert places and places[-1].completed == places[-1].total  # the gazetteer's embedding, to its end
    assert [r.path for r in server.log].count("/api/pull") == 1
    listed = httpx.get(server.url + "/api/tags").json()["models"]
    assert [m["name"] for m in listed] == ["llava:7b"]
    assert report.checks and all(c.ok for c in report.checks) and report.exit_code == 0
    assert report.next_command == FIRST_COMMAND

    config = write_config(tmp_path / "geoagent.toml", server.url, vectors_cache=str(tmp_path / "vectors"))
    check = run_cli("check", "--config", str(config), cwd=tmp_path)
    assert check.returncode == 0 and check.stdout.startswith("local: ok: llava:7b"), check.stdout + check.stderr
    again = run_cli("setup", "--config", str(config), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    lines = again.stdout.splitlines()
    assert lines[0].startswith("backend local: ok: llava:7b") and "already embedded" in lines[2]
    assert lines[-2].startswith("check: local: ok") and lines[-1] == f"next: {FIRST_COMMAND}"
    assert [r.path for r in server.log].count("/api/pull") == 1  # nothing pulled twice


def test_on_a_terminal_each_layer_pulled_has_a_bar_with_its_bytes(standin, tmp_path):
    """stderr a terminal: while the pull streams, a bar per layer names its short digest and counts its megabytes;
    stdout keeps the step lines alone."""
    from standin.server import layer_digest
    from test_terminal import run_with_terminal_stderr

    server = standin(config=StandinConfig(models=(), registry={"llava:7b": LAYERS}, pull_steps=4, pull_line_s=0.15))
    config = write_config(tmp_path / "geoagent.toml", server.url)
    code, out, screen = run_with_terminal_stderr(["setup", "--config", str(config)], tmp_path)
    assert code == 0, screen
    assert f"backend local: {layer_digest('llava:7b', 0)[7:19]}" in screen and "/3.0 MB" in screen, screen
    assert out.splitlines()[0].startswith("backend local: pulled llava:7b (3.1 MB in 3 layers)")
    assert "MB/s" not in out and "━" not in out


def test_a_model_the_registry_lacks_is_ollamas_error_in_one_line(standin, tmp_path):
    """Pulling a model that does not exist: Ollama's own error ("pull model manifest: file does not exist") on the
    backend's line, once, a non-zero exit, no traceback; the closing check is not run against a backend not ready."""
    server = standin(config=StandinConfig(models=(), registry={"llava:7b": LAYERS}))
    config = write_config(tmp_path / "geoagent.toml", server.url, model="nosuch:1b")
    proc = run_cli("setup", "--config", str(config), cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    failed = [line for line in proc.stdout.splitlines() if PULL_MISSING in line]
    assert failed == [f"backend local: FAILED: backend 'local': Ollama at {server.url} cannot pull 'nosuch:1b': {PULL_MISSING}"]
    assert "check: not run: a backend is not ready" in proc.stdout
    assert [(r.path, r.model) for r in server.log if r.path == "/api/pull"] == [("/api/pull", "nosuch:1b")]


def test_dry_run_says_what_it_would_fetch_and_changes_nothing(standin, tmp_path):
    """--dry-run against a stand-in lacking the model: the pull it would make and its size, read from the registry
    the model's name points to (the stand-in's own here), the gazetteer it would embed; the stand-in got no pull,
    no file was written anywhere, exit 0."""
    server = standin(config=StandinConfig(models=(), registry={"llava:7b": LAYERS}))
    host = server.url.removeprefix("http://")
    config = write_config(tmp_path / "geoagent.toml", server.url, model=f"{host}/library/llava:7b")
    before = files_under(tmp_path)
    proc = run_cli("setup", "--dry-run", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"backend local: would pull {host}/library/llava:7b onto {server.url} (3.1 MB)"  # sum(LAYERS)
    assert lines[1].startswith("CLIP weights: tiny-clip with random weights") and "nothing to fetch" in lines[1]
    assert lines[2].startswith("gazetteer: would embed ") and str(tmp_path / "vectors") in lines[2]
    assert lines[-1] == "next: geoagent setup"
    assert "/api/pull" not in [r.path for r in server.log]
    assert files_under(tmp_path) == before


async def test_a_dry_run_without_the_registry_says_the_size_is_unknown(standin, tmp_path):
    """A plain model name points at registry.ollama.ai, which cannot be reached here: the plan stands, its size is
    said to be unknown and why, and nothing is pulled."""
    server = standin(config=StandinConfig(models=(), registry={"llava:7b": LAYERS}))
    profile = settings_for(server.url, tmp_path).backends["local"]
    planned = await backend_step("local", profile, dry_run=True, on_progress=lambda _: None)
    assert planned.state == "planned" and planned.fetch_bytes is None
    assert planned.summary == f"would pull llava:7b onto {server.url} (size unknown: the registry is unreachable)"
    assert "/api/pull" not in [r.path for r in server.log]


def test_an_unreachable_server_is_one_line_and_exit_2(tmp_path):
    """No server at base_url: the backend's line is the same diagnosis the preflight and `check` give, once, exit 2,
    no traceback; the other steps still run (the CLIP weights get ready while the user starts Ollama)."""
    url = f"http://127.0.0.1:{closed_port()}"
    config = write_config(tmp_path / "geoagent.toml", url)
    proc = run_cli("setup", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    diagnosis = [line for line in (proc.stdout + proc.stderr).splitlines() if "cannot connect" in line]
    assert diagnosis == [f"backend local: FAILED: backend 'local': cannot connect to {url}; is `ollama serve` running there? "
                         "(set base_url if Ollama listens elsewhere)"]  # fmt: skip
    assert "CLIP weights: tiny-clip" in proc.stdout and "gazetteer: embedded" in proc.stdout


def test_offline_without_the_clip_weights_says_what_to_do(standin, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache: the CLIP step names the weights, the cache it looked in and
    the ways out (run once online, copy a cache in, or a local checkpoint), exit 2, no traceback, the gazetteer is
    skipped; --dry-run says the size is unknown offline. Once the cache holds the file, --dry-run finds it there."""
    server = standin(config=StandinConfig(models=("llava:7b",)))
    config = write_config(tmp_path / "geoagent.toml", server.url, clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b79k")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = run_cli("setup", "--config", str(config), cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    clip = next(line for line in proc.stdout.splitlines() if line.startswith("CLIP weights:"))
    assert clip.startswith("CLIP weights: FAILED: CLIP weights ViT-B-32/laion2b_s34b_b79k are not available")
    assert str(tmp_path / "hf") in clip and "clip_pretrained to a local checkpoint file" in clip and "HF_HOME" in clip
    assert "gazetteer: skipped: needs the CLIP weights" in proc.stdout

    dry = run_cli("setup", "--dry-run", "--config", str(config), cwd=tmp_path, env=env)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "CLIP weights: would download laion/CLIP-ViT-B-32-laion2B-s34B-b79K/open_clip_model.safetensors (size unknown: offline)" in dry.stdout

    snapshot = tmp_path / "hf" / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0123abcd")
    weights = snapshot / "snapshots" / "0123abcd" / "open_clip_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"\0" * 2048)  # what a copied cache holds (never loaded by a dry run)
    found = run_cli("setup", "--dry-run", "--config", str(config), cwd=tmp_path, env=env)
    assert f"CLIP weights: ViT-B-32/laion2b_s34b_b79k in the Hugging Face cache: {weights} (2.0 kB)" in found.stdout, found.stdout


def test_a_local_checkpoint_is_ready_as_it_is(tmp_path):
    """clip_pretrained naming a checkpoint file on this machine: nothing to fetch, the file and its size named."""
    checkpoint = tmp_path / "clip.safetensors"
    checkpoint.write_bytes(b"\0" * 3000)
    settings = settings_for("http://127.0.0.1:9", tmp_path)
    settings.retrieval.clip_pretrained = str(checkpoint)
    result = clip_step(settings, dry_run=False)
    assert result.state == "ready" and result.summary == f"tiny-clip: local checkpoint {checkpoint} (3.0 kB)"


def test_the_gazetteer_is_embedded_once_with_progress(tmp_path):
    """The gazetteer's places are embedded with their progress counted to the end, cached; a second run finds them."""
    settings = settings_for("http://127.0.0.1:9", tmp_path)
    seen: list[StepProgress] = []
    first = candidates_step(settings, dry_run=False, on_progress=seen.append)
    assert first.state == "done" and seen and seen[-1].completed == seen[-1].total and seen[-1].unit == "places"
    told = len(seen)
    again = candidates_step(settings, dry_run=False, on_progress=seen.append)
    assert again.state == "ready" and "already embedded" in again.summary and len(seen) == told  # nothing embedded again


def test_a_configured_index_is_checked_against_the_embedder(world, tmp_path):
    """With an index configured there is nothing to embed: it is opened and compared with the configured CLIP; an
    index built with another one is named with the fix."""
    settings = settings_for("http://127.0.0.1:9", tmp_path)
    settings.retrieval = type(settings.retrieval)(**world_retrieval_config(world))
    result = candidates_step(settings, dry_run=True, on_progress=lambda _: None)
    assert result.state == "ready" and result.step == "index" and f"{len(world.references):,} reference photos" in result.summary
    settings.retrieval.seed = 7
    mismatch = candidates_step(settings, dry_run=True, on_progress=lambda _: None)
    assert mismatch.state == "failed" and "built with embedder" in mismatch.summary and "rebuild the index" in mismatch.summary


async def test_an_openai_compatible_server_is_checked_and_never_pulled(standin, tmp_path):
    """An OpenAI-compatible profile: ready when its model is listed; a model it lacks is a failure naming it (no
    pull exists for that protocol)."""
    server = standin(config=StandinConfig(models=("llava:7b",)))
    ready = await backend_step("local", settings_for(server.openai_url, tmp_path, kind="openai").backends["local"], dry_run=False, on_progress=lambda _: None)
    assert ready.state == "ready" and "llava:7b" in ready.summary
    missing = await backend_step("local", settings_for(server.openai_url, tmp_path, model="other", kind="openai").backends["local"],
                                 dry_run=False, on_progress=lambda _: None)  # fmt: skip
    assert missing.state == "failed" and "'other'" in missing.summary and missing.exit_code == 2
    assert not [r for r in server.log if r.path == "/api/pull"]


async def test_a_hosted_profile_needs_its_key_variable_and_never_shows_the_key(monkeypatch, tmp_path):
    """litellm profiles: a provider's key variable unset is named (the variable, not a value) with exit 2; a key
    variable named in api_key_env and set is enough, and its value appears nowhere in the result."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    hosted = {"kind": "litellm", "model": "anthropic/claude-3-5-haiku-20241022"}
    settings = Settings(backends={"cloud": hosted}, tasks={"default": "cloud"})
    unset = await backend_step("cloud", settings.backends["cloud"], dry_run=False, on_progress=lambda _: None)
    assert unset.state == "failed" and unset.exit_code == 2 and "ANTHROPIC_API_KEY" in unset.summary

    secret = "sk-ant-test-0123456789abcdefABCDEF"
    monkeypatch.setenv("MY_CLAUDE_KEY", secret)
    settings = Settings(backends={"cloud": {**hosted, "api_key_env": "MY_CLAUDE_KEY"}}, tasks={"default": "cloud"})
    named = await backend_step("cloud", settings.backends["cloud"], dry_run=False, on_progress=lambda _: None)
    assert named.state == "ready" and secret not in named.model_dump_json()
    monkeypatch.delenv("MY_CLAUDE_KEY")
    gone = await backend_step("cloud", settings.backends["cloud"], dry_run=False, on_progress=lambda _: None)
    assert gone.state == "failed" and "MY_CLAUDE_KEY is not set" in gone.summary
