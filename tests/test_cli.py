"""The command line as a user meets it: help is fast, errors are one line with the right exit code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import run_cli

HEAVY = ("torch", "open_clip", "faiss", "litellm", "ray")


def test_help_imports_no_heavy_module(tmp_path):
    """`geoagent --help` must stay fast: torch, open_clip, faiss, litellm and ray load only when needed."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "geoagent", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "Usage" in proc.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert not imported & set(HEAVY), imported & set(HEAVY)


def test_unknown_config_key_is_one_line_exit_2(tmp_path):
    (tmp_path / "geoagent.toml").write_text('[backends.local]\nmodle = "llava"\n')
    proc = run_cli("cache", "stats", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: geoagent.toml: unknown key 'backends.local.modle' (did you mean 'model'?)"
    assert "Traceback" not in proc.stderr + proc.stdout


def test_every_config_flag_is_honoured_with_exit_2(tmp_path):
    bad = tmp_path / "other.toml"
    bad.write_text("[tasks]\ndefault = 'missing'\n")
    for command in (["config", "show"], ["cache", "stats"], ["cache", "clear"], ["check"]):
        proc = run_cli(*command, "--config", str(bad), cwd=tmp_path)
        assert proc.returncode == 2, command
        assert "tasks.default routes to backend profile 'missing'" in proc.stderr


def test_check_names_the_unreachable_server_and_how_to_start_it(tmp_path):
    (tmp_path / "geoagent.toml").write_text('[backends.local]\nbase_url = "http://127.0.0.1:9"\n')
    proc = run_cli("check", cwd=tmp_path)
    assert proc.returncode == 1
    assert "cannot connect to http://127.0.0.1:9; is `ollama serve` running there?" in proc.stdout


@pytest.mark.parametrize("route", ["ollama", "openai"])
def test_check_finds_a_missing_model(route, standin, tmp_path):
    server = standin()
    url = server.url if route == "ollama" else server.openai_url
    (tmp_path / "geoagent.toml").write_text(f'[backends.local]\nkind = "{route}"\nmodel = "llava:13b"\nbase_url = "{url}"\n')
    proc = run_cli("check", cwd=tmp_path)
    assert proc.returncode == 1
    assert ("ollama pull llava:13b" if route == "ollama" else "no model 'llava:13b'") in proc.stdout
    (tmp_path / "geoagent.toml").write_text(f'[backends.local]\nkind = "{route}"\nmodel = "llava:7b"\nbase_url = "{url}"\n')
    assert "ok: llava:7b" in run_cli("check", cwd=tmp_path).stdout


def test_cache_stats_and_clear(tmp_path):
    import asyncio

    from geoagent.vlm.cache import CachedAnswer, SqliteCache
    from geoagent.vlm.types import Usage

    async def fill() -> None:
        cache = SqliteCache(tmp_path / "cache")
        for i in range(3):
            await cache.put(f"k{i}", kind="ollama", model="llava:7b", task="PairwiseAnswer", entry=CachedAnswer(answer={"i": i}, usage=Usage()))
        await cache.aclose()

    asyncio.run(fill())
    stats = run_cli("cache", "stats", cwd=tmp_path)
    assert stats.returncode == 0 and "3 answers" in stats.stdout and "PairwiseAnswer" in stats.stdout
    cleared = run_cli("cache", "clear", cwd=tmp_path)
    assert "removed 3 cached answers" in cleared.stdout
    assert "0 answers" in run_cli("cache", "stats", cwd=tmp_path).stdout
