"""A Redis cache over TLS (``rediss://``): a real redis-server speaking TLS only, with a self-signed certificate
made here; GeoAgent trusts it through the URL's ``ssl_ca_certs`` and reports an untrusted or plain connection in
one line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_cli, settings_for
from geoagent.vlm import VLMPool
from redisd import RedisServer, TlsFiles
from test_vlm_client import ask_codes


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server that accepts TLS connections only."""
    folder = tmp_path_factory.mktemp("tls-redis")
    server = RedisServer(folder / "data", tls=TlsFiles.make(folder / "tls")).start()
    try:
        yield server
    finally:
        server.kill()


async def test_answers_are_stored_and_read_back_over_tls(standin, marker_images, tls_redis, tmp_path):
    """A second pool on the same rediss:// URL is served every answer from the TLS server, which holds them
    (read by redis-cli over TLS)."""
    server = standin()
    settings = settings_for("ollama", server, tmp_path)
    settings.cache.url = tls_redis.url
    first_pool = VLMPool(settings)
    first = await ask_codes(first_pool, marker_images, 5)
    await first_pool.aclose()

    second_pool = VLMPool(settings)
    assert await ask_codes(second_pool, marker_images, 5) == first
    assert second_pool.totals().cache_hits == 5 and second_pool.totals().requests == 0
    await second_pool.aclose()
    assert len(server.chat_requests()) == 5
    assert tls_redis.command("--scan", "--pattern", "geoagent:answer:*").count("geoagent:answer:") == 5


def cache_stats(tmp_path: Path, url: str) -> tuple[int, str, str]:
    config = tmp_path / "geoagent.toml"
    config.write_text(f'[cache]\nurl = "{url}"\n')
    proc = run_cli("cache", "stats", "--config", str(config), cwd=tmp_path)
    return proc.returncode, proc.stdout, proc.stderr


def test_cache_stats_reads_the_tls_server(tls_redis, tmp_path):
    """``geoagent cache stats`` works on a rediss:// cache whose CA the URL names."""
    code, out, err = cache_stats(tmp_path, tls_redis.url)
    assert code == 0, err
    assert f"127.0.0.1:{tls_redis.port}" in out


WRONGLY = {  # how the URL is wrong -> (its query or scheme, what the one line must say)
    "untrusted certificate": ("rediss", "", "TLS certificate is not trusted"),
    "missing CA file": ("rediss", "?ssl_ca_certs=/nonexistent/ca.pem", "does not exist: /nonexistent/ca.pem"),
    "plain connection": ("redis", "", "use a rediss:// URL"),
}


@pytest.mark.parametrize("how", WRONGLY)
def test_a_tls_server_reached_wrongly_is_one_line_saying_what_to_fix(tls_redis, tmp_path, how):
    """No CA for a self-signed certificate, a CA file that is not there, redis:// to a TLS-only port: exit 2, one
    line naming the cache, the problem and its fix (not "start the server": it is running), no traceback."""
    scheme, query, says = WRONGLY[how]
    code, out, err = cache_stats(tmp_path, f"{scheme}://127.0.0.1:{tls_redis.port}/0{query}")
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"127.0.0.1:{tls_redis.port}" in lines[0] and says in lines[0], lines[0]
    assert "start it" not in lines[0]


def redis_cache(url: str):
    from geoagent.vlm.cache.redis import RedisCache

    return RedisCache(url, password=None, timeout_s=1.0, ttl_s=None, prefix="geoagent:")


def test_a_certificate_failure_kept_only_as_the_errors_context_is_still_named():
    """redis-py before 5.1 raises ``ConnectionError("Error 1 connecting to host. 1.")`` from inside its handler of
    the TLS failure, so the certificate problem is only in ``__context__``: the line still says it is not trusted."""
    import ssl

    from redis.exceptions import ConnectionError as RedisConnectionError

    try:
        try:
            raise ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
        except OSError:
            raise RedisConnectionError("Error 1 connecting to 127.0.0.1:6380. 1.")
    except RedisConnectionError as exc:
        said = redis_cache("rediss://127.0.0.1:6380/0").problem(exc)
    assert said.startswith("the Redis server's TLS certificate is not trusted ([SSL: CERTIFICATE_VERIFY_FAILED]"), said


def test_a_connection_closed_after_the_server_answered_is_a_lost_server_not_a_tls_hint():
    """"Connection closed by server" on a redis:// URL is a TLS-only server before the first answer, and a server
    that went away (killed, restarted) after it: only the first gets the rediss:// hint."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    cache = redis_cache("redis://127.0.0.1:6380/0")
    closed = RedisConnectionError("Connection closed by server.")
    assert "use a rediss:// URL" in cache.problem(closed)
    cache.reached = True
    assert cache.problem(closed).startswith("cannot reach the Redis server (Connection closed by server.)")
