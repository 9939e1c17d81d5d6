"""The reference index: geotagged photos embedded with open_clip and stored with faiss, built in chunks.

On disk an index is a folder holding versions and a ``CURRENT`` pointer::

    DIR/CURRENT                   name of the live version, replaced atomically
    DIR/v-<time>/manifest.json    embedder, index type and its parameters, counts, countries
    DIR/v-<time>/entries.jsonl    one IndexEntry per row (its cluster is in rows.npy)
    DIR/v-<time>/rows.npy         per row: lat, lon, cluster, country (index into the sorted manifest
                                  countries), id hash, byte offset of its line in entries.jsonl
    DIR/v-<time>/vectors.npy      L2-normalised embeddings (row i = entry i), memory-mapped when searched
    DIR/v-<time>/index.faiss      the faiss index (none for flat: exact search scans vectors.npy)
    DIR/v-<time>/index.ivfdata    ivf/ivfpq: the inverted lists, memory-mapped
    DIR/v-<time>/trained.faiss    ivf/ivfpq: the trained empty index, reused by appends
    DIR/v-<time>/centroids.npy    geographic k-means centroids (lat, lon)

A build streams: sources are read lazily, embeddings are appended to ``vectors.npy`` a batch at a time and
the faiss index is filled from it a chunk at a time, so memory holds a chunk of vectors, not the gallery
(plus about 40 bytes a row of coordinates and hashes). It writes a new version beside the live one and only
then moves ``CURRENT``: a crash or Ctrl-C leaves the old one usable. ``--append`` adds photos to the live
version's rows and index (the trained quantizer and the geographic clusters are kept) as a new version.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import mmap
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, TypeVar, overload

import numpy as np
from filelock import FileLock
from PIL import Image
from pydantic import BaseModel, ValidationError

from geoagent.errors import ConfigError, InputError
from geoagent.exif import GPS_LAT, GPS_LON, gps_from_ifd, header_exif
from geoagent.files import write_atomic
from geoagent.geo import reverse_geocode
from geoagent.images import IMAGE_SUFFIXES, open_header, open_image
from geoagent.paths import display_path, file_problem, os_error_reason, resolve
from geoagent.retrieval.duplicates import EXACT_COPY_SIMILARITY, ImageEmbedder, NearDuplicateCalibration, calibrate
from geoagent.retrieval.embedder import Embedder, EmbedderSpec
from geoagent.retrieval.vectors import (
    EXACT_BELOW,
    INDEX_CHUNK_ROWS,
    IVFDATA_FILE,
    IndexParams,
    IndexType,
    NpyAppender,
    ParamOverrides,
    VectorTable,
    check_overrides,
    default_params,
    geo_kmeans,
    nearest_centroid,
    read_ann,
    write_ann,
)
from geoagent.types import Candidate

FORMAT_VERSION = 2
POINTER = "CURRENT"
LOCK = ".lock"  # held while CURRENT moves and old versions are removed, so concurrent builds stay consistent
STALE_STAGING_AGE_S = 6 * 3600  # a staging folder untouched this long belongs to a build that is gone
HEARTBEAT_S = 60  # a build touches its staging folder this often, so a long one is never taken for stale
PASS_THROUGH_ROWS = 4096  # reused rows written at once between embedding batches
GEOCODE_ROWS = 256  # rows reverse-geocoded per call: 0.13 ms a row here, against 0.5 ms a row 32 at a time
ROW_DTYPE = np.dtype([("lat", "<f8"), ("lon", "<f8"), ("cluster", "<i4"), ("country", "<i4"), ("key", "<u8"), ("offset", "<i8")])
_T = TypeVar("_T")


class IndexMismatchError(ConfigError):
    """The index was built by another embedder than the one configured."""


class IndexUnusableError(InputError):
    """The index given (``--index``, ``[retrieval] index``) cannot be used at all: missing, not an index, or
    damaged. A usage error (exit 2) that stops the run, never one photo's failure."""

    exit_code = 2
    per_item = False
    stops_run = True


REBUILD = "rebuild it with `geoagent index build SOURCE --out {directory}`"


class IndexEntry(BaseModel):
    id: str  # path relative to the source folder or CSV
    path: str  # absolute path of the photo at build time
    lat: float
    lon: float
    country: str
    place: str
    cluster: int = 0
    size: int
    mtime_ns: int


class IndexManifest(BaseModel):
    format: int = FORMAT_VERSION
    embedder: EmbedderSpec
    index_type: IndexType  # as requested; params.kind is what was built
    params: IndexParams
    dim: int
    count: int
    kmeans_k: int
    source: str
    built_at: float
    countries: dict[str, int]
    lists_path: str | None = None  # ivf/ivfpq: where index.faiss expects its list file (moved folders are found too)
    near_duplicates: NearDuplicateCalibration | None = None  # measured at build time; None: built before calibration


@dataclass
class SourceItem:
    """A photo to index, with its coordinate (from EXIF GPS or the CSV)."""

    id: str
    path: Path
    lat: float | None
    lon: float | None
    country: str | None = None
    problem: str | None = None  # why it cannot be indexed (no coordinate, unreadable, ...), when known


@dataclass
class BuildReport:
    indexed: int = 0  # rows in the new version
    embedded: int = 0  # newly embedded this run
    reused: int = 0  # embeddings carried over from the previous version (file unchanged)
    appended: int = 0  # rows added by --append
    already: int = 0  # --append: photos of the source the index holds already (left as they are)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    version: str = ""
    params: IndexParams | None = None
    hint: str | None = None  # advice for the next build (an append that outgrew its quantizer)
    near_duplicates: NearDuplicateCalibration | None = None


# --- reading sources -----------------------------------------------------------------------------------


def read_gps(path: Path) -> tuple[tuple[float, float] | None, str | None]:
    """(lat, lon) from a photo's EXIF GPS block (header only: no pixel decoded, the pixel limit checked), or
    None and what is wrong with the file (no problem given: a readable photo without GPS)."""
    try:
        with open_header(path) as image:
            gps = header_exif(image).get_ifd(0x8825)
    except InputError as exc:
        return None, str(exc).removeprefix(f"{display_path(path)}: ")
    except (OSError, ValueError, SyntaxError) as exc:  # a corrupt EXIF block past the header
        return None, f"unreadable image ({exc})"
    if not gps or GPS_LAT not in gps or GPS_LON not in gps:
        return None, None
    point = gps_from_ifd(gps)
    if point is None:
        return None, "unusable EXIF GPS (a hemisphere missing, a zero denominator, out of range, or no fix)"
    return (point.lat, point.lon), None


def walk_sorted(root: Path) -> Iterator[Path]:
    """Every path under ``root`` in the order of ``sorted(root.rglob("*"))``, one folder listed at a time
    (symlinked folders are not entered; unreadable folders are passed over, as rglob does)."""
    try:
        with os.scandir(root) as listing:
            names = sorted((entry.name, entry.is_dir(follow_symlinks=False)) for entry in listing)
    except PermissionError:
        return
    for name, is_dir in names:
        yield root / name
        if is_dir:
            yield from walk_sorted(root / name)


def read_folder(root: Path) -> Iterator[SourceItem]:
    """Photos under ``root`` by suffix, recursively, read lazily; anything by that name that is not a readable
    photo file (a folder, a symlink loop, a name that is not UTF-8, ...) comes with its problem, to be listed
    as skipped."""
    for path in walk_sorted(root):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        item_id = display_path(path.relative_to(root).as_posix())
        problem = file_problem(path)
        if problem is not None:
            yield SourceItem(item_id, path, None, None, problem=problem)
            continue
        gps, problem = read_gps(path)
        lat, lon = gps if gps else (None, None)
        yield SourceItem(item_id, path.resolve(), lat, lon, problem=problem)


NOT_UTF8_ROW = "not valid UTF-8 (save the CSV as UTF-8)"


@dataclass
class CsvRow:
    """One data row of a CSV: its line number, its cells, and why it cannot be used (when it cannot)."""

    line: int
    cells: dict[str, str]
    problem: str | None = None

    def name(self, csv_path: Path, column: str) -> str:
        """How a skipped row is named: its path cell when there is a printable one, else the file and line."""
        value = (self.cells.get(column) or "").strip()
        return display_path(value) if value and self.problem != NOT_UTF8_ROW else f"{csv_path.name} line {self.line}"


def read_csv_rows(csv_path: Path) -> tuple[set[str], Iterator[CsvRow]]:
    """The header of a UTF-8 CSV, read now, and its rows, read lazily (millions of rows stay on disk); a row
    holding bytes that are not UTF-8 comes with its problem.

    A file that is not CSV text at all (UTF-16, binary) is an InputError naming the file and line: from the
    header at once, from a later line while the rows are read.
    """
    try:
        fh = csv_path.open(newline="", encoding="utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        raise InputError(f"{display_path(csv_path)}: cannot read ({os_error_reason(exc)})") from None
    reader = csv.DictReader(fh)
    try:
        header = _csv_step(csv_path, 1, lambda: reader.fieldnames) or []
        if not all(is_utf8(name) for name in header):
            raise InputError(f"{display_path(csv_path)} line 1: {NOT_UTF8_ROW}")
    except BaseException:
        fh.close()
        raise

    def rows() -> Iterator[CsvRow]:
        with fh:
            while True:
                line = reader.line_num + 1
                cells = _csv_step(csv_path, line, lambda: next(reader, None))
                if cells is None:
                    return
                clean = all(is_utf8(value) for value in cells.values() if isinstance(value, str))
                yield CsvRow(reader.line_num, cells, None if clean else NOT_UTF8_ROW)

    return set(header), rows()


def _csv_step(csv_path: Path, line: int, step: Callable[[], _T]) -> _T:
    try:
        return step()
    except csv.Error as exc:
        raise InputError(f"{display_path(csv_path)} line {line}: not a readable CSV ({exc}); is it UTF-8 text?") from None
    except OSError as exc:
        raise InputError(f"{display_path(csv_path)}: cannot read ({os_error_reason(exc)})") from None


def is_utf8(text: str) -> bool:
    """False when ``text`` carries bytes that were not UTF-8 (decoded with surrogateescape)."""
    return not any("\udc80" <= char <= "\udcff" for char in text)


METADATA_COLUMNS = {"IMG_ID", "LAT", "LON"}  # IM2GPS3K, YFCC4K and MP-16 metadata: images in their own folder


def read_csv(csv_path: Path, images: Path | None = None) -> Iterator[SourceItem]:
    """Rows ``path,lat,lon[,country]`` (paths relative to the CSV's folder), or MP-16-style metadata
    ``IMG_ID,...,LAT,LON`` with the photos under ``images``; the header is checked at once, rows are read as
    they are consumed."""
    columns, rows = read_csv_rows(csv_path)
    shown = display_path(csv_path)
    problem = None
    if METADATA_COLUMNS <= columns and images is None:
        problem = f"{shown}: an IMG_ID,LAT,LON metadata file needs the image folder: --images DIR"
    elif not METADATA_COLUMNS <= columns and {"path", "lat", "lon"} - columns:
        missing = ", ".join(sorted({"path", "lat", "lon"} - columns))
        problem = f"{shown}: missing column(s) {missing} (need path,lat,lon[,country], or IMG_ID,LAT,LON with --images)"
    if problem:
        rows.close()
        raise InputError(problem)
    layout = ("IMG_ID", "LAT", "LON", images) if METADATA_COLUMNS <= columns else ("path", "lat", "lon", csv_path.parent)
    return _csv_items(csv_path, rows, *layout)  # type: ignore[arg-type]


def _csv_items(csv_path: Path, rows: Iterator[CsvRow], name: str, lat_column: str, lon_column: str, folder: Path) -> Iterator[SourceItem]:
    for row in rows:
        item_id = row.name(csv_path, name)
        if row.problem:
            yield SourceItem(item_id, folder, None, None, problem=row.problem)
            continue
        try:
            lat, lon = float(row.cells[lat_column]), float(row.cells[lon_column])
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise ValueError
        except (TypeError, ValueError):
            yield SourceItem(item_id, folder, None, None, problem="invalid lat/lon")
            continue
        path, problem = resolve(folder / (row.cells.get(name) or "").strip())
        country = (row.cells.get("country") or "").strip().upper() or None
        yield SourceItem(item_id, path or folder, lat, lon, country, problem)


_VIGOR_TILE = re.compile(r"^satellite_(?P<lat>-?\d+\.\d+)_(?P<lon>-?\d+\.\d+)\.png$")


def read_vigor_tiles(root: Path) -> Iterator[SourceItem]:
    """VIGOR's aerial tiles, ``<City>/satellite/satellite_<lat>_<lon>.png``, ids relative to ``root``."""
    for city in sorted(p for p in root.iterdir() if (p / "satellite").is_dir()):
        for tile in sorted((city / "satellite").glob("satellite_*.png")):
            match = _VIGOR_TILE.match(tile.name)
            if match:
                yield SourceItem(tile.relative_to(root).as_posix(), tile.resolve(), float(match["lat"]), float(match["lon"]), "US")


def read_source(source: Path, images: Path | None = None) -> Iterator[SourceItem]:
    """The photos of a folder, VIGOR folder or CSV (``images``: the photo folder of an IMG_ID,LAT,LON CSV),
    read lazily; a missing source or a bad CSV header is an InputError now, before anything is read or loaded."""
    if source.is_dir() and (source / "splits").is_dir():
        return read_vigor_tiles(source)
    if source.is_dir():
        return read_folder(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return read_csv(source, images)
    if not source.exists():
        raise InputError(f"{display_path(source)}: no such folder or CSV")
    raise InputError(f"{display_path(source)}: expected a folder of photos or a CSV with path,lat,lon[,country]")


# --- the index on disk ---------------------------------------------------------------------------------


def current_version(directory: Path) -> Path | None:
    """The live version's folder, or None when ``directory`` holds no index."""
    pointer = directory / POINTER
    if not pointer.is_file():
        return None
    try:
        version = directory / pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = os_error_reason(exc) if isinstance(exc, OSError) else "not text"
        raise IndexUnusableError(f"{display_path(pointer)}: cannot read the index pointer ({reason})") from None
    return version if version.is_dir() else None


def id_key(item_id: str) -> int:
    """A 64-bit hash of an entry id: rows are looked up by id through a sorted array of these."""
    return int.from_bytes(hashlib.blake2b(item_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class EntryTable(Sequence[IndexEntry]):
    """The entries of an index, parsed when asked for from ``entries.jsonl`` (memory-mapped) by byte offset,
    so opening an index of millions reads no entry (but the first and the last, to catch a truncated file)."""

    def __init__(self, path: Path, rows: np.ndarray, rebuild: str = REBUILD.format(directory="DIR")) -> None:
        self._rows, self._path, self._rebuild = rows, path, rebuild
        with open(path, "rb") as fh:
            self._data: mmap.mmap | bytes = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(fh.fileno()).st_size else b""
        if len(rows):
            self[0], self[len(rows) - 1]  # noqa: B018 - parsed only to fail now, at open, if the file was cut short

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, row: int) -> IndexEntry: ...
    @overload
    def __getitem__(self, row: slice) -> list[IndexEntry]: ...
    def __getitem__(self, row: int | slice) -> IndexEntry | list[IndexEntry]:
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        row = row + len(self) if row < 0 else row
        if not 0 <= row < len(self):
            raise IndexError(row)
        start = int(self._rows["offset"][row])
        end = int(self._rows["offset"][row + 1]) if row + 1 < len(self) else len(self._data)
        try:
            if not 0 <= start < end <= len(self._data):
                raise ValueError("past the end of the file")
            entry = IndexEntry.model_validate_json(self._data[start:end])
        except ValueError:  # pydantic's ValidationError too: a line cut short, edited, or missing
            raise IndexUnusableError(
                f"{display_path(self._path)}: damaged index: entry {row + 1} of {len(self)} cannot be read (the file is "
                f"truncated or was edited); {self._rebuild}"
            ) from None
        entry.cluster = int(self._rows["cluster"][row])
        return entry

    def close(self) -> None:
        if isinstance(self._data, mmap.mmap):
            self._data.close()


class ReferenceIndex:
    """A built index, opened for search: vectors, rows and entries stay on disk, memory-mapped."""

    def __init__(self, directory: Path, version: Path, manifest: IndexManifest, rows: np.ndarray, table: VectorTable) -> None:
        self.directory, self.version, self.manifest, self.rows, self.table = directory, version, manifest, rows, table
        self.entries = EntryTable(version / "entries.jsonl", rows, REBUILD.format(directory=display_path(directory)))

    @classmethod
    def open(cls, directory: str | Path) -> ReferenceIndex:
        """The live version of the index at ``directory``; IndexUnusableError (exit 2) naming the folder or the
        damaged file, and how to rebuild it."""
        directory = Path(directory).expanduser()
        shown = display_path(directory)
        if directory.exists() and not directory.is_dir():
            raise IndexUnusableError(f"{shown}: a file, not an index folder (build one with `geoagent index build SOURCE --out DIR`)")
        version = current_version(directory)
        if version is None:
            raise IndexUnusableError(f"{shown}: not a GeoAgent index (build one with `geoagent index build SOURCE --out {shown}`)")
        rebuild = REBUILD.format(directory=shown)
        part = "manifest.json"
        try:
            raw = json.loads((version / part).read_text())
            if isinstance(raw, dict) and raw.get("format") != FORMAT_VERSION:
                raise IndexUnusableError(f"{shown}: index format {raw.get('format')}, this GeoAgent reads {FORMAT_VERSION}; rebuild it")
            manifest = IndexManifest.model_validate(raw)
            part = "rows.npy"
            rows = np.load(version / part, mmap_mode="r")
            part = "vectors.npy"
            vectors = np.load(version / part, mmap_mode="r")
            part = "the faiss index"
            index = read_ann(version, manifest.params, manifest.lists_path)
            part = "centroids.npy"
            centroids = np.load(version / part)
            part = "its files"
            if not (len(rows) == len(vectors) == manifest.count and vectors.shape[1] == manifest.dim):
                raise ValueError(f"{manifest.count} entries, {len(rows)} rows, {len(vectors)} vectors")
            part = "entries.jsonl"
            reference = cls(directory, version, manifest, rows, VectorTable(
                vectors=vectors,
                index=index,
                lat=rows["lat"],
                lon=rows["lon"],
                country=np.array(sorted(manifest.countries) or [""], dtype=str)[rows["country"]],
                cluster=rows["cluster"],
                centroids=centroids,
                rerank=manifest.params.rerank or 0,
            ))  # fmt: skip
        except IndexUnusableError:
            raise
        except (OSError, ValueError, RuntimeError, IndexError) as exc:  # pydantic's ValidationError is a ValueError
            raise IndexUnusableError(f"{display_path(version)}: damaged index ({part}: {_damage(exc)}); {rebuild}") from None
        return reference

    def candidate(self, row: int, score: float) -> Candidate:
        entry = self.entries[row]
        return Candidate(
            id=entry.id, lat=entry.lat, lon=entry.lon, country=entry.country or None, place=entry.place,
            source="index", retrieval_score=float(score), image_path=entry.path,
        )

    def check_embedder(self, spec: EmbedderSpec) -> None:
        if spec != self.manifest.embedder:
            raise IndexMismatchError(
                f"{self.directory}: built with embedder {self.manifest.embedder.describe()}, but the configuration "
                f"uses {spec.describe()}; set [retrieval] clip_model/clip_pretrained/seed to match, or rebuild the index"
            )


def _damage(exc: Exception) -> str:
    """What is wrong with an index file, in our words (numpy's advice to allow pickles is no advice here)."""
    if isinstance(exc, OSError):
        return os_error_reason(exc)
    if isinstance(exc, ValidationError):
        return "fields missing or of the wrong type"
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return "not valid JSON"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "pickle" in text or "magic string" in text or "header" in text.lower():
        return "not a NumPy array file"
    return text


class IdLookup:
    """Rows of an index by entry id, through its sorted id hashes (16 bytes a row, no dict of millions)."""

    def __init__(self, index: ReferenceIndex) -> None:
        keys = np.asarray(index.rows["key"])
        self._order = np.argsort(keys, kind="stable")
        self._keys = keys[self._order]
        self._entries = index.entries

    def find(self, item_id: str) -> tuple[int, IndexEntry] | None:
        key = np.uint64(id_key(item_id))
        for pos in range(int(np.searchsorted(self._keys, key, "left")), int(np.searchsorted(self._keys, key, "right"))):
            row = int(self._order[pos])
            entry = self._entries[row]
            if entry.id == item_id:
                return row, entry
        return None


def _open_live(out: Path) -> ReferenceIndex | None:
    try:
        return ReferenceIndex.open(out)
    except InputError:
        return None


# --- writing a version, a chunk at a time ------------------------------------------------------------------


@dataclass
class RowDraft:
    """A row to write: its entry but the place, which is reverse-geocoded unless given (with its country)."""

    id: str
    path: str
    lat: float
    lon: float
    size: int
    mtime_ns: int
    country: str | None = None  # from the source (a CSV column); else the reverse-geocoded one
    place: str | None = None


class IndexWriter:
    """Writes a new version in a staging folder as rows arrive (vectors appended to ``vectors.npy``, entries
    to ``entries.jsonl``), then builds its faiss index from the file a chunk at a time and commits it.

    ``base``: the live version, to append to (its rows are copied, its quantizer and clusters kept).
    Used as a context manager: leaving it without :meth:`commit` removes the staging folder.
    """

    def __init__(
        self,
        out: Path,
        spec: EmbedderSpec,
        *,
        index_type: IndexType,
        source: str,
        kmeans_k: int = 100,
        overrides: ParamOverrides | None = None,
        base: ReferenceIndex | None = None,
        chunk_rows: int = INDEX_CHUNK_ROWS,
    ) -> None:
        self.out, self.spec, self.index_type, self.source = out.expanduser(), spec, index_type, source
        self.kmeans_k, self.overrides, self.base, self.chunk_rows = kmeans_k, overrides or {}, base, chunk_rows
        check_overrides(index_type, base.manifest.dim if base else None, self.overrides)  # before any photo is embedded
        self.name = f"v-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**6:06d}"
        self.out.mkdir(parents=True, exist_ok=True)
        self.staging = self.out / staging_name(self.name)
        self.staging.mkdir()
        self._touched = time.monotonic()
        self._vectors: NpyAppender | None = None
        self._columns: list[np.ndarray] = []  # ROW_DTYPE rows, one block per add (clusters filled at commit)
        self._countries: dict[str, int] = {}  # code -> index in first-seen order
        self._drafts: list[RowDraft] = []  # rows whose vectors are written, entries not yet
        self.count = 0
        self.added = 0
        try:
            self._entries = open(self.staging / "entries.jsonl", "wb")  # noqa: SIM115 - closed by commit/abort
            if base is not None:
                self._copy_base(base)
        except BaseException:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.staging.exists():
            self.abort()

    def abort(self) -> None:
        self._entries.close()
        if self._vectors is not None:
            self._vectors.close()
        shutil.rmtree(self.staging, ignore_errors=True)

    def _copy_base(self, base: ReferenceIndex) -> None:
        """The base version's rows, as they are: files copied by the kernel, columns kept."""
        self._entries.close()
        shutil.copyfile(base.version / "entries.jsonl", self.staging / "entries.jsonl")
        self._entries = open(self.staging / "entries.jsonl", "ab")  # noqa: SIM115
        shutil.copyfile(base.version / "vectors.npy", self.staging / "vectors.npy")
        self._vectors = NpyAppender(self.staging / "vectors.npy", base.manifest.dim, resume=True)
        codes = sorted(base.manifest.countries)
        self._countries = {code: i for i, code in enumerate(codes)}
        self._columns.append(np.array(base.rows))
        self.count = len(base.rows)

    def add(self, drafts: Sequence[RowDraft], vectors: np.ndarray) -> None:
        """Append rows (their vectors L2-normalised, row i for draft i). Vectors go to disk now; entries wait
        for GEOCODE_ROWS of them, as reverse geocoding costs per call far more than per row."""
        if not drafts:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(drafts), -1)
        if self._vectors is None:
            check_overrides(self.index_type, vectors.shape[1], self.overrides)
            self._vectors = NpyAppender(self.staging / "vectors.npy", vectors.shape[1])
        self._vectors.append(vectors)
        self._drafts.extend(drafts)
        self.count += len(drafts)
        self.added += len(drafts)
        if len(self._drafts) >= GEOCODE_ROWS:
            self._write_entries()
        if time.monotonic() - self._touched > HEARTBEAT_S:
            os.utime(self.staging)
            self._touched = time.monotonic()

    def _write_entries(self) -> None:
        """The waiting rows' entries (places reverse-geocoded where not given) and their ROW_DTYPE columns."""
        for start in range(0, len(self._drafts), GEOCODE_ROWS):
            drafts = self._drafts[start : start + GEOCODE_ROWS]
            missing = [draft for draft in drafts if draft.place is None]
            found = iter(reverse_geocode(np.array([d.lat for d in missing]), np.array([d.lon for d in missing])) if missing else [])
            block = np.zeros(len(drafts), dtype=ROW_DTYPE)
            offset, lines = self._entries.tell(), []
            for i, draft in enumerate(drafts):
                country, place = next(found) if draft.place is None else (draft.country or "", draft.place)
                entry = IndexEntry(
                    id=draft.id, path=draft.path, lat=draft.lat, lon=draft.lon, country=draft.country or country,
                    place=place, size=draft.size, mtime_ns=draft.mtime_ns,
                )  # fmt: skip
                line = entry.model_dump_json(exclude={"cluster"}).encode() + b"\n"
                code = self._countries.setdefault(entry.country, len(self._countries))
                block[i] = (draft.lat, draft.lon, 0, code, id_key(draft.id), offset)
                offset += len(line)
                lines.append(line)
            self._entries.write(b"".join(lines))
            self._columns.append(block)
        self._drafts = []

    def commit(self, embedder: ImageEmbedder | None = None) -> tuple[str, IndexManifest]:
        """Cluster the rows, build the faiss index, calibrate near-duplicates (with ``embedder``, which reads
        a sample of the photos again), write the manifest, then move ``CURRENT`` here."""
        if self._vectors is None or self.count == 0:
            raise ValueError("nothing to commit")
        self._write_entries()
        self._entries.close()
        self._vectors.close()
        rows = np.concatenate(self._columns)
        self._columns = []
        codes = sorted(self._countries)
        order = np.array([codes.index(code) for code in self._countries] or [0], dtype=np.int32)
        rows["country"] = order[rows["country"]]
        base = self.base
        if base is not None:
            centroids = np.asarray(base.table.centroids)
            rows["cluster"][len(base.rows) :] = nearest_centroid(rows["lat"][len(base.rows) :], rows["lon"][len(base.rows) :], centroids)
        else:
            rows["cluster"], centroids = geo_kmeans(rows["lat"], rows["lon"], self.kmeans_k)
        np.save(self.staging / "rows.npy", rows)
        np.save(self.staging / "centroids.npy", centroids)
        vectors = np.load(self.staging / "vectors.npy", mmap_mode="r")
        params = default_params(self.index_type, self.count, vectors.shape[1], self.overrides)
        grow = base is not None and base.manifest.params.kind == params.kind
        if grow:  # the trained quantizer stays; how it is searched may change
            searching = {key: value for key, value in self.overrides.items() if key in ("nprobe", "ef_search")}
            params = base.manifest.params.model_copy(update=searching)  # type: ignore[union-attr]
        write_ann(
            vectors, self.staging, params, final_folder=self.out / self.name, chunk_rows=self.chunk_rows,
            base_folder=base.version if grow else None, base_lists=base.manifest.lists_path if grow else None,  # type: ignore[union-attr]
            start=len(base.rows) if grow else 0,  # type: ignore[union-attr]
        )  # fmt: skip
        near_duplicates = None
        if embedder is not None:
            entries = EntryTable(self.staging / "entries.jsonl", rows)
            near_duplicates = calibrate(vectors, rows["lat"], rows["lon"], lambda row: entries[row].path, embedder)
            entries.close()
        del vectors
        counts = np.bincount(rows["country"], minlength=len(codes))
        manifest = IndexManifest(
            embedder=self.spec,
            index_type=self.index_type,
            params=params,
            dim=self._vectors.dim,
            count=self.count,
            kmeans_k=len(centroids),
            source=self.source,
            built_at=time.time(),
            countries={codes[i]: int(counts[i]) for i in sorted(range(len(codes)), key=lambda i: -counts[i])},
            lists_path=str(self.out.resolve() / self.name / IVFDATA_FILE) if params.kind in ("ivf", "ivfpq") else None,
            near_duplicates=near_duplicates,
        )
        (self.staging / "manifest.json").write_text(manifest.model_dump_json(indent=2))
        for path in self.staging.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        with FileLock(self.out / LOCK):
            if base is not None and current_version(self.out) != base.version:
                raise InputError(
                    f"{display_path(self.out)}: another build committed while this one was appending; run the append again"
                )
            self.staging.rename(self.out / self.name)
            write_atomic(self.out / POINTER, self.name.encode())
            _remove_replaced(self.out, self.name)
        return self.name, manifest


# --- building from photos ------------------------------------------------------------------------------------


# --- embedding the photos of a build ---------------------------------------------------------------------


class PhotoEmbedding(Protocol):
    """How a build embeds its new photos: locally (:class:`LocalEmbedding`) or on a Ray cluster
    (:class:`geoagent.retrieval.ray_build.RayEmbedding`); either gives the same rows, so the same index."""

    spec: EmbedderSpec  # the embedding space, written to the manifest

    def embed_listed(self, listing: Path, batch_size: int) -> Iterator[np.ndarray | str]:
        """For each photo path in ``listing`` (JSON Lines, one JSON string a line), in order: its L2-normalised
        embedding, or why it cannot be opened (:func:`unreadable_reason`)."""
        ...

    def embed_images_sync(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        """A few images already open (what a build measures after embedding: checks on copies of a sample)."""
        ...


def unreadable_reason(exc: InputError) -> str:
    """What a build lists for a photo it cannot open: open_image's message without the leading path."""
    return str(exc).split(": ", 1)[-1]


class LocalEmbedding:
    """Embeds in this process, ``batch_size`` photos at a time (decoded here, embedded by torch's threads)."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder, self.spec = embedder, embedder.spec

    def embed_listed(self, listing: Path, batch_size: int) -> Iterator[np.ndarray | str]:
        with listing.open(encoding="utf-8") as fh:
            paths = (json.loads(line) for line in fh)
            while batch := list(itertools.islice(paths, batch_size)):
                opened: list[Image.Image | str] = []
                for path in batch:
                    try:
                        opened.append(open_image(path))
                    except InputError as exc:
                        opened.append(unreadable_reason(exc))
                images = [image for image in opened if not isinstance(image, str)]
                vectors = iter(self.embedder.embed_images_sync(images, batch_size) if images else [])
                yield from (image if isinstance(image, str) else next(vectors) for image in opened)

    def embed_images_sync(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        return self.embedder.embed_images_sync(images, batch_size)


def build_index(
    source: Path,
    out: Path,
    embedder: Embedder | PhotoEmbedding,
    *,
    index_type: IndexType | None = None,
    overrides: ParamOverrides | None = None,
    append: bool = False,
    kmeans_k: int = 100,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    items: Iterable[SourceItem] | None = None,
    images: Path | None = None,
    chunk_rows: int = INDEX_CHUNK_ROWS,
) -> BuildReport:
    """Index the photos of ``source`` into ``out``: a new version, reusing the embeddings of unchanged files
    from the live one; or, with ``append``, the live version plus the photos it does not hold yet.

    ``embedder``: a loaded model (embeds here), or a :class:`PhotoEmbedding` (the Ray engine's); ``items``:
    what :func:`read_source` gave for ``source``, when the caller read it already; ``images``: the photo folder
    of an IMG_ID,LAT,LON metadata CSV.
    """
    out = out.expanduser()
    photos = LocalEmbedding(embedder) if isinstance(embedder, Embedder) else embedder
    items = read_source(source, images) if items is None else items
    report = BuildReport()
    live = _open_live(out)
    if append:
        if live is None:
            raise InputError(f"{display_path(out)}: no index to append to; build one first (without --append)")
        live.check_embedder(photos.spec)
        if index_type is not None and index_type != live.manifest.index_type:
            raise ConfigError(f"--type {index_type}: the index is {live.manifest.index_type}, and --append keeps its type; rebuild to change it")
    requested: IndexType = index_type or (live.manifest.index_type if append and live else "flat")  # type: ignore[assignment]
    lookup = IdLookup(live) if live is not None and live.manifest.embedder == photos.spec else None
    try:
        writer = IndexWriter(
            out, photos.spec, index_type=requested, source=str(source.resolve()), kmeans_k=kmeans_k,
            overrides=overrides, base=live if append else None, chunk_rows=chunk_rows,
        )  # fmt: skip
    except OSError as exc:
        raise InputError(f"{display_path(out)}: cannot write the index ({os_error_reason(exc)})") from None
    with writer:
        plan, listing = writer.staging / ".plan.jsonl", writer.staging / ".embed.jsonl"
        todo = _plan(items, source, lookup, append, report, plan, listing)
        if on_total:
            on_total(todo)
        embedded = photos.embed_listed(listing, batch_size)
        _fill(writer, plan, live.table.vectors if live is not None else None, embedded, batch_size, progress, report)
        plan.unlink()
        listing.unlink()
        if writer.added == 0:
            if append and live is not None:
                report.indexed, report.version, report.params = live.manifest.count, live.version.name, live.manifest.params
                return report
            raise InputError(f"{source}: nothing to index ({len(report.skipped)} files skipped)")
        try:
            report.version, manifest = writer.commit(photos)
        except OSError as exc:
            raise InputError(f"{display_path(out)}: cannot write the index ({os_error_reason(exc)})") from None
    report.indexed, report.params, report.near_duplicates = manifest.count, manifest.params, manifest.near_duplicates
    report.appended = writer.added if append else 0
    trained = manifest.params.trained_on
    if append and trained and manifest.count > QUANTIZER_OUTGROWN * trained:
        report.hint = (
            f"the index has grown {manifest.count / trained:.0f}x since its quantizer was trained; "
            "rebuild it without --append (embeddings are reused) for faster, more accurate search"
        )
    return report


NOT_CALIBRATED = f"not calibrated (built before calibration): only exact copies win, from similarity {EXACT_COPY_SIMILARITY}; rebuild to calibrate"
QUANTIZER_OUTGROWN = 4  # an ivf quantizer trained on n vectors serves up to 4n well; past that, retrain


def _plan(
    items: Iterable[SourceItem], source: Path, lookup: IdLookup | None, append: bool, report: BuildReport, plan: Path, listing: Path
) -> int:
    """Write one line per usable photo (in source order) saying whether its embedding is reused, and the
    paths of those to embed to ``listing``; the rest are skipped with their reason. Returns how many photos
    need embedding."""
    todo = 0
    with plan.open("w", encoding="utf-8") as fh, listing.open("w", encoding="utf-8") as paths:
        for item in items:
            if item.problem or item.lat is None or item.lon is None:
                report.skipped.append((item.id, item.problem or ("no GPS in EXIF" if source.is_dir() else "invalid lat/lon")))
                continue
            try:
                stat = item.path.stat()
            except OSError as exc:
                report.skipped.append((item.id, os_error_reason(exc, item.path)))
                continue
            known = lookup.find(item.id) if lookup is not None else None
            if append and known is not None:
                report.already += 1
                continue
            unchanged = known is not None and (known[1].size, known[1].mtime_ns, known[1].path) == (stat.st_size, stat.st_mtime_ns, str(item.path))
            reuse = known[0] if unchanged and known is not None else -1
            if reuse < 0:
                todo += 1
                paths.write(json.dumps(str(item.path)) + "\n")
            fh.write(json.dumps([item.id, str(item.path), item.lat, item.lon, item.country, stat.st_size, stat.st_mtime_ns, reuse]) + "\n")
    return todo


def _fill(
    writer: IndexWriter,
    plan: Path,
    previous: np.ndarray | None,
    embedded: Iterator[np.ndarray | str],
    batch_size: int,
    progress: Callable[[int, int], None] | None,
    report: BuildReport,
) -> None:
    """Write the planned rows in order: reused vectors copied, the others taken from ``embedded`` (one result
    per row to embed, in plan order), handed to the writer ``batch_size`` new photos at a time."""
    rows: list[tuple[RowDraft, np.ndarray]] = []
    fresh = opened = 0

    def flush() -> None:
        nonlocal fresh, opened
        if rows:
            writer.add([draft for draft, _ in rows], np.stack([vector for _, vector in rows]))
            rows.clear()
        if fresh and progress:
            progress(fresh, opened)
        fresh = opened = 0

    with plan.open(encoding="utf-8") as fh:
        for line in fh:
            item_id, path, lat, lon, country, size, mtime_ns, reuse = json.loads(line)
            draft = RowDraft(item_id, path, lat, lon, size, mtime_ns, country)
            if reuse >= 0:
                assert previous is not None  # reuse is planned against a live index only
                rows.append((draft, np.asarray(previous[reuse])))
                report.reused += 1
            else:
                result = next(embedded)
                fresh += 1
                if isinstance(result, str):
                    report.skipped.append((item_id, result))
                else:
                    rows.append((draft, result))
                    opened += 1
                    report.embedded += 1
            if fresh == batch_size or len(rows) >= PASS_THROUGH_ROWS:
                flush()
    flush()


# --- committing ----------------------------------------------------------------------------------------------


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def staging_name(version: str) -> str:
    """The folder a version is written in before it is renamed into place; it names the host, whose pid
    is in ``version``, so an abandoned one can be told from one that another build is still writing."""
    return f".{version}@{_host()}.partial"


_STAGING = re.compile(r"^\.v-[0-9T]+-(?P<pid>\d+)-\d+@(?P<host>[A-Za-z0-9-]+)\.partial$")


def _abandoned(staging: Path) -> bool:
    """True for another build's staging folder whose process is gone, or that is older than any build."""
    try:
        if time.time() - staging.stat().st_mtime > STALE_STAGING_AGE_S:
            return True
    except OSError:
        return False
    match = _STAGING.match(staging.name)
    if match is None or match["host"] != _host() or os.name == "nt":
        return False  # another machine's build (or no pid to check): only its age tells
    return not _pid_alive(int(match["pid"]))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


def _remove_replaced(out: Path, live: str) -> None:
    """Old versions, and staging folders whose build is gone; another build's staging folder stays."""
    for stale in out.iterdir():
        if not stale.is_dir() or stale.name == live:
            continue
        if stale.name.startswith("v-") or (stale.name.endswith(".partial") and _abandoned(stale)):
            shutil.rmtree(stale, ignore_errors=True)


def index_summary(index: ReferenceIndex) -> dict[str, object]:
    m = index.manifest
    return {
        "path": str(index.directory),
        "entries": m.count,
        "embedder": m.embedder.describe(),
        "index_type": m.index_type,
        "search": m.params.describe() + (f" (exact below {EXACT_BELOW:,} vectors)" if m.params.kind != m.index_type else ""),
        "params": m.params.model_dump(exclude_none=True),
        "disk_mb": round(sum(p.stat().st_size for p in index.version.iterdir()) / 1e6, 1),
        "dim": m.dim,
        "kmeans_clusters": m.kmeans_k,
        "countries": m.countries,
        "built_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.built_at)),
        "source": m.source,
        "near_duplicates": m.near_duplicates.describe() if m.near_duplicates else NOT_CALIBRATED,
    }
