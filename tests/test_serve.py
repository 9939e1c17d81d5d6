"""`geoagent serve` end to end: the real server (uvicorn, started by the CLI) against the stand-in VLM server and
the test world; its JSON API, its upload guards, its event stream, and the page in a real headless Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from browser import artifacts_dir, offline_browser
from conftest import run_cli, world_retrieval_config, world_settings, write_world_config
from standin import StandinConfig, StandinServer, WorldJudge
from test_packaging import run_cli_without

UPLOAD_LIMIT_MB = 1  # small, so an oversized upload is cheap to send
SLOTS = 2  # the backend profile's max_concurrency: what every tab together may have in flight
LATENCY_S = 0.05  # the stand-in's answer time, so that questions from several tabs overlap
STARTUP_TIMEOUT_S = 120
READY_LINE = "GeoAgent page at "
STREAM_CLEANUP_S = 5  # a stream's upload is removed just after its last event is sent: allow for that


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]
    uploads: Path  # the server's TMPDIR: where its per-request folders are made
    config: Path
    root: Path
    stderr: Path

    def post(self, path: str, files: dict[str, Any] | None = None, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path.lstrip("/"), files=files, timeout=60, **kwargs)

    def photo(self, path: Path, name: str | None = None) -> dict[str, Any]:
        return {"photo": (name or path.name, path.read_bytes(), "image/jpeg")}

    def leftovers(self, wait_s: float = 0.0) -> list[str]:
        """What the server left in its temporary folder, waiting up to ``wait_s`` for it to go (a stream's
        folder is removed just after its last byte is sent)."""
        deadline = time.monotonic() + wait_s
        while True:
            left = sorted(str(p.relative_to(self.uploads)) for p in self.uploads.rglob("*"))
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)


@pytest.fixture(scope="module")
def vlm(world) -> Iterator[StandinServer]:
    """One stand-in VLM server for the module, knowing where every world photo was taken."""
    with StandinServer(WorldJudge(world.truth), StandinConfig(capacity=64, latency_s=LATENCY_S)) as server:
        yield server


def start_serve(root: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """`geoagent serve ARGS` in its own process, run in ``root`` with TMPDIR ``root/tmp`` and no GEOAGENT_* variables
    (stdout and stderr to ``root/stdout.txt``, ``root/stderr.txt``); the process and the page URL it printed."""
    uploads = root / "tmp"
    uploads.mkdir(exist_ok=True)
    out, err = root / "stdout.txt", root / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEOAGENT_")} | {"TMPDIR": str(uploads)}
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "geoagent", "serve", *args], cwd=root, env=env, stdout=stdout, stderr=stderr)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while READY_LINE not in out.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"geoagent serve did not start: {err.read_text()}")
        time.sleep(0.1)
    return process, out.read_text().split(READY_LINE)[1].split()[0]


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def served(world, vlm, tmp_path_factory) -> Iterator[Served]:
    """`geoagent serve --port 0` in its own process: tournament reranking with the prior and reasoning on."""
    root = tmp_path_factory.mktemp("serve")
    config = write_world_config(root / "geoagent.toml", world, vlm, root / "cache", backend={"max_concurrency": SLOTS},
                                strategy="tournament", country_prior=True, reasoning=True)
    process, url = start_serve(root, "--port", "0", "--config", str(config), "--max-upload-mb", str(UPLOAD_LIMIT_MB))
    yield Served(url, process, root / "tmp", config, root, root / "stderr.txt")
    stop(process)


def _comparable(result: dict[str, Any]) -> dict[str, Any]:
    """A locate object without what differs between two runs of one photo: its label and its cost."""
    return {k: v for k, v in result.items() if k not in ("image", "stats")}


def _events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, its JSON data) of every server-sent event in ``text``."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = block.splitlines()
        name = next((line[6:].strip() for line in lines if line.startswith("event:")), None)
        data = "\n".join(line[5:].lstrip() for line in lines if line.startswith("data:"))
        if name and data:
            events.append((name, json.loads(data)))
    return events


def test_api_locate_returns_the_locate_json_object(served, world):
    """POST /api/locate answers with the very object `geoagent locate --json` prints for the same photo and config,
    labelled with the uploaded file's name (never the server's temporary path)."""
    photo = world.queries[0].path
    cli = run_cli("locate", str(photo), "--json", "--config", str(served.config), cwd=served.root)
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)
    response = served.post("/api/locate", served.photo(photo))
    assert response.status_code == 200, response.text
    got = response.json()
    assert _comparable(got) == _comparable(expected)
    assert got["image"] == photo.name
    assert set(got["stats"]) - {"cost_usd"} == set(expected["stats"]) - {"cost_usd"}  # unset cost: left out, as by the CLI
    assert served.leftovers() == []


BAD_UPLOADS = {
    "text posing as a JPEG": (415, {"photo": ("holiday.jpg", b"this is a text file, not a photo\n", "image/jpeg")}, "holiday.jpg: not an image"),
    "a JPEG cut short": (422, None, "cut.jpg: "),
    "no photo field": (400, {"picture": ("a.jpg", b"\xff\xd8\xff", "image/jpeg")}, "no file in the field 'photo'"),
    "an empty photo": (400, {"photo": ("empty.jpg", b"", "image/jpeg")}, "empty.jpg: empty file"),
    "larger than the limit": (413, {"photo": ("big.jpg", b"\xff\xd8\xff" + bytes(int(UPLOAD_LIMIT_MB * 1e6)), "image/jpeg")}, f"{UPLOAD_LIMIT_MB:g} MB upload limit"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_a_bad_upload_is_a_clear_4xx_and_the_server_answers_the_next_request(served, world, case):
    """Oversized, not an image (whatever its name and content type), truncated, empty or missing: a 4xx JSON error
    naming the problem, nothing left on disk, and the next photo is located as usual."""
    status, files, message = BAD_UPLOADS[case]
    if files is None:
        files = {"photo": ("cut.jpg", world.queries[1].path.read_bytes()[:2000], "image/jpeg")}
    response = served.post("/api/locate", files)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert served.leftovers() == []
    after = served.post("/api/locate", served.photo(world.queries[0].path))
    assert after.status_code == 200 and after.json()["candidates"]


def test_requests_that_are_not_uploads_from_the_page_are_refused(served, world, vlm):
    """A body that is not a multipart form is 415; a form another web site posts from the user's browser (its
    Origin, or the browser's Sec-Fetch-Site) is 403; a DNS-rebinding page (the server reached under the attacker's
    name, Origin equal to Host) and any other host name are 400, on this loopback bind as on any other. None of
    them asks the model anything."""
    not_form = served.post("/api/locate", content=b"{}", headers={"content-type": "application/json"})
    assert not_form.status_code == 415 and "multipart/form-data" in not_form.json()["error"]
    asked = len(vlm.chat_requests())
    photo = served.photo(world.queries[0].path, name="fresh.jpg")
    foreign = served.post("/api/locate", photo, headers={"origin": "https://evil.example"})
    assert foreign.status_code == 403 and "cross-origin" in foreign.json()["error"]
    fetched = served.post("/api/locate", photo, headers={"sec-fetch-site": "cross-site", "sec-fetch-mode": "cors"})
    assert fetched.status_code == 403 and "cross-origin" in fetched.json()["error"]
    port = served.url.rstrip("/").rsplit(":", 1)[1]
    rebound = served.post("/api/locate", photo, headers={"host": f"evil.example:{port}", "origin": f"http://evil.example:{port}"})
    assert rebound.status_code == 400 and "host" in rebound.json()["error"]
    assert httpx.get(served.url, headers={"host": "evil.example"}, timeout=10).status_code == 400
    assert len(vlm.chat_requests()) == asked
    assert served.leftovers() == []


def png_header(width: int, height: int) -> bytes:
    """A small PNG file that declares ``width`` x ``height`` RGB pixels (its data is a few bytes: a bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("endpoint", ["/api/locate", "/api/locate/stream"])
def test_a_decompression_bomb_is_a_422_on_both_apis(served, endpoint):
    """An upload over the pixel limit is refused from its header with 422 and one line naming it, on the JSON API
    and the stream alike: twice Pillow's limit (Pillow itself refuses to open it) and just over it (Pillow would
    open it with a warning). No traceback in the server's log, nothing left on disk, the server goes on."""
    for size in ((30_000, 30_000), (10_000, 9_000)):
        response = served.post(endpoint, {"photo": ("bomb.png", png_header(*size), "image/png")})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error.startswith("bomb.png: refused: ") and "pixel" in error and "\n" not in error, error
    assert "Traceback" not in served.stderr.read_text()
    assert served.leftovers() == []
    assert httpx.get(served.url + "api/config", timeout=10).status_code == 200


def test_the_stream_tells_each_step_then_the_same_result(served, world):
    """The event stream shows retrieval, the prior, the guesses and every match as decided (each sent when it
    happens, not all at the end), then the answer's map data, then the result, which equals the JSON API's answer (listening changes nothing)."""
    photo = world.queries[2].path  # not located before: the questions take the stand-in's time
    arrived: dict[str, float] = {}
    lines = []
    with httpx.stream("POST", served.url + "api/locate/stream?explain=true", files=served.photo(photo), timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith("event:"):
                arrived.setdefault(line[6:].strip(), time.monotonic())
    assert arrived["result"] - arrived["candidates"] > LATENCY_S  # streamed: the matches were still being asked
    events = _events("\n".join(lines))
    names = [name for name, _ in events]
    assert names[-1] == "result" and "error" not in names
    assert {"candidates", "prior", "guesses", "rerank", "match"} <= set(names)
    assert names.index("candidates") < names.index("rerank") < names.index("match")
    result = events[-1][1]
    matches = [data["match"] for name, data in events if name == "match"]
    assert len(matches) == len(result["trace"]["matches"]) and all(m in result["trace"]["matches"] for m in matches)
    drawn = events[-2][1]  # the answer's map, just before the result: what the page draws
    assert names[-2] == "map" and [(p["lat"], p["lon"]) for p in drawn["photos"]] == [(result["lat"], result["lon"])]
    assert [c["id"] for c in drawn["photos"][0]["candidates"]] == [c["id"] for c in result["candidates"]]
    prior = next(data for name, data in events if name == "prior")
    assert prior["prior"] == result["prior"]
    plain = served.post("/api/locate?explain=true", served.photo(photo)).json()
    assert {k: v for k, v in _comparable(result).items() if k != "trace"} == {k: v for k, v in _comparable(plain).items() if k != "trace"}
    in_order = lambda matches: sorted(matches, key=json.dumps)  # noqa: E731 - a round's matches finish in any order
    assert in_order(result["trace"]["matches"]) == in_order(plain["trace"]["matches"])
    assert served.leftovers(wait_s=STREAM_CLEANUP_S) == []


def test_tabs_at_once_share_one_agent_and_its_concurrency_limit(served, world, vlm):
    """Three pages locating at once are all answered, and together never have more questions at the VLM server than
    the profile's max_concurrency: one agent serves them all (an agent per request would allow three times as many)."""
    photos = [q.path for q in world.queries[6:9]]  # not located before: every question is really asked

    async def tabs() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            return await asyncio.gather(*(client.post("api/locate/stream", files=served.photo(p)) for p in photos))

    vlm.max_busy = 0
    responses = asyncio.run(tabs())
    assert [_events(r.text)[-1][0] for r in responses] == ["result"] * len(photos)
    assert vlm.max_busy == SLOTS, vlm.max_busy
    assert served.leftovers(wait_s=STREAM_CLEANUP_S) == []


def test_a_stream_the_client_abandons_leaves_no_files(served, world):
    """Closing the page mid-run cancels the work and removes the upload."""
    photo = world.queries[3].path  # not located before: its questions are really asked
    with httpx.stream("POST", served.url + "api/locate/stream", files=served.photo(photo), timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event:"):
                break  # the run has started: go away
    assert served.leftovers(wait_s=10) == []
    assert httpx.get(served.url + "api/config", timeout=10).status_code == 200


def test_the_page_locates_an_uploaded_photo_in_a_real_browser(served, world, tmp_path):
    """Through the page's file input in headless Chromium: the agent's steps stream in, the answer appears on the
    map (one marker per candidate plus the prediction and each reasoning guess), with the explanation; Leaflet and
    everything else come from this server: only basemap tiles were asked of the outside, and they were refused."""
    photo = world.queries[4].path
    with offline_browser(allow=(served.url,)) as browser:
        page = browser.new_page()
        page.goto(served.url)
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        page.set_input_files("#photo", str(photo))
        page.wait_for_selector("path.geoagent-prediction", timeout=60_000)
        steps = page.locator("#steps li").all_inner_texts()
        candidates = page.locator("path.geoagent-candidate").count()
        guesses = page.locator("path.geoagent-guess").count()
        summary = page.locator("#summary").inner_text()
        page.screenshot(path=str(artifacts_dir() / "serve-page.png"), full_page=True)
        assert page.locator("#error").is_hidden()
        exif_shown = page.locator("#exif").is_visible()
        assert page.eval_on_selector("#preview", "img => img.complete && img.naturalWidth > 0")  # the photo is shown
        # The icon is inline: the browser has no reason to ask /favicon.ico (and get a 404).
        assert page.eval_on_selector("link[rel=icon]", "link => link.href").startswith("data:image/svg+xml,")
    assert not [e for e in page.geoagent_errors if "Content Security Policy" in e], page.geoagent_errors
    expected = served.post("/api/locate?explain=true", served.photo(photo)).json()  # answered from the cache now
    assert candidates == len(expected["candidates"]) and guesses == len(expected["trace"]["guesses"]) > 0
    assert any(s.startswith("Country prior:") for s in steps) and any(s.startswith("Guess 1:") for s in steps)
    assert sum(" vs " in s for s in steps) == len(expected["trace"]["matches"]) > 0 and steps[-1] == "Done."
    assert f"{expected['lat']:.4f}, {expected['lon']:.4f}" in summary
    assert exif_shown == bool(expected.get("exif"))  # the EXIF panel shows exactly when the answer has EXIF
    assert all(re.search(r"tile\.openstreetmap\.org/\d+/\d+/\d+\.png$", url) for url in browser.blocked), browser.blocked
    assert served.leftovers(wait_s=STREAM_CLEANUP_S) == []


async def test_a_listener_hears_each_step_as_it_happens_and_changes_nothing(world, world_retriever, vlm, tmp_path):
    """locate(on_event=...) tells retrieval's candidates, the prior, the guesses, the pool and every match, in the
    order they happen, and ends with the very result it returns; without a listener (and its own cache, so every
    question is really asked) the same photo gets the same answer."""
    from geoagent.agent.controller import GeoAgent
    from geoagent.agent.events import Done

    photo = world.queries[5].path
    knobs = {"strategy": "tournament", "country_prior": True, "reasoning": True}
    heard: list[Any] = []
    async with GeoAgent(world_settings(world, vlm, tmp_path / "heard", **knobs), retriever=world_retriever) as agent:
        told = await agent.locate(photo, explain=True, on_event=heard.append)
    async with GeoAgent(world_settings(world, vlm, tmp_path / "alone", **knobs), retriever=world_retriever) as agent:
        alone = await agent.locate(photo, explain=True)
    kinds = [event.kind for event in heard]
    assert kinds[0] == "candidates" and kinds[-1] == "done" and {"prior", "guesses"} <= set(kinds[: kinds.index("rerank")])
    assert kinds[kinds.index("rerank") + 1 : -1] == ["match"] * len(told.trace.matches) and told.trace.matches
    assert [e.match for e in heard if e.kind == "match"] == told.trace.matches
    assert isinstance(heard[-1], Done) and heard[-1].result is told
    same = {"stats", "trace"}
    assert told.model_dump(exclude=same) == alone.model_dump(exclude=same)
    assert sorted(told.trace.matches, key=repr) == sorted(alone.trace.matches, key=repr)
    assert told.stats.vlm_calls == alone.stats.vlm_calls > 0


def test_the_wheel_ships_the_page_and_leaflet():
    """A wheel has no repository around it: the page's files and the vendored Leaflet are package data."""
    from fnmatch import fnmatch

    from geoagent.web.app import LEAFLET_DIR, STATIC_DIR
    from test_packaging import PYPROJECT

    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]
    for package, folder in (("geoagent.web", STATIC_DIR.parent), ("geoagent.maps", LEAFLET_DIR.parent.parent)):
        files = [p for p in folder.rglob("*") if p.is_file() and "static" in p.parts]
        assert files and all(any(fnmatch(p.relative_to(folder).as_posix(), g) for g in package_data[package]) for p in files), package
    assert {p.name for p in LEAFLET_DIR.iterdir()} == {"leaflet.js", "leaflet.css", "LICENSE", "images"}
    assert {p.name for p in (LEAFLET_DIR / "images").iterdir()} == {"layers.png", "layers-2x.png"}  # the layer switcher's icon
    assert {p.name for p in STATIC_DIR.iterdir()} == {"index.html", "app.js", "style.css"}


def test_the_page_shows_the_exif_panel_and_position_when_the_answer_has_them(served, world, tmp_path):
    """An answer carrying EXIF (GPS south and west, capture time, camera) gets the EXIF panel, a marker at the GPS
    position and the distance to the visual answer. The server's real answer is replayed with an EXIF block added
    (the shape `locate --json` gives it), with the map the server would send for it, so the page is tested whatever
    the photo carries."""
    from geoagent.maps.data import locate_map_data
    from geoagent.types import LocateResult

    photo = world.queries[0].path
    answer = served.post("/api/locate", served.photo(photo)).json()
    answer["exif"] = {"gps": {"lat": -33.856784, "lon": -151.215297, "altitude_m": 12.5}, "taken_at": "2024-05-01T10:02:03+10:00",
                      "make": "Apple", "model": "iPhone 12"}
    drawn = locate_map_data([LocateResult.model_validate(answer)]).model_dump_json()
    stream = f"event: map\r\ndata: {drawn}\r\n\r\nevent: result\r\ndata: {json.dumps(answer)}\r\n\r\n"
    with offline_browser(allow=(served.url,)) as browser:
        page = browser.new_page()
        page.route("**/api/locate/stream*", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=stream))
        page.goto(served.url)
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        page.set_input_files("#photo", str(photo))
        page.wait_for_selector("path.geoagent-exif", timeout=30_000)
        rows = dict(row.split("\t") for row in page.locator("#exif-table tr").all_inner_texts())
        why = page.locator("#why li").all_inner_texts()
    assert rows["GPS latitude"] == "-33.856784" and rows["GPS longitude"] == "-151.215297" and rows["Camera model"] == "iPhone 12"
    assert rows["Taken at"] == "2024-05-01T10:02:03+10:00"
    assert any(line.startswith("The photo's EXIF GPS (-33.8568, -151.2153) is ") and line.endswith(" km from this answer") for line in why), why


def replayed_steps(served, world, stream: str) -> tuple[list[str], list[str]]:
    """The page's match steps (all, and those marked failed) once it has read ``stream`` (two steps or more) in
    place of the server's event stream."""
    with offline_browser(allow=(served.url,)) as browser:
        page = browser.new_page()
        page.route("**/api/locate/stream*", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=stream))
        page.goto(served.url)
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        page.set_input_files("#photo", str(world.queries[0].path))
        page.locator("#steps li.match").nth(1).wait_for(timeout=30_000)  # (a predicate would need eval: the CSP forbids it)
        return page.locator("#steps li.match").all_inner_texts(), page.locator("#steps li.match.failed").all_inner_texts()


def test_the_page_tells_a_failed_match_from_a_tie(served, world):
    """A match whose every ask failed was not decided: the page says so (and marks it), instead of calling it a
    tie; a match whose answers disagreed is still a tie. The stream is replayed with both kinds of match."""
    matches = [{"a": "rome", "b": "oslo", "winner": None, "votes": [None, None]},
               {"a": "lima", "b": "baku", "winner": None, "votes": ["lima", "baku"]}]
    stream = "".join(f"event: match\r\ndata: {json.dumps({'kind': 'match', 'match': m})}\r\n\r\n" for m in matches)
    steps, failed = replayed_steps(served, world, stream)
    assert steps == ["rome vs oslo: no answer (every question about it failed)", "lima vs baku: a tie"]
    assert failed == steps[:1]


def test_the_page_shows_each_set_and_who_went_on(served, world):
    """A set-wise knockout's "set" events are shown as steps: the set's candidates and who went on, marked when no
    answer stood (every ask failed, or the answers disagreed) and the evidence chose."""
    sets = [{"members": ["rome", "oslo", "lima"], "winner": "oslo", "went_on": "oslo", "votes": ["oslo"], "round": 1},
            {"members": ["baku", "kiev"], "winner": None, "went_on": "baku", "votes": [None, None], "round": 1}]
    stream = "".join(f"event: set\r\ndata: {json.dumps({'kind': 'set', 'set': s})}\r\n\r\n" for s in sets)
    steps, failed = replayed_steps(served, world, stream)
    assert steps == ["rome, oslo, lima: oslo goes on", "baku, kiev: baku goes on by evidence (no answer: every question about it failed)"]
    assert failed == steps[1:]


def test_without_the_web_extra_serve_names_what_to_install(tmp_path):
    """No starlette: one line naming `pip install 'geoagent-vlm[web]'`, exit 2, no traceback."""
    proc = run_cli_without("starlette", "serve", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: geoagent serve needs starlette, which is not installed: pip install 'geoagent-vlm[web]'"


def test_serve_preflights_like_locate(world, tmp_path):
    """A server that cannot work stops: it listens (and says where) at once, then the preflight's problems are told
    as `locate` tells them, and the exit code is theirs."""
    from geoagent.config import Settings
    from geoagent.web.app import WebOptions
    from geoagent.web.server import serve

    settings = Settings(backends={"local": {"base_url": "http://127.0.0.1:9"}}, retrieval=world_retrieval_config(world),
                        cache={"dir": tmp_path / "cache"})
    said: list[str] = []
    errors: list[str] = []
    code = asyncio.run(serve(settings, WebOptions(max_upload_bytes=1000), 0, say=said.append, warn=said.append, error=errors.append))
    assert code == 2 and len(said) == 1 and said[0].startswith("GeoAgent page at http://127.0.0.1:"), said
    assert len(errors) == 1 and "cannot connect to http://127.0.0.1:9; is `ollama serve` running there?" in errors[0], errors


def test_ctrl_c_stops_the_server_cleanly(served):
    """Ctrl-C (SIGINT) stops the server: it says so, exits 0 and leaves no upload behind. (Last: it ends the module's server.)"""
    served.process.send_signal(signal.SIGINT)
    assert served.process.wait(timeout=30) == 0, served.stderr.read_text()
    stderr = served.stderr.read_text()
    assert "Traceback" not in stderr, stderr
    assert (served.root / "stdout.txt").read_text().rstrip().endswith("stopped")
    assert served.leftovers() == []
