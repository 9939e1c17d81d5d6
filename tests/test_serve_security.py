"""`geoagent serve` is private by default: a non-loopback bind needs --allow-remote and a token, every bind checks the
Host header, and cross-site requests are refused. The real server (uvicorn, started by the CLI) in a subprocess,
bound to every address but reached through 127.0.0.1; the guard's host parsing also in-process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from browser import offline_browser
from conftest import indexed_world, run_cli, write_world_config
from standin import StandinConfig, StandinServer, WorldJudge
from test_serve import READY_LINE, start_serve, stop

ENV_TOKEN = "SERVE_TEST_TOKEN"  # not GEOAGENT_*: start_serve drops those


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """Eight reference places: enough for the server to start and answer one photo."""
    return indexed_world(tmp_path_factory.mktemp("small-world"), places_per_country=1)


@pytest.fixture(scope="module")
def vlm(small_world) -> Iterator[StandinServer]:
    with StandinServer(WorldJudge(small_world.truth), StandinConfig(capacity=16)) as server:
        yield server


@dataclass
class Remote:
    """A server bound to every address: ``url`` reaches it through 127.0.0.1; ``printed`` is what it printed."""

    url: str
    token: str
    printed: str
    stderr: str
    root: Path


@pytest.fixture(scope="module")
def remote(small_world, vlm, tmp_path_factory) -> Iterator[Remote]:
    """`geoagent serve --host 0.0.0.0 --allow-remote --port 0`."""
    root = tmp_path_factory.mktemp("remote")
    config = write_world_config(root / "geoagent.toml", small_world, vlm, root / "cache")
    process, printed_url = start_serve(root, "--host", "0.0.0.0", "--allow-remote", "--port", "0", "--config", str(config))
    parts = urlsplit(printed_url)
    token = parse_qs(parts.query)["token"][0]
    yield Remote(f"http://127.0.0.1:{parts.port}/", token, (root / "stdout.txt").read_text(), (root / "stderr.txt").read_text(), root)
    stop(process)


def test_a_non_loopback_host_without_allow_remote_is_refused_in_one_line(tmp_path):
    """`serve --host 0.0.0.0` without --allow-remote: exit 2 and one line naming the flag, before anything starts."""
    proc = run_cli("serve", "--host", "0.0.0.0", "--port", "0", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "--allow-remote" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert READY_LINE not in proc.stdout


def test_remote_requests_need_the_token(remote, small_world, vlm):
    """With --allow-remote: a warning, and the generated token printed once, in the URL. Without the token (or with
    a wrong one) the page, the API and the page's files are 401 and nothing is asked of the model; with it as a
    bearer header the API answers (200, a located photo)."""
    assert "warning: --allow-remote" in remote.stderr and remote.token not in remote.stderr
    assert remote.printed.count(remote.token) == 1 and len(remote.token) >= 40
    asked = len(vlm.chat_requests())
    photo = {"photo": ("street.jpg", small_world.queries[0].path.read_bytes(), "image/jpeg")}
    with httpx.Client(base_url=remote.url, timeout=60) as client:
        for path in ("/", "/api/config", "/static/app.js"):
            assert client.get(path).status_code == 401, path
        refused = client.post("/api/locate", files=photo)
        assert refused.status_code == 401 and "token" in refused.json()["error"]
        wrong = client.post("/api/locate", files=photo, headers={"authorization": "Bearer " + remote.token[:-1] + "x"})
        assert wrong.status_code == 401
        assert len(vlm.chat_requests()) == asked
        bearer = {"authorization": f"Bearer {remote.token}"}
        assert client.get("/api/config", headers=bearer).status_code == 200
        located = client.post("/api/locate", files=photo, headers=bearer)
    assert located.status_code == 200 and located.json()["candidates"], located.text
    assert len(vlm.chat_requests()) > asked


def test_the_printed_url_sets_a_strict_http_only_cookie(remote):
    """Opening the printed URL answers with a cookie (HttpOnly, SameSite=Strict) and a redirect to the same page
    without the token; the cookie then admits the page and its API, and a cross-site request carrying it is still
    refused (403)."""
    with httpx.Client(base_url=remote.url, timeout=30) as client:
        first = client.get(f"/?token={remote.token}")
        assert first.status_code == 303 and first.headers["location"] == "/"
        cookie = first.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and remote.token.lower() in cookie
        assert client.get("/").status_code == 200  # the client kept the cookie
        assert client.get("/api/config").status_code == 200
        assert client.get("/api/config", headers={"origin": "https://evil.example"}).status_code == 403
        assert client.get("/api/config", headers={"sec-fetch-site": "cross-site", "sec-fetch-mode": "cors"}).status_code == 403


def test_any_other_host_name_is_refused_even_with_the_token(remote):
    """Host checking applies on an every-address bind too: `Host: evil.example` is 400 whatever the credentials."""
    bearer = {"authorization": f"Bearer {remote.token}"}
    response = httpx.get(remote.url + "api/config", headers={"host": "evil.example", **bearer}, timeout=10)
    assert response.status_code == 400 and "host" in response.json()["error"]
    assert httpx.get(remote.url, headers={"host": "evil.example:80"}, timeout=10).status_code == 400


def test_the_printed_url_opens_the_page_in_a_real_browser(remote):
    """Chromium opening the printed URL (through 127.0.0.1) ends on the page, without the token in its address, and
    the page's own requests (its files, /api/config) pass with the cookie alone."""
    with offline_browser(allow=(remote.url,)) as browser:
        page = browser.new_page()
        page.goto(f"{remote.url}?token={remote.token}")
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        assert page.url == remote.url
        cookies = browser.context.cookies()
    assert [(c["httpOnly"], c["sameSite"]) for c in cookies] == [(True, "Strict")]
    refused = [e for e in page.geoagent_errors if "INTERNET_DISCONNECTED" not in e]  # only basemap tiles leave
    assert not refused and all("tile.openstreetmap.org" in url for url in browser.blocked), (refused, browser.blocked)


def test_a_token_from_the_environment_is_required_on_loopback_and_never_printed(small_world, vlm, tmp_path, monkeypatch):
    """`[serve] token_env` names the variable holding the token: the server asks for it even on 127.0.0.1, says
    which variable holds it, and never prints its value; on IPv6 loopback (::1, bracketed in Host) it answers."""
    secret = "correct-horse-battery-staple-42"
    config = write_world_config(tmp_path / "geoagent.toml", small_world, vlm, tmp_path / "cache")
    config.write_text(config.read_text() + f'[serve]\ntoken_env = "{ENV_TOKEN}"\n')
    monkeypatch.setenv(ENV_TOKEN, secret)
    process, url = start_serve(tmp_path, "--host", "::1", "--port", "0", "--config", str(config))
    try:
        assert url.startswith("http://[::1]:") and "token" not in url
        assert httpx.get(url + "api/config", timeout=10).status_code == 401
        assert httpx.get(url + "api/config", headers={"authorization": f"Bearer {secret}"}, timeout=10).status_code == 200
    finally:
        stop(process)
    printed = (tmp_path / "stdout.txt").read_text() + (tmp_path / "stderr.txt").read_text()
    assert secret not in printed and ENV_TOKEN in printed


def test_an_unset_or_short_environment_token_is_a_config_error(tmp_path):
    """A token_env naming an unset variable, a token too short to resist guessing, or a token pasted in place of the
    variable's name: one line, exit 2, the value never shown."""
    (tmp_path / "geoagent.toml").write_text(f'[serve]\ntoken_env = "{ENV_TOKEN}"\n')
    unset = run_cli("serve", "--port", "0", cwd=tmp_path)
    assert unset.returncode == 2 and unset.stderr.count("\n") == 1 and f"{ENV_TOKEN}, which is not set" in unset.stderr
    short = run_cli("serve", "--port", "0", cwd=tmp_path, env={ENV_TOKEN: "abc123"})
    assert short.returncode == 2 and "shorter than 16 characters" in short.stderr and "abc123" not in short.stderr
    pasted = "Zq8vT3kLmP0xR7sW2yB5nH4j"  # the token itself where its variable's name belongs
    (tmp_path / "geoagent.toml").write_text(f'[serve]\ntoken_env = "{pasted}"\n')
    wrong = run_cli("serve", "--port", "0", cwd=tmp_path)
    assert wrong.returncode == 2 and "looks like a token" in wrong.stderr and pasted not in wrong.stderr


async def _status(access, host: str, **headers: str) -> int:
    """The status the guard gives a request with this Host header (the app behind it answers 200)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from geoagent.web.guard import Guard

    app = Starlette(routes=[Route("/api/x", lambda request: PlainTextResponse("ok"))], middleware=[Middleware(Guard, access=access)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
        return (await client.get("/api/x", headers={"host": host, **headers})).status_code


HOSTS = {  # (bound host, Host header) -> status
    ("::1", "[::1]:8000"): 200,  # IPv6 in brackets, as browsers send it (Starlette's TrustedHost once read "[")
    ("::1", "[0:0::1]:8000"): 200,
    ("::1", "[::1]"): 200,
    ("::1", "::1"): 400,  # a bare IPv6 address is not a valid Host header
    ("::1", "[::2]:8000"): 400,
    ("127.0.0.1", "LOCALHOST:8000"): 200,
    ("127.0.0.1", "localhost.:8000"): 200,
    ("127.0.0.1", "127.0.0.1:8000"): 200,
    ("127.0.0.1", "evil.example:8000"): 400,
    ("127.0.0.1", "127.0.0.1:80x"): 400,
    ("127.0.0.1", ""): 400,
    ("0.0.0.0", "192.168.1.20:8000"): 200,  # an every-address bind answers to any of its IP addresses
    ("0.0.0.0", "[fe80::1]:8000"): 200,
    ("0.0.0.0", "evil.example"): 400,  # ... but to no name it was not given
    ("192.168.1.20", "192.168.1.21:8000"): 400,
}


@pytest.mark.parametrize(("bound", "host"), list(HOSTS))
def test_the_host_check_reads_every_form_of_host(bound, host):
    """The Host check parses names, IPv4 and bracketed IPv6 (with ports) itself, so `--host ::1` works whatever
    Starlette's version; everything not this server's is 400."""
    from geoagent.web.guard import Access

    assert asyncio.run(_status(Access.plan(bound), host)) == HOSTS[(bound, host)]


def test_configured_host_names_are_answered():
    """`[serve] allowed_hosts` adds the names other computers use (a reverse proxy's); others stay refused."""
    from geoagent.web.guard import Access

    access = Access.plan("0.0.0.0", ["Photos.Example.org"])
    assert asyncio.run(_status(access, "photos.example.org:443")) == 200
    assert asyncio.run(_status(access, "other.example.org")) == 400


def test_tile_templates_become_valid_csp_sources():
    """A tile template's `{s}` subdomains become a `*.` wildcard (a `{` in img-src is an invalid CSP source); a
    template that is not an http(s) URL, or would smuggle text into the header, is a ConfigError."""
    from geoagent.errors import ConfigError
    from geoagent.web.app import tile_source

    assert tile_source("https://{s}.tile.openstreetmap.org/{z}/{x}/{y}.png") == "https://*.tile.openstreetmap.org"
    assert tile_source("https://tile.openstreetmap.org/{z}/{x}/{y}.png") == "https://tile.openstreetmap.org"
    assert tile_source("http://127.0.0.1:8080/{z}/{x}/{y}.png") == "http://127.0.0.1:8080"
    assert tile_source(None) == ""
    for bad in ("file:///tiles/{z}.png", "https://x.org; script-src *", "tiles/{z}/{x}/{y}.png"):
        with pytest.raises(ConfigError, match="not a tile URL template"):
            tile_source(bad)


def test_allowed_hosts_are_names_or_addresses():
    """`[serve] allowed_hosts` takes host names and IP addresses; a URL or a host:port would never match a Host
    header, so it is refused at load time rather than silently ignored."""
    from pydantic import ValidationError

    from geoagent.config import Settings

    assert Settings(serve={"allowed_hosts": ["photos.example.org", "[::1]", "10.0.0.1"]}).serve.allowed_hosts
    for bad in ("http://photos.example.org", "photos.example.org:8000", "two words"):
        with pytest.raises(ValidationError, match="not a host name or an IP address"):
            Settings(serve={"allowed_hosts": [bad]})
