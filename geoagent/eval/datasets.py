"""Labelled photo sets: our CSV, folders with EXIF GPS, IM2GPS3K / YFCC4K / MP-16 metadata, and the VIGOR layout.

:func:`iter_dataset` reads a set lazily, a row at a time (an MP-16 CSV of millions of rows stays on disk; no
photo is opened here); :func:`load_dataset` collects it, up to a limit. A row that cannot be used is
reported, not fatal; a missing file or a header without the needed columns is an InputError at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from geoagent.errors import InputError
from geoagent.paths import display_path, os_error_reason, resolve
from geoagent.retrieval.index import CsvRow, read_csv_rows, read_folder


@dataclass(frozen=True, slots=True)
class EvalItem:
    path: Path
    lat: float
    lon: float
    country: str | None = None
    ref: str | None = None  # the id of the true reference (index entry), when the dataset names one


class Skipped(NamedTuple):
    """A row or file that cannot be used, and why."""

    name: str
    reason: str


@dataclass
class Dataset:
    name: str
    items: list[EvalItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)


_REF_COLUMNS = ("ref_id", "spot")
METADATA_COLUMNS = {"IMG_ID", "LAT", "LON"}  # IM2GPS3K, YFCC4K and MP-16 metadata (images in their own folder)


def _coordinate(row: dict[str, str], lat_key: str, lon_key: str) -> tuple[float, float] | None:
    try:
        lat, lon = float(row[lat_key]), float(row[lon_key])
    except (KeyError, TypeError, ValueError):
        return None
    return (lat, lon) if -90 <= lat <= 90 and -180 <= lon <= 180 else None


def iter_csv(path: Path, images: Path | None = None) -> Iterator[EvalItem | Skipped]:
    """``path,lat,lon[,country][,ref_id|spot]`` (paths relative to the CSV), or IM2GPS3K/YFCC4K/MP-16's
    ``IMG_ID,...,LAT,LON`` with the image folder given as ``images``; the header is checked now, rows are
    read as the iterator is consumed."""
    columns, rows = read_csv_rows(path)
    metadata = METADATA_COLUMNS <= columns
    problem = None
    if metadata and images is None:
        problem = f"{display_path(path)}: an IMG_ID,LAT,LON metadata file needs the image folder: --images DIR"
    elif not metadata and not {"path", "lat", "lon"} <= columns:
        problem = f"{display_path(path)}: expected columns path,lat,lon[,country][,ref_id] or IMG_ID,LAT,LON"
    if problem:
        rows.close()
        raise InputError(problem)
    ref_column = None if metadata else next((c for c in _REF_COLUMNS if c in columns), None)
    return _csv_items(path, rows, images if metadata else None, ref_column)


def _csv_items(path: Path, rows: Iterator[CsvRow], images: Path | None, ref_column: str | None) -> Iterator[EvalItem | Skipped]:
    name_column, lat_column, lon_column = ("IMG_ID", "LAT", "LON") if images is not None else ("path", "lat", "lon")
    for row in rows:
        name = row.name(path, name_column)
        coordinate = None if row.problem else _coordinate(row.cells, lat_column, lon_column)
        if coordinate is None:
            yield Skipped(name, row.problem or f"invalid {lat_column}/{lon_column}")
            continue
        if images is not None:
            yield EvalItem(images / row.cells["IMG_ID"], *coordinate)
            continue
        value = (row.cells.get("path") or "").strip()
        if not value:  # an empty path would name the CSV's own folder
            yield Skipped(name, "no path in this row")
            continue
        photo, problem = resolve(path.parent / value)
        if photo is None:
            yield Skipped(name, problem or "unusable path")
            continue
        country = (row.cells.get("country") or "").strip().upper() or None
        ref = (row.cells.get(ref_column) or "").strip() or None if ref_column else None
        yield EvalItem(photo, *coordinate, country, ref)


def load_csv(path: Path, images: Path | None = None) -> Dataset:
    """A CSV dataset (see :func:`iter_csv`), collected."""
    return _collect(path.stem, iter_csv(path, images))


_VIGOR_PANO = re.compile(r"^(?P<id>[^,]+),(?P<lat>-?\d+\.\d+),(?P<lon>-?\d+\.\d+),")


def iter_vigor(root: Path, split: str = "same_area_balanced_test") -> Iterator[EvalItem | Skipped]:
    """VIGOR: ``<City>/panorama/<id>,<lat>,<lon>,.jpg`` queries whose true tile is the first one named on their
    line of ``splits/<City>/<split>.txt``. Build the reference index from the same folder
    (``geoagent index build VIGOR --out DIR`` indexes its satellite tiles); a query's ``ref`` is its positive
    tile's path relative to ``root``, which is that tile's index id."""
    split_files = sorted((root / "splits").glob(f"*/{split}.txt"))
    if not split_files:
        raise InputError(f"{root}: no splits/<City>/{split}.txt found (is this a VIGOR folder?)")
    return _vigor_items(root, split_files)


def _vigor_items(root: Path, split_files: list[Path]) -> Iterator[EvalItem | Skipped]:
    for split_file in split_files:
        city = split_file.parent.name
        try:
            with split_file.open(encoding="utf-8") as fh:
                for line in fh:
                    parts = line.split()
                    if len(parts) < 2:
                        continue
                    match = _VIGOR_PANO.match(parts[0])
                    if match is None:
                        yield Skipped(parts[0], "panorama name without coordinates")
                        continue
                    pano = root / city / "panorama" / parts[0]
                    yield EvalItem(pano, float(match["lat"]), float(match["lon"]), "US", f"{city}/satellite/{parts[1]}")
        except (OSError, UnicodeDecodeError) as exc:
            reason = os_error_reason(exc) if isinstance(exc, OSError) else "not valid UTF-8"
            raise InputError(f"{display_path(split_file)}: cannot read ({reason})") from None


def load_vigor(root: Path, split: str = "same_area_balanced_test") -> Dataset:
    return _collect(f"vigor-{split}", iter_vigor(root, split))


def _iter_folder(root: Path) -> Iterator[EvalItem | Skipped]:
    for item in read_folder(root):
        if item.lat is None or item.lon is None:
            yield Skipped(item.id, item.problem or "no GPS in EXIF")
        else:
            yield EvalItem(item.path, item.lat, item.lon)


def dataset_name(source: Path) -> str:
    return "vigor-same_area_balanced_test" if source.is_dir() and (source / "splits").is_dir() else (source.name if source.is_dir() else source.stem)


def iter_dataset(source: Path, images: Path | None = None) -> Iterator[EvalItem | Skipped]:
    """The photos of a dataset, read lazily (pick the loader from what ``source`` is); what is wrong with the
    source as a whole is an InputError now, what is wrong with a row comes as :class:`Skipped`."""
    if source.is_dir() and (source / "splits").is_dir():
        return iter_vigor(source)
    if source.is_dir():
        return _iter_folder(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return iter_csv(source, images)
    if not source.exists():
        raise InputError(f"{display_path(source)}: no such dataset (a CSV, a folder of photos, or a VIGOR folder)")
    raise InputError(f"{display_path(source)}: expected a CSV, a folder of photos with EXIF GPS, or a VIGOR folder")


def load_dataset(source: Path, images: Path | None = None, limit: int | None = None) -> Dataset:
    """A dataset collected; with ``limit``, reading stops after that many usable photos (the rest of a
    large CSV is never read)."""
    return _collect(dataset_name(source), iter_dataset(source, images), limit)


def missing_photos(dataset: Dataset) -> list[EvalItem]:
    """The dataset's photos whose file is not there (each is evaluated as a failed photo, and named on stderr)."""
    return [item for item in dataset.items if not item.path.is_file()]


def _collect(name: str, rows: Iterator[EvalItem | Skipped], limit: int | None = None) -> Dataset:
    dataset = Dataset(name, [])
    try:
        for row in rows:
            if isinstance(row, Skipped):
                dataset.skipped.append((row.name, row.reason))
                continue
            dataset.items.append(row)
            if limit is not None and len(dataset.items) >= limit:
                break
    finally:
        getattr(rows, "close", lambda: None)()  # a CSV left unread is closed now
    return dataset
