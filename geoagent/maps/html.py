"""The map page: vendored Leaflet and the drawing script inlined, the data as script-safe JSON, written atomically.

Nothing on the page is fetched but map tiles (blank offline); a Content-Security-Policy says so to the browser.
Text from results (place names, paths, clues) reaches the page only inside the JSON and is put into the DOM as
text by the script, never as HTML.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from string import Template
from typing import IO

from geoagent.errors import InputError
from geoagent.eval.metrics import Prediction
from geoagent.maps import data as map_data
from geoagent.maps.data import MapData, eval_map_data, map_photo
from geoagent.paths import display_path
from geoagent.types import LocateResult

STATIC = "static"
LEAFLET_FILES = ("leaflet/leaflet.js", "leaflet/leaflet.css")
SCRIPT_FILE = "geoagent-map.js"
STYLE_FILE = "geoagent-map.css"
LEAFLET_IMAGES = ("layers.png", "layers-2x.png")  # the layer switcher's icon; markers are vector, no icons needed
_SOURCE_MAP = re.compile(r"^//# sourceMappingURL=.*$", re.MULTILINE)  # inlined, it would point at a file not there
#: Characters that must not appear raw inside a <script> element's JSON (``</script>``, ``<!--``) or that JavaScript
#: older than ES2019 reads as line ends; each is written as its \\u escape, which JSON reads back unchanged.
_SCRIPT_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
#: Only the inlined code and styles run; images are data: URIs or tiles over https; nothing else is fetched.
CONTENT_SECURITY_POLICY = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: https:"

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="$csp">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
$leaflet_css
</style>
<style>
$style
</style>
</head>
<body>
<div id="geoagent-map"></div>
<script type="application/json" id="geoagent-data">$data</script>
<script>
$leaflet_js
</script>
<script>
$script
</script>
<script>
window.geoagentMap = GeoAgentMap.draw(document.getElementById("geoagent-map"),
    JSON.parse(document.getElementById("geoagent-data").textContent));
</script>
</body>
</html>
""")


@lru_cache(maxsize=None)
def static_text(name: str) -> str:
    """A file of ``geoagent/maps/static`` (the vendored Leaflet, the drawing script and its styles)."""
    text = resources.files("geoagent.maps").joinpath(STATIC, name).read_text(encoding="utf-8")
    if "</script" in text.lower() or "</style" in text.lower():
        raise RuntimeError(f"{name} cannot be inlined: it closes its own element")
    return text


def script_json(value: str) -> str:
    """JSON text made safe to sit inside a <script> element (it parses back to the same value)."""
    return re.sub("[<>&\u2028\u2029]", lambda m: _SCRIPT_UNSAFE[m.group()], value)


def _with_inlined_images(css: str) -> str:
    """Leaflet's CSS with the images it needs as data: URIs (a file opened from disk has no images/ beside it)."""
    folder = resources.files("geoagent.maps").joinpath(STATIC, "leaflet", "images")
    for name in LEAFLET_IMAGES:
        encoded = base64.b64encode(folder.joinpath(name).read_bytes()).decode("ascii")
        css = css.replace(f"url(images/{name})", f"url(data:image/png;base64,{encoded})")
    return css


_DATA_SLOT = "\0geoagent-data\0"  # where the page's data goes (no template text holds a NUL)
_PHOTOS = '"photos":[]'  # the photos array in MapData's JSON (a string value's quotes are escaped: only the key matches)


def _write_page(fh: IO[str], title: str, write_data: Callable[[IO[str]], None]) -> None:
    """The self-contained page, its data JSON written into the page by ``write_data(fh)``."""
    before, after = PAGE.substitute(
        csp=CONTENT_SECURITY_POLICY,
        title=html.escape(title),
        leaflet_css=_with_inlined_images(static_text(LEAFLET_FILES[1])),
        style=static_text(STYLE_FILE),
        data=_DATA_SLOT,
        leaflet_js=_SOURCE_MAP.sub("", static_text(LEAFLET_FILES[0])),
        script=static_text(SCRIPT_FILE),
    ).split(_DATA_SLOT)
    fh.write(before)
    write_data(fh)
    fh.write(after)


def render_map(data: MapData) -> str:
    """The self-contained page for ``data``."""
    page = io.StringIO()
    _write_page(page, data.title, lambda fh: fh.write(script_json(data.model_dump_json())))
    return page.getvalue()


def _write_locate_data(fh: IO[str], results: Iterable[LocateResult], title: str, thumbnails: bool) -> None:
    """The MapData JSON of ``results`` written photo by photo as they are read (the JSON ``locate_map_data``
    gives, never the whole of it in memory): the first DETAILED_PHOTOS in full, the rest as predictions."""
    cache: dict[str, str | None] | None = {} if thumbnails else None
    count = detailed = 0
    head, _ = MapData(title=title).model_dump_json().split(_PHOTOS, 1)
    fh.write(script_json(head) + '"photos":[')
    for result in results:
        photo = map_photo(result, detailed=count < map_data.DETAILED_PHOTOS, thumbnails=cache)
        fh.write(("," if count else "") + script_json(photo.model_dump_json()))
        count, detailed = count + 1, detailed + photo.detailed
    _, tail = MapData(title=title, details_shown=count <= map_data.DETAILS_SHOWN_UP_TO, detailed_photos=detailed).model_dump_json().split(_PHOTOS, 1)
    fh.write("]" + script_json(tail))


def write_locate_page(fh: IO[str], results: Iterable[LocateResult], *, title: str = "GeoAgent", thumbnails: bool = True) -> None:
    """The page for one or more answers, written to ``fh`` as ``results`` are read (a batch journal of any length
    is drawn in bounded memory). ``thumbnails``: inline the reference photos of index candidates."""
    _write_page(fh, title, lambda out: _write_locate_data(out, results, title, thumbnails))


def locate_map(results: Iterable[LocateResult], *, title: str = "GeoAgent", thumbnails: bool = True) -> str:
    """The page for one or more answers, as text (see :func:`write_locate_page`)."""
    page = io.StringIO()
    write_locate_page(page, results, title=title, thumbnails=thumbnails)
    return page.getvalue()


def eval_map(predictions: Mapping[str, Sequence[Prediction]], *, title: str = "GeoAgent eval") -> str:
    """The page of an evaluation's errors, one layer per column."""
    return render_map(eval_map_data(predictions, title=title))


def check_map_path(path: Path) -> None:
    """Fail before any work when ``--map`` cannot be written: its folder is missing, or it names a folder."""
    shown = display_path(path)
    if path.is_dir():
        raise InputError(f"--map {shown}: a folder; --map names the HTML file to write")
    if not path.parent.is_dir():
        raise InputError(f"--map {shown}: folder {display_path(path.parent)} does not exist")


def write_map(path: Path, page: str | Callable[[IO[str]], None]) -> Path:
    """Write the page all or nothing (a crash leaves the old file or the new one, never half): ``page`` as text,
    or written by ``page(file)`` (:func:`write_locate_page` streams a batch's map)."""
    from geoagent.batch.journal import write_atomic

    return write_atomic(path, page if callable(page) else lambda fh: fh.write(page))


def journal_results(journal: Path) -> Iterator[LocateResult]:
    """The located photos of a batch journal, in journal order, read a line at a time (failed photos have
    nothing to draw).

    The journal does not keep reference photo paths, so a batch map has no thumbnails; its reasoning guesses
    are there when the batch ran with ``--explain`` (the journal then keeps each trace)."""
    from geoagent.batch.journal import Journal

    with Journal.open(journal) as opened:
        for entry in opened.entries():
            if "error" not in entry:
                yield LocateResult.model_validate(entry)
