"""--map: one self-contained HTML file, opened in a real headless Chromium with the network cut off.

The must-show: the map `locate --map` writes shows one marker per candidate plus the prediction with no network,
its popups open, and a screenshot lands in the artifacts folder. Also: batch and eval maps, escaping of hostile
text, colours, the EXIF marker, and a bad --map path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from browser import artifacts_dir, offline_browser, wait_for, wait_until
from conftest import run_cli, write_world_config
from geoagent.eval.metrics import THRESHOLDS_KM, Prediction
from geoagent.exif import ExifGPS, ExifInfo
from geoagent.maps import data as map_data
from geoagent.maps.html import eval_map, locate_map, write_map
from geoagent.types import Candidate, CountryScore, Guess, LocateResult, Trace
from standin import WorldJudge

DATA_SCRIPT = re.compile(r'<script type="application/json" id="geoagent-data">(.*?)</script>', re.DOTALL)
TILE_HOST = "https://tile.openstreetmap.org/"
HOSTILE = "</script><script>alert(1)</script> ${alert(2)} <img src=x onerror=alert(3)> \u2028 & \"'"


def page_data(html: str) -> dict[str, Any]:
    """The JSON the page draws, read back from the file as the page's own script does."""
    found = DATA_SCRIPT.search(html)
    assert found, "no data script in the page"
    return json.loads(found.group(1))


def count(page: Any, selector: str) -> int:
    return page.evaluate("s => document.querySelectorAll(s).length", selector)


def open_popup(page: Any, marker: Any) -> str:
    """Click ``marker`` (a locator); the opened popup's text, once it has faded in."""
    marker.dispatch_event("click")  # not a click at its position: another marker may lie on top
    wait_until(page, "(() => { const p = document.querySelector('.leaflet-popup'); return p && getComputedStyle(p).opacity === '1'; })()")
    return page.locator(".leaflet-popup-content").inner_text()


def result(image: str = "q.jpg", place: str = "Arezzo", n: int = 4, **extra: Any) -> LocateResult:
    candidates = [
        Candidate(id=f"c{i}", lat=43.0 + i / 10, lon=11.0 + i / 10, country="IT", place=f"{place} {i}", source="index",
                  score=1.0 - i / 10, rank=i + 1, retrieval_score=0.5)
        for i in range(n)
    ]  # fmt: skip
    return LocateResult(image=image, lat=43.0, lon=11.0, country="IT", place=place, confidence=0.7, candidates=candidates, **extra)


@pytest.fixture(scope="module")
def browser():
    with offline_browser() as opened:
        yield opened


@pytest.fixture(scope="module")
def world_config(world, tmp_path_factory):
    """A stand-in VLM answering as the world's truth: a config with the prior and reasoning on, so the map has every
    layer, and a quick one (retrieval only) for the batch and eval maps."""
    from standin import StandinServer

    folder = tmp_path_factory.mktemp("map")
    with StandinServer(WorldJudge(world.truth)) as server:
        full = write_world_config(folder / "full.toml", world, server, folder / "cache", strategy="tournament",
                                  country_prior=True, reasoning=True)  # fmt: skip
        quick = write_world_config(folder / "quick.toml", world, server, folder / "cache", strategy="none",
                                   country_prior=False, reasoning=False)  # fmt: skip
        yield folder, full, quick


def test_locate_map_shows_every_candidate_and_the_answer_in_chromium_offline(world, world_config, browser):
    """The must-show: `locate --map` writes a page that, with every non-file request aborted, draws one marker per
    candidate plus the prediction (and the guesses and prior countries), opens a popup with the reference
    thumbnail, and is screenshotted into the artifacts folder. --map alone keeps the trace out of --json."""
    folder, config, _ = world_config
    target = folder / "locate.html"
    proc = run_cli("locate", str(world.queries[0].path), "--map", str(target), "--json", "--top-k", "6", "--config", str(config), cwd=folder)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert "trace" not in answer, "--map collects the trace for the guesses but --json prints it only with --explain"
    drawn = page_data(target.read_text())["photos"][0]
    assert len(drawn["candidates"]) == len(answer["candidates"]) >= 2
    assert drawn["guesses"] and drawn["prior"] and all(c["lat"] is not None for c in drawn["prior"])

    browser.blocked.clear()
    page = browser.new_page()
    page.goto(target.as_uri())
    wait_until(page, "window.geoagentMap !== undefined")
    assert count(page, "path.geoagent-candidate") == len(answer["candidates"])
    assert count(page, "path.geoagent-prediction") == 1
    assert count(page, "path.geoagent-guess") == len(drawn["guesses"])
    assert count(page, "path.geoagent-prior") == len(drawn["prior"])
    best = answer["candidates"][0]
    text = open_popup(page, page.locator("path.geoagent-candidate").last)  # drawn last: the best candidate
    assert f"#1 {best['place']}" in text and f"score {best['score']:.3f}" in text, text
    assert page.locator(".leaflet-popup-content img").get_attribute("src").startswith("data:image/jpeg;base64,")
    assert page.evaluate("document.querySelector('.leaflet-popup-content img').naturalWidth") > 0
    # The layer switcher, folded, is Leaflet's icon: inlined, or the folded switcher is an empty box.
    icon = page.evaluate("getComputedStyle(document.querySelector('.leaflet-control-layers-toggle')).backgroundImage")
    assert icon.startswith('url("data:image/png;base64,'), icon[:80]
    screenshot = artifacts_dir() / "map-locate.png"
    page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000
    assert not [e for e in page.geoagent_errors if e.startswith("uncaught")], page.geoagent_errors
    # The network was cut (the tiles were asked for and refused) and nothing but tiles wanted it.
    assert browser.blocked and all(url.startswith(TILE_HOST) for url in browser.blocked), browser.blocked
    page.close()


def test_hostile_text_is_shown_as_text_and_never_runs(tmp_path, browser):
    """Place names, paths and clues come from files and models: in the page they are data, shown literally;
    no script of theirs runs, the page's own script tags are the only ones, and the JSON parses back unchanged."""
    trace = Trace(strategy="none", guesses=[Guess(lat=44, lon=12, country="IT", confidence=0.5, clues=[HOSTILE], sample=0)])
    hostile = result(image=HOSTILE, place=HOSTILE, trace=trace, prior=[CountryScore(country="IT", p=0.9)])
    html = locate_map([hostile], title=HOSTILE)
    assert html.count("<script") == 4 and html.count("</script>") == 4
    assert page_data(html)["photos"][0]["place"] == HOSTILE
    target = write_map(tmp_path / "hostile.html", html)
    dialogs: list[str] = []
    page = browser.new_page()
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(target.as_uri())
    assert page.title() == HOSTILE
    assert HOSTILE.split(" \u2028")[0] in open_popup(page, page.locator("path.geoagent-guess"))
    assert count(page, "img[src=x]") == 0 and not dialogs
    # Several photos and eval columns are named in the layer switcher, which Leaflet fills with HTML.
    write_map(target, locate_map([hostile, result()], title=HOSTILE))
    page.goto(target.as_uri())
    assert HOSTILE.split(" \u2028")[0] in page.locator(".leaflet-control-layers-overlays").inner_text()
    write_map(target, eval_map({HOSTILE: [Prediction(path=HOSTILE, true_lat=0, true_lon=0, pred_lat=1, pred_lon=1, error_km=157.2)]}))
    page.goto(target.as_uri())
    assert HOSTILE.split(" \u2028")[0] in page.locator(".leaflet-control-layers-overlays").inner_text()
    assert HOSTILE.split(" \u2028")[0] in open_popup(page, page.locator("path.geoagent-error"))
    assert count(page, "img[src=x]") == 0 and not dialogs
    assert not [e for e in page.geoagent_errors if e.startswith("uncaught")], page.geoagent_errors
    page.close()


def test_the_panel_says_1_candidate_not_1_candidates(tmp_path, browser):
    """Counts agree with their nouns: an answer with one candidate and one reasoning guess (an EXIF answer has
    one candidate) reads "1 candidate - 1 reasoning guess" in the panel."""
    trace = Trace(strategy="none", guesses=[Guess(lat=44, lon=12, country="IT", confidence=0.5, clues=["a sign"], sample=0)])
    target = write_map(tmp_path / "one.html", locate_map([result(n=1, trace=trace)]))
    page = browser.new_page()
    page.goto(target.as_uri())
    wait_until(page, "window.geoagentMap !== undefined")
    panel = page.locator(".geoagent-panel").inner_text()
    assert "1 candidate - 1 reasoning guess" in panel and "1 candidates" not in panel, panel
    page.close()


def test_batch_map_draws_every_located_photo_of_the_journal(tmp_path, browser):
    """`batch --map` draws each located photo in the journal (earlier runs' too) with its candidates; a failed photo
    has nothing to draw. Here every photo is journalled already, so the batch only writes its outputs."""
    photos = [tmp_path / f"{i}.jpg" for i in range(3)]
    listing = tmp_path / "photos.txt"
    listing.write_text("".join(f"{p}\n" for p in photos))
    lines = [result(image=str(p), n=2 + i).model_dump_json() for i, p in enumerate(photos[:2])]
    lines.append(json.dumps({"image": str(photos[2]), "error": f"{photos[2]}: not an image"}))
    (tmp_path / "b.jsonl").write_text("".join(f"{line}\n" for line in lines))
    proc = run_cli("batch", str(listing), "--out", str(tmp_path / "b.jsonl"), "--map", str(tmp_path / "batch.html"), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr  # 1: the journal holds a failure
    page = browser.new_page()
    page.goto((tmp_path / "batch.html").as_uri())
    assert count(page, "path.geoagent-prediction") == 2
    assert count(page, "path.geoagent-candidate") == 2 + 3
    assert str(photos[1]) in open_popup(page, page.locator("path.geoagent-prediction").last)
    assert not [e for e in page.geoagent_errors if e.startswith("uncaught")], page.geoagent_errors
    page.close()


def test_eval_map_draws_truth_to_prediction_coloured_by_error(world, world_config, browser):
    """`eval --map`: per column, a line from each photo's truth to its prediction in the colour of its error band."""
    folder, _, config = world_config
    proc = run_cli("eval", str(world.queries_csv), "--limit", "2", "--map", str(folder / "eval.html"), "--config", str(config), cwd=folder)
    assert proc.returncode == 0, proc.stderr
    layers = page_data((folder / "eval.html").read_text())["error_layers"]
    assert [layer["label"] for layer in layers] == ["quick"]
    page = browser.new_page()
    page.goto((folder / "eval.html").as_uri())
    assert count(page, "path.geoagent-error") == count(page, "path.geoagent-truth") == len(layers[0]["errors"]) == 2
    strokes = page.evaluate("[...document.querySelectorAll('path.geoagent-error')].map(p => p.getAttribute('stroke'))")
    assert strokes == [map_data.ERROR_COLOURS[map_data.error_band(e["error_km"])] for e in layers[0]["errors"]]
    assert "error" in open_popup(page, page.locator("path.geoagent-error").first)
    assert not [e for e in page.geoagent_errors if e.startswith("uncaught")], page.geoagent_errors
    page.close()


def test_candidates_are_coloured_from_lowest_to_highest_score():
    """The best candidate takes the ramp's last colour, the worst its first; equal scores all take the last."""
    drawn = map_data.map_photo(result(n=5))
    assert drawn.candidates[0].color == map_data.SCORE_RAMP[-1] and drawn.candidates[-1].color == map_data.SCORE_RAMP[0]
    assert map_data.ramp_color(0.5) == map_data.SCORE_RAMP[2]
    flat = result(n=3).model_copy(update={"candidates": [c.model_copy(update={"score": 0.3}) for c in result(n=3).candidates]})
    assert {c.color for c in map_data.map_photo(flat).candidates} == {map_data.SCORE_RAMP[-1]}


def test_error_bands_follow_acc_at_d_strictly_below():
    """An error of exactly 1 km is not within 1 km (as acc@1km counts it); beyond the last threshold is the last band."""
    assert map_data.error_band(0.99) == 0 and map_data.error_band(1.0) == 1
    assert map_data.error_band(THRESHOLDS_KM[-1] + 1) == len(THRESHOLDS_KM) == len(map_data.ERROR_COLOURS) - 1
    rows = [Prediction(path="a", true_lat=0, true_lon=0, pred_lat=0, pred_lon=1, error_km=111.2),
            Prediction(path="b", true_lat=0, true_lon=0, error="failed")]  # fmt: skip
    layer = page_data(eval_map({"col": rows}))["error_layers"][0]
    assert len(layer["errors"]) == 1 and layer["failed"] == 1 and layer["errors"][0]["color"] == map_data.ERROR_COLOURS[2]


def test_the_exif_position_is_drawn_when_the_result_carries_one():
    """A result's EXIF GPS is drawn, with its distance from the answer; EXIF without GPS, or none, draws nothing."""
    base = result()
    drawn = map_data.map_photo(base.model_copy(update={"exif": ExifInfo(gps=ExifGPS(lat=43.0, lon=12.0))}))
    assert drawn.exif is not None and drawn.exif.distance_km == pytest.approx(81.3, abs=0.5)
    assert map_data.map_photo(base.model_copy(update={"exif": ExifInfo(make="Canon")})).exif is None
    assert map_data.map_photo(base).exif is None


def test_many_photos_keep_details_for_the_first_only(monkeypatch):
    """Past DETAILED_PHOTOS a photo is drawn as its prediction only, so a big batch still gives a page that opens."""
    monkeypatch.setattr(map_data, "DETAILED_PHOTOS", 2)
    drawn = map_data.locate_map_data([result(image=f"{i}.jpg") for i in range(3)], thumbnails=False)
    assert [len(p.candidates) for p in drawn.photos] == [4, 4, 0] and drawn.detailed_photos == 2


def test_prior_countries_stand_at_their_capital():
    assert map_data.map_country("FR", 0.5).at == "Paris" and map_data.map_country("JP", 0.5).at == "Tokyo"
    assert map_data.map_country("XX", 0.5).lat is None


def test_a_map_path_in_a_missing_folder_is_one_line_before_any_work(tmp_path):
    photo = tmp_path / "q.jpg"
    photo.write_bytes(b"not read")
    proc = run_cli("locate", str(photo), "--map", str(tmp_path / "nowhere" / "m.html"), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: --map {tmp_path / 'nowhere' / 'm.html'}: folder {tmp_path / 'nowhere'} does not exist"]


def test_the_wheel_ships_every_static_file_of_the_map():
    """A wheel has no repo around it: Leaflet, its licence and the drawing script must be covered by package-data."""
    from fnmatch import fnmatch

    from test_packaging import PYPROJECT

    static = Path(map_data.__file__).parent / "static"
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["geoagent.maps"]
    files = [str(p.relative_to(static.parent)) for p in static.rglob("*") if p.is_file()]
    assert len(files) == 7 and all(any(fnmatch(f, g) for g in globs) for f in files), (files, globs)


def test_without_chromium_the_browser_tests_fail_rather_than_skip(monkeypatch):
    """CI installs chromium; where it is missing, the browser tests must fail, naming the package to install."""
    import browser as launcher

    monkeypatch.setattr(launcher, "CHROMIUM", Path("/nonexistent/chromium"))
    with pytest.raises(AssertionError, match="apt-get install -y chromium"), launcher.offline_browser():
        pass


def test_the_page_needs_nothing_but_itself():
    """Leaflet and the drawing script are inlined, not fetched: no src= or href= to any file or server."""
    html = locate_map([result()], thumbnails=False)
    assert not re.search(r"<(script|link)[^>]*(src|href)=", html)
    assert "L.circleMarker" in html and 'version="1.9.4"' in html
    assert Path(map_data.__file__).parent.joinpath("static", "leaflet", "LICENSE").is_file()


REDRAW = """options => {
    window.geoagentMap.map.remove();  // as the serve page does before each answer
    const element = document.getElementById("geoagent-map");
    const data = JSON.parse(document.getElementById("geoagent-data").textContent);
    window.geoagentMap = GeoAgentMap.draw(element, data, options);
    return document.querySelectorAll("path.geoagent-candidate").length;
}"""


def test_draw_options_replace_the_basemap_and_drop_the_panel_for_the_serve_page(browser, tmp_path):
    """GeoAgentMap.draw's options (what `geoagent serve` passes): {tiles: null} asks for no tile at all, another
    tile URL is used instead of the data's, {panel: false} leaves the summary panel out; redrawn on the same element,
    the map has each candidate once. Without options the page keeps its panel and the data's tiles."""
    target = write_map(tmp_path / "options.html", locate_map([result()], thumbnails=False))
    page = browser.new_page()
    page.goto(target.as_uri())
    wait_until(page, "window.geoagentMap !== undefined")
    assert count(page, ".geoagent-panel") == 1 and any(u.startswith(TILE_HOST) for u in browser.blocked)
    asked = len(browser.blocked)
    assert page.evaluate(REDRAW, {"tiles": None, "panel": False}) == 4
    assert count(page, ".geoagent-panel") == 0 and count(page, "path.geoagent-prediction") == 1
    assert count(page, ".leaflet-tile") == 0 and browser.blocked[asked:] == []
    assert page.evaluate(REDRAW, {"tiles": "https://tiles.invalid/{z}/{x}/{y}.png"}) == 4
    wait_until(page, "document.querySelectorAll('.leaflet-tile').length > 0")
    wait_for(page, lambda: len(browser.blocked) > asked, "the new tiles' requests reach the route handler")
    assert all(u.startswith("https://tiles.invalid/") for u in browser.blocked[asked:])
    assert count(page, ".geoagent-panel") == 1
    assert not [e for e in page.geoagent_errors if e.startswith("uncaught")], page.geoagent_errors


def test_the_streamed_page_is_the_page_of_the_whole_data(monkeypatch):
    """A locate or batch map is written photo by photo; the page is byte for byte the one rendered from the whole
    MapData (details for the first DETAILED_PHOTOS only, details shown only up to DETAILS_SHOWN_UP_TO photos)."""
    from geoagent.maps.html import render_map

    monkeypatch.setattr(map_data, "DETAILED_PHOTOS", 3)
    for n in (0, 1, map_data.DETAILS_SHOWN_UP_TO + 2):
        results = [result(image=f"{i}.jpg", place=HOSTILE) for i in range(n)]
        assert locate_map(results, title=HOSTILE, thumbnails=False) == render_map(map_data.locate_map_data(results, title=HOSTILE, thumbnails=False))


def test_a_batch_map_of_10000_journal_lines_is_drawn_in_bounded_memory(tmp_path):
    """Issue 18 point 6: `batch --map` streams the journal into the page, a line at a time: drawing 10,000 lines
    takes no more peak Python memory than drawing 1,000 plus a few MB (the journal's key index); holding every
    result and the page as one string took tens of MB more."""
    import tracemalloc

    from geoagent.maps.html import journal_results, write_locate_page

    line = result(n=3).model_dump_json()
    peaks = {}
    for lines in (1000, 10_000):
        journal = tmp_path / f"{lines}.jsonl"
        with journal.open("w") as fh:
            for i in range(lines):
                fh.write(line.replace('"image":"q.jpg"', f'"image":"/photos/{i:06d}.jpg"', 1) + "\n")
        tracemalloc.start()
        try:
            write_map(tmp_path / f"{lines}.html", lambda out: write_locate_page(out, journal_results(journal), thumbnails=False))
            peaks[lines] = tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()
        assert len(page_data((tmp_path / f"{lines}.html").read_text())["photos"]) == lines
    assert peaks[10_000] - peaks[1000] < 4, peaks
