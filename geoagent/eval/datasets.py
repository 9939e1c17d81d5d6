"""Labelled photo sets: our CSV, folders with EXIF GPS, IM2GPS3K / YFCC4K metadata, and the VIGOR layout.

Each loader yields EvalItems; a row that cannot be used is reported, not fatal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from geoagent.errors import InputError
from geoagent.paths import display_path, os_error_reason, resolve
from geoagent.retrieval.index import read_csv_rows, read_folder


@dataclass(frozen=True)
class EvalItem:
    path: Path
    lat: float
    lon: float
    country: str | None = None
    ref: str | None = None  # the id of the true reference (index entry), when the dataset names one


@dataclass
class Dataset:
    name: str
    items: list[EvalItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)


_REF_COLUMNS = ("ref_id", "spot")


def _coordinate(row: dict[str, str], lat_key: str, lon_key: str) -> tuple[float, float] | None:
    try:
        lat, lon = float(row[lat_key]), float(row[lon_key])
    except (KeyError, TypeError, ValueError):
        return None
    return (lat, lon) if -90 <= lat <= 90 and -180 <= lon <= 180 else None


def load_csv(path: Path, images: Path | None = None) -> Dataset:
    """``path,lat,lon[,country][,ref_id|spot]`` (paths relative to the CSV), or IM2GPS3K/YFCC4K's
    ``IMG_ID,...,LAT,LON`` with the image folder given as ``images``."""
    columns, rows = read_csv_rows(path)
    dataset = Dataset(path.stem, [])
    metadata = {"IMG_ID", "LAT", "LON"} <= columns
    if metadata and images is None:
        raise InputError(f"{display_path(path)}: an IMG_ID,LAT,LON metadata file needs the image folder: --images DIR")
    if not metadata and not {"path", "lat", "lon"} <= columns:
        raise InputError(f"{display_path(path)}: expected columns path,lat,lon[,country][,ref_id] or IMG_ID,LAT,LON")
    name_column, lat_column, lon_column = ("IMG_ID", "LAT", "LON") if metadata else ("path", "lat", "lon")
    ref_column = None if metadata else next((c for c in _REF_COLUMNS if c in columns), None)
    for row in rows:
        name = row.name(path, name_column)
        coordinate = None if row.problem else _coordinate(row.cells, lat_column, lon_column)
        if coordinate is None:
            dataset.skipped.append((name, row.problem or f"invalid {lat_column}/{lon_column}"))
            continue
        if metadata:
            dataset.items.append(EvalItem(images / row.cells["IMG_ID"], *coordinate))  # type: ignore[operator]
            continue
        photo, problem = resolve(path.parent / (row.cells.get("path") or "").strip())
        if photo is None:
            dataset.skipped.append((name, problem or "unusable path"))
            continue
        country = (row.cells.get("country") or "").strip().upper() or None
        ref = (row.cells.get(ref_column) or "").strip() or None if ref_column else None
        dataset.items.append(EvalItem(photo, *coordinate, country, ref))
    return dataset


_VIGOR_PANO = re.compile(r"^(?P<id>[^,]+),(?P<lat>-?\d+\.\d+),(?P<lon>-?\d+\.\d+),")


def load_vigor(root: Path, split: str = "same_area_balanced_test") -> Dataset:
    """VIGOR: ``<City>/panorama/<id>,<lat>,<lon>,.jpg`` queries whose true tile is the first one named on their
    line of ``splits/<City>/<split>.txt``. Build the reference index from the same folder
    (``geoagent index build VIGOR --out DIR`` indexes its satellite tiles); a query's ``ref`` is its positive
    tile's path relative to ``root``, which is that tile's index id."""
    dataset = Dataset(f"vigor-{split}", [])
    split_files = sorted((root / "splits").glob(f"*/{split}.txt"))
    if not split_files:
        raise InputError(f"{root}: no splits/<City>/{split}.txt found (is this a VIGOR folder?)")
    for split_file in split_files:
        city = split_file.parent.name
        try:
            lines = split_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = os_error_reason(exc) if isinstance(exc, OSError) else "not valid UTF-8"
            raise InputError(f"{display_path(split_file)}: cannot read ({reason})") from None
        for line in lines:
            parts = line.split()
            if len(parts) < 2:
                continue
            match = _VIGOR_PANO.match(parts[0])
            if match is None:
                dataset.skipped.append((parts[0], "panorama name without coordinates"))
                continue
            dataset.items.append(
                EvalItem(root / city / "panorama" / parts[0], float(match["lat"]), float(match["lon"]), "US", f"{city}/satellite/{parts[1]}")
            )
    return dataset


def load_dataset(source: Path, images: Path | None = None) -> Dataset:
    """Pick the loader from what ``source`` is."""
    if source.is_dir() and (source / "splits").is_dir():
        return load_vigor(source)
    if source.is_dir():
        dataset = Dataset(source.name, [])
        for item in read_folder(source):
            if item.lat is None or item.lon is None:
                dataset.skipped.append((item.id, item.problem or "no GPS in EXIF"))
            else:
                dataset.items.append(EvalItem(item.path, item.lat, item.lon))
        return dataset
    if source.is_file() and source.suffix.lower() == ".csv":
        return load_csv(source, images)
    if not source.exists():
        raise InputError(f"{display_path(source)}: no such dataset (a CSV, a folder of photos, or a VIGOR folder)")
    raise InputError(f"{display_path(source)}: expected a CSV, a folder of photos with EXIF GPS, or a VIGOR folder")
