"""The response cache's stores: SQLite (embedded) and a real Redis server (Debian's redis-server, started here on a
free port), the same keys in both, lookups coalesced, failures at start named in one line, failures mid-run
degrading to no caching with one warning."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_cli, settings_for, write_world_config
from geoagent.vlm import VLMPool
from redisd import RedisServer, free_port
from standin import StandinConfig, WorldJudge
from test_batch import journal, path_list, prediction
from test_vlm_client import ask_codes

AGENT = {"strategy": "tournament", "country_prior": True, "reasoning": False}
SUMMARY = re.compile(r"; (\d+) VLM requests, (\d+) cache hits\)")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real Redis, persisting every write to its append-only file in the test's folder."""
    server = RedisServer(tmp_path / "redis-data").start()
    try:
        yield server
    finally:
        server.kill()


def with_cache(config: Path, **keys: object) -> Path:
    """The config with ``[cache]`` keys added (TOML strings quoted)."""
    lines = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in keys.items())
    config.write_text(config.read_text().replace("[cache]\n", "[cache]\n" + lines, 1))
    return config


def requests_and_hits(stderr: str) -> tuple[int, int]:
    found = SUMMARY.search(stderr)
    assert found, stderr
    return int(found[1]), int(found[2])


def answer_keys(server: RedisServer) -> set[str]:
    return set(filter(None, server.command("--scan", "--pattern", "geoagent:answer:*").splitlines()))


# --- the same keys in both stores; copy ------------------------------------------------------------------


async def test_a_run_moves_from_sqlite_to_redis_through_cache_copy_and_back(standin, marker_images, redis_server, tmp_path):
    """Twelve answers cached in SQLite, `geoagent cache copy` into Redis: a run on Redis sends no request and
    gets the same answers; `cache stats` counts 12 on both; copied back into a new SQLite folder, the entries
    are the original's (keys, answers, tasks, token counts)."""
    server = standin()
    sqlite_settings = settings_for("ollama", server, tmp_path)
    pool = VLMPool(sqlite_settings)
    first = await ask_codes(pool, marker_images, 12)
    await pool.aclose()
    assert len(server.chat_requests()) == 12

    copy = run_cli("cache", "copy", str(tmp_path / "cache"), redis_server.url, cwd=tmp_path)
    assert copy.returncode == 0, copy.stderr
    assert copy.stdout.strip() == f"copied 12 cached answers from {tmp_path / 'cache' / 'responses.sqlite3'} to {redis_server.url}"

    redis_settings = sqlite_settings.model_copy(deep=True)
    redis_settings.cache.url = redis_server.url
    pool = VLMPool(redis_settings)
    assert await ask_codes(pool, marker_images, 12) == first
    assert pool.totals().cache_hits == 12 and pool.totals().requests == 0
    await pool.aclose()
    assert len(server.chat_requests()) == 12  # nothing more was sent

    (tmp_path / "redis.toml").write_text(f'[cache]\nurl = "{redis_server.url}"\n')
    stats = run_cli("cache", "stats", "--config", str(tmp_path / "redis.toml"), cwd=tmp_path)
    assert stats.returncode == 0 and stats.stdout.startswith(f"{redis_server.url}: 12 answers"), stats.stdout + stats.stderr
    assert "MarkerAnswer" in stats.stdout and "ollama:llava:7b" in stats.stdout

    back = run_cli("cache", "copy", redis_server.url, f"sqlite://{tmp_path / 'back'}", cwd=tmp_path)
    assert back.returncode == 0, back.stderr
    from geoagent.vlm.cache import SqliteCache

    async def entries(folder: Path) -> list:
        cache = SqliteCache(folder)
        found = sorted((e for batch in [b async for b in cache.entries()] for e in batch), key=lambda e: e.key)
        identities = await cache.identities()
        await cache.aclose()
        return [e.model_dump() for e in found] + [i.model_dump(exclude={"seen"}) for i in identities]  # the Redis run saw it again

    assert await entries(tmp_path / "back") == await entries(tmp_path / "cache")

    cleared = run_cli("cache", "clear", "--config", str(tmp_path / "redis.toml"), cwd=tmp_path)
    assert cleared.stdout.strip() == f"removed 12 cached answers from {redis_server.url}", cleared.stderr
    assert answer_keys(redis_server) == set()


async def test_questions_asked_together_are_looked_up_in_one_round_trip(standin, marker_images, redis_server, tmp_path):
    """Twenty questions started together (a tournament round, a photo's questions) on a warm Redis cache: one
    MGET at the server (its own command statistics), no GET, and every answer served from it."""
    server = standin()
    settings = settings_for("ollama", server, tmp_path, max_concurrency=4)
    settings.cache.url = redis_server.url
    pool = VLMPool(settings)
    first = await ask_codes(pool, marker_images, 20)
    await pool.aclose()
    redis_server.command("CONFIG", "RESETSTAT")

    pool = VLMPool(settings)
    assert await ask_codes(pool, marker_images, 20) == first
    assert pool.totals().cache_hits == 20 and pool.cache.lookups == 1
    await pool.aclose()
    commands = redis_server.command("INFO", "commandstats")
    assert re.search(r"cmdstat_mget:calls=1,", commands), commands
    assert "cmdstat_get:" not in commands


async def test_a_ttl_expires_answers_in_both_stores(standin, marker_images, redis_server, tmp_path):
    """ttl_s = 1: an answer read back at once is a hit; two seconds later it is asked again (Redis expired the
    key; SQLite ignores the old row)."""
    server = standin()
    for url in (None, redis_server.url):
        settings = settings_for("ollama", server, tmp_path / str(bool(url)))
        settings.cache.url, settings.cache.ttl_s = url, 1
        pool = VLMPool(settings)
        await ask_codes(pool, marker_images, 1)
        await ask_codes(VLMPool(settings), marker_images, 1)  # a second pool: only the store can answer
        sent = len(server.chat_requests())
        await asyncio.sleep(2.1)
        fresh = VLMPool(settings)
        await ask_codes(fresh, marker_images, 1)
        assert fresh.totals().requests == 1 and len(server.chat_requests()) == sent + 1, url
        await pool.aclose()
        await fresh.aclose()


# --- failures at start: one line, exit 2 ------------------------------------------------------------------


@pytest.fixture
def world_config(world, tmp_path):
    def make(server, **cache: object) -> Path:
        return with_cache(write_world_config(tmp_path / "g.toml", world, server, tmp_path / "cache", **AGENT), **cache)

    return make


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_redis_down_at_start_is_named_by_the_preflight(world, standin, world_config, tmp_path):
    """[cache] url on a port where nothing listens: `batch` and `locate` stop before any photo with one line
    naming the server and the fix, exit 2; `cache stats` says the same."""
    server = standin(judge=WorldJudge(world.truth))
    url = f"redis://127.0.0.1:{free_port()}/0"
    config = world_config(server, url=url)
    proc = run_cli("batch", str(path_list(tmp_path / "one.txt", [world.queries[0].path])), "--out", str(tmp_path / "b.jsonl"), "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert line.startswith(f"error: cache {url}: cannot reach the Redis server (") and line.endswith(
        "); start it, or unset [cache] url to use the local SQLite cache"
    ), line
    assert server.chat_requests() == []
    located = run_cli("locate", str(world.queries[0].path), "--config", str(config), cwd=tmp_path)
    assert located.returncode == 2 and error_lines(located) == [line]
    stats = run_cli("cache", "stats", "--config", str(config), cwd=tmp_path)
    assert stats.returncode == 2 and error_lines(stats) == [line]


def test_a_redis_password_comes_from_the_variable_named_and_is_written_nowhere(world, standin, world_config, tmp_path):
    """A Redis with requirepass: without password_env the preflight says the server wants one (exit 2); with
    the variable named, a batch caches there; the password appears in no output, journal or cache entry; a
    password written into the URL is refused without being echoed."""
    password = "redis-pass-0123456789"
    redis_server = RedisServer(tmp_path / "redis-auth", password=password).start()
    try:
        server = standin(judge=WorldJudge(world.truth))
        config = world_config(server, url=redis_server.url)
        out = tmp_path / "b.jsonl"
        refused = run_cli("batch", str(path_list(tmp_path / "one.txt", [world.queries[0].path])), "--out", str(out), "--config", str(config), cwd=tmp_path)
        assert refused.returncode == 2
        assert error_lines(refused) == [
            f"error: cache {redis_server.url}: the server refused the password (set [cache] password_env to the variable that holds it)"
        ]
        with_cache(config, password_env="GEOAGENT_TEST_REDIS_PASSWORD")
        env = {"GEOAGENT_TEST_REDIS_PASSWORD": password}
        proc = run_cli("batch", str(path_list(tmp_path / "one.txt", [world.queries[0].path])), "--out", str(out), "--config", str(config), cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
        keys = answer_keys(redis_server)
        assert keys
        stored = "".join(redis_server.command("GET", key) for key in keys) + redis_server.command("HGETALL", "geoagent:identities")
        for text in (proc.stdout, proc.stderr, out.read_text(), stored):
            assert password not in text
        unset = run_cli("batch", str(path_list(tmp_path / "one.txt", [world.queries[0].path])), "--out", str(tmp_path / "c.jsonl"), "--config", str(config), cwd=tmp_path)
        assert error_lines(unset) == [
            "error: cache: environment variable GEOAGENT_TEST_REDIS_PASSWORD is not set (password_env names it); "
            "export GEOAGENT_TEST_REDIS_PASSWORD=<the Redis password>"
        ]
        in_url = redis_server.url.replace("redis://", f"redis://:{password}@")
        config.write_text(config.read_text().replace(redis_server.url, in_url))
        refused = run_cli("batch", str(path_list(tmp_path / "one.txt", [world.queries[0].path])), "--out", str(tmp_path / "d.jsonl"), "--config", str(config), cwd=tmp_path)
        assert refused.returncode == 2 and password not in refused.stderr and "password_env" in refused.stderr, refused.stderr
    finally:
        redis_server.kill()


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_a_corrupt_cache_file_is_one_line_in_every_command(world, standin, world_config, tmp_path, damage):
    """F1: responses.sqlite3 of random bytes, or a real cache whose pages are garbage after the header: `cache
    stats`, `batch` (and for the first, `cache clear` and `locate`) each print one line naming the file and the fix, exit 2, no traceback, and
    no photo is tried."""
    server = standin(judge=WorldJudge(world.truth))
    config = world_config(server)
    cache_file = tmp_path / "cache" / "responses.sqlite3"
    if damage == "random bytes":
        cache_file.parent.mkdir()
        cache_file.write_bytes(os.urandom(64 * 1024))
    else:
        warm = run_cli("batch", str(path_list(tmp_path / "one.txt", [world.queries[0].path])), "--out", str(tmp_path / "w.jsonl"), "--config", str(config), cwd=tmp_path)
        assert warm.returncode == 0, warm.stderr
        data = cache_file.read_bytes()
        cache_file.write_bytes(data[:100] + os.urandom(len(data) // 2))  # the header's first bytes kept, the rest garbage
        for extra in cache_file.parent.glob("responses.sqlite3-*"):
            extra.unlink()
    sent = len(server.chat_requests())
    fix = "delete the file (it holds only cached answers, which are asked again)"
    commands = [["cache", "stats"], ["batch", str(path_list(tmp_path / "two.txt", [world.queries[1].path])), "--out", str(tmp_path / "b.jsonl")]]
    if damage == "random bytes":  # the other commands open the cache the same way: once is enough
        commands += [["cache", "clear"], ["locate", str(world.queries[1].path)]]
    for args in commands:
        proc = run_cli(*args, "--config", str(config), cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        [line] = error_lines(proc)
        assert line.startswith(f"error: cache {cache_file}: not a usable SQLite cache (") and line.endswith(fix), line
    assert len(server.chat_requests()) == sent


def test_a_cache_dir_that_is_a_file_is_one_line(world, standin, world_config, tmp_path):
    """F2: [cache] dir naming an existing file: `cache stats` and `batch` say so in one line (exit 2) instead
    of a FileExistsError traceback or "0 answers"."""
    server = standin(judge=WorldJudge(world.truth))
    config = world_config(server)
    (tmp_path / "cache").write_text("my notes")
    for args in (["cache", "stats"], ["batch", str(path_list(tmp_path / "two.txt", [world.queries[1].path])), "--out", str(tmp_path / "b.jsonl")]):
        proc = run_cli(*args, "--config", str(config), cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert error_lines(proc) == [f"error: cache {tmp_path / 'cache'}: [cache] dir names a file, not a folder; point it at a folder (or move the file away)"]
    assert (tmp_path / "cache").read_text() == "my notes"


# --- failures mid-run: one warning, the run goes on ---------------------------------------------------------


async def test_an_sqlite_error_mid_run_stops_caching_with_one_warning(standin, marker_images, tmp_path):
    """The cache file is destroyed after the first answers: the next questions are still answered (from the
    server), one CacheWarning says caching stopped, later questions warn no more and never raise."""
    from geoagent.vlm.cache import CacheWarning

    server = standin()
    pool = VLMPool(settings_for("ollama", server, tmp_path))
    assert await ask_codes(pool, marker_images, 2) == [100, 101]
    pool.cache.close()  # the next use reopens the file, as a new connection would
    path = tmp_path / "cache" / "responses.sqlite3"
    path.write_bytes(os.urandom(8192))
    for extra in path.parent.glob("responses.sqlite3-*"):
        extra.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert await ask_codes(pool, marker_images, 4) == [100, 101, 102, 103]
        assert await ask_codes(pool, marker_images[4:], 3) == [104, 105, 106]
    said = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert len(said) == 1 and said[0].startswith(f"cache {path}: not a usable SQLite cache"), said
    assert "caching stopped for the rest of this run" in said[0]
    assert pool.totals().requests == 2 + 4 + 3 and pool.totals().cache_hits == 0
    await pool.aclose()


def test_redis_killed_mid_batch_the_batch_finishes_and_a_restarted_redis_keeps_what_was_written(world, standin, world_config, redis_server, tmp_path):
    """Must show: a batch of 12 photos on Redis (100 ms per answer); Redis is SIGKILLed once some answers are
    in it. The batch still locates every photo, says once that caching stopped, exit 0. Redis restarted on its
    data folder: every answer seen before the kill is still there, and the next run (another folder) hits each."""
    server = standin(judge=WorldJudge(world.truth), config=StandinConfig(latency_s=0.1))
    config = world_config(server, url=redis_server.url)
    photos = [q.path for q in world.queries[::4][:12]]
    listing = path_list(tmp_path / "photos.txt", photos)
    out = tmp_path / "first" / "b.jsonl"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "geoagent", "batch", str(listing), "--out", str(out), "--config", str(config)],
        cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.monotonic() + 300
    while len(answer_keys(redis_server)) < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    before_kill = answer_keys(redis_server)
    redis_server.kill()
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert len(journal(out)) == 12 and all("error" not in entry for entry in journal(out))
    said = [line for line in stderr.splitlines() if "caching stopped" in line]
    assert len(said) == 1 and said[0].startswith(f"warning: cache {redis_server.url}: cannot reach the Redis server"), stderr
    requests, _ = requests_and_hits(stderr)
    assert 10 <= len(before_kill) < requests  # killed mid-run: some answers were cached, later ones were not

    redis_server.start()
    assert answer_keys(redis_server) >= before_kill  # nothing written before the kill was lost
    again = run_cli("batch", str(listing), "--out", str(tmp_path / "second.jsonl"), "--config", str(config), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    requests_now, hits = requests_and_hits(again.stderr)
    assert hits >= len(before_kill) and requests_now < requests
    assert sorted(map(prediction, journal(tmp_path / "second.jsonl"))) == sorted(map(prediction, journal(out)))


def test_two_batches_in_two_folders_share_one_redis_cache(world, standin, world_config, redis_server, tmp_path):
    """Must show: a batch, then another in another working folder on the same Redis: the second sends 0
    model requests (every question a cache hit) and writes identical predictions."""
    server = standin(judge=WorldJudge(world.truth))
    config = world_config(server, url=redis_server.url)
    listing = path_list(tmp_path / "photos.txt", [q.path for q in world.queries[1::5][:8]])
    outs = []
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        outs.append(tmp_path / folder / "b.jsonl")
        proc = run_cli("batch", str(listing), "--out", str(outs[-1]), "--config", str(config), cwd=tmp_path / folder)
        assert proc.returncode == 0, proc.stderr
        if folder == "one":
            sent = len(server.chat_requests())
            assert sent > 0 and requests_and_hits(proc.stderr)[0] == sent
    assert len(server.chat_requests()) == sent
    requests, hits = requests_and_hits(proc.stderr)
    assert requests == 0 and hits > 0
    assert sorted(map(prediction, journal(outs[1]))) == sorted(map(prediction, journal(outs[0])))
    assert not (tmp_path / "two" / "cache").exists() and not (tmp_path / "cache").exists()  # no SQLite file on the side


def test_a_redis_url_without_the_redis_extra_or_with_another_scheme_is_one_line(tmp_path):
    """No redis-py installed: `cache stats` on a redis:// URL names the extra to install (exit 2); a URL of
    another scheme is refused naming the schemes there are."""
    from test_packaging import run_cli_without

    (tmp_path / "geoagent.toml").write_text('[cache]\nurl = "redis://127.0.0.1:6379/0"\n')
    proc = run_cli_without("redis", "cache", "stats", cwd=tmp_path)
    assert proc.returncode == 2 and error_lines(proc) == [
        "error: cache redis://127.0.0.1:6379/0: a Redis cache needs the redis extra: pip install 'geoagent-vlm[redis]'"
    ], proc.stderr
    (tmp_path / "geoagent.toml").write_text('[cache]\nurl = "memcached://127.0.0.1:11211"\n')
    proc = run_cli("cache", "stats", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    [line] = error_lines(proc)
    assert "not a cache URL: use sqlite:///FOLDER, redis://HOST:PORT/DB or rediss://HOST:PORT/DB (scheme 'memcached')" in line, line
