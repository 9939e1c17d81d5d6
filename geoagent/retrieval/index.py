"""The reference index: geotagged photos embedded with open_clip and stored with faiss.

On disk an index is a folder holding versions and a ``CURRENT`` pointer::

    DIR/CURRENT              name of the live version, replaced atomically
    DIR/v-<time>/manifest.json   embedder, index type, counts, countries
    DIR/v-<time>/entries.jsonl   one IndexEntry per row
    DIR/v-<time>/vectors.npy     L2-normalised embeddings (row i = entry i)
    DIR/v-<time>/index.faiss     the faiss index over those vectors
    DIR/v-<time>/centroids.npy   geographic k-means centroids (lat, lon)

A build writes a new version and only then moves ``CURRENT``: a crash or Ctrl-C leaves the old one usable.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
from filelock import FileLock
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ValidationError

from geoagent.errors import ConfigError, InputError
from geoagent.geo import reverse_geocode
from geoagent.images import IMAGE_SUFFIXES, open_image
from geoagent.paths import display_path, file_problem, os_error_reason, resolve
from geoagent.retrieval.embedder import EmbedderSpec
from geoagent.retrieval.vectors import HNSW_EF_SEARCH, IndexType, VectorTable, build_faiss, geo_kmeans
from geoagent.types import Candidate

if TYPE_CHECKING:
    from geoagent.retrieval.embedder import Embedder

FORMAT_VERSION = 1
POINTER = "CURRENT"
LOCK = ".lock"  # held while CURRENT moves and old versions are removed, so concurrent builds stay consistent
STALE_STAGING_AGE_S = 6 * 3600  # a staging folder this old belongs to a build that is gone, whatever its pid


class IndexMismatchError(ConfigError):
    """The index was built by another embedder than the one configured."""


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
    index_type: IndexType
    dim: int
    count: int
    kmeans_k: int
    source: str
    built_at: float
    countries: dict[str, int]


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
    indexed: int = 0
    embedded: int = 0  # newly embedded this run
    reused: int = 0  # embeddings carried over from the previous version (file unchanged)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    version: str = ""


# --- reading sources -----------------------------------------------------------------------------------


def _rational(value: object) -> float:
    if isinstance(value, tuple):
        return float(value[0]) / float(value[1]) if value[1] else 0.0
    return float(value)  # type: ignore[arg-type]


def read_gps(path: Path) -> tuple[tuple[float, float] | None, str | None]:
    """(lat, lon) from a photo's EXIF GPS block (header only), or None and what is wrong with the file
    (no problem given: a readable photo without GPS)."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file"
        with Image.open(path) as image:
            gps = image.getexif().get_ifd(0x8825)
    except UnidentifiedImageError:
        return None, "not an image (or a format Pillow cannot read)"
    except PermissionError as exc:
        return None, os_error_reason(exc)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return None, f"unreadable image ({exc})"
    if not gps or 2 not in gps or 4 not in gps:
        return None, None
    try:
        lat = sum(_rational(v) / 60**i for i, v in enumerate(gps[2]))
        lon = sum(_rational(v) / 60**i for i, v in enumerate(gps[4]))
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        return None, "malformed EXIF GPS"
    if str(gps.get(1, "N")).upper().startswith("S"):
        lat = -lat
    if str(gps.get(3, "E")).upper().startswith("W"):
        lon = -lon
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return None, "EXIF GPS out of range"
    return (lat, lon), None


def read_folder(root: Path) -> Iterator[SourceItem]:
    """Photos under ``root`` by suffix, recursively; anything by that name that is not a readable photo file
    (a folder, a symlink loop, a name that is not UTF-8, ...) comes with its problem, to be listed as skipped."""
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
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


def read_csv_rows(csv_path: Path) -> tuple[set[str], list[CsvRow]]:
    """The header and the rows of a UTF-8 CSV; a row holding bytes that are not UTF-8 comes with its problem.

    A file that is not CSV text at all (UTF-16, binary) is an InputError naming the file and line.
    """
    line = 1
    try:
        with csv_path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            if not all(is_utf8(name) for name in header):
                raise InputError(f"{display_path(csv_path)} line 1: {NOT_UTF8_ROW}")
            rows: list[CsvRow] = []
            for cells in reader:
                line = reader.line_num
                clean = all(is_utf8(value) for value in cells.values() if isinstance(value, str))
                rows.append(CsvRow(line, cells, None if clean else NOT_UTF8_ROW))
                line += 1
    except csv.Error as exc:
        raise InputError(f"{display_path(csv_path)} line {line}: not a readable CSV ({exc}); is it UTF-8 text?") from None
    except OSError as exc:
        raise InputError(f"{display_path(csv_path)}: cannot read ({os_error_reason(exc)})") from None
    return set(header), rows


def is_utf8(text: str) -> bool:
    """False when ``text`` carries bytes that were not UTF-8 (decoded with surrogateescape)."""
    return not any("\udc80" <= char <= "\udcff" for char in text)


def read_csv(csv_path: Path) -> Iterator[SourceItem]:
    """Rows ``path,lat,lon[,country]``, paths relative to the CSV's folder."""
    columns, rows = read_csv_rows(csv_path)
    missing = {"path", "lat", "lon"} - columns
    if missing:
        raise InputError(f"{display_path(csv_path)}: missing column(s) {', '.join(sorted(missing))} (need path,lat,lon[,country])")
    for row in rows:
        name = row.name(csv_path, "path")
        if row.problem:
            yield SourceItem(name, csv_path.parent, None, None, problem=row.problem)
            continue
        try:
            lat, lon = float(row.cells["lat"]), float(row.cells["lon"])
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise ValueError
        except (TypeError, ValueError):
            yield SourceItem(name, csv_path.parent, None, None, problem="invalid lat/lon")
            continue
        path, problem = resolve(csv_path.parent / (row.cells.get("path") or "").strip())
        country = (row.cells.get("country") or "").strip().upper() or None
        yield SourceItem(name, path or csv_path.parent, lat, lon, country, problem)


_VIGOR_TILE = re.compile(r"^satellite_(?P<lat>-?\d+\.\d+)_(?P<lon>-?\d+\.\d+)\.png$")


def read_vigor_tiles(root: Path) -> Iterator[SourceItem]:
    """VIGOR's aerial tiles, ``<City>/satellite/satellite_<lat>_<lon>.png``, ids relative to ``root``."""
    for tile in sorted(root.glob("*/satellite/satellite_*.png")):
        match = _VIGOR_TILE.match(tile.name)
        if match:
            yield SourceItem(tile.relative_to(root).as_posix(), tile.resolve(), float(match["lat"]), float(match["lon"]), "US")


def read_source(source: Path) -> list[SourceItem]:
    if source.is_dir() and (source / "splits").is_dir():
        return list(read_vigor_tiles(source))
    if source.is_dir():
        return list(read_folder(source))
    if source.is_file() and source.suffix.lower() == ".csv":
        return list(read_csv(source))
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
        raise InputError(f"{display_path(pointer)}: cannot read the index pointer ({reason})") from None
    return version if version.is_dir() else None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ReferenceIndex:
    """A built index, opened for search."""

    def __init__(self, directory: Path, manifest: IndexManifest, entries: list[IndexEntry], table: VectorTable) -> None:
        self.directory, self.manifest, self.entries, self.table = directory, manifest, entries, table

    @classmethod
    def open(cls, directory: str | Path) -> ReferenceIndex:
        directory = Path(directory).expanduser()
        version = current_version(directory)
        if version is None:
            raise InputError(f"{directory}: not a GeoAgent index (build one with `geoagent index build SOURCE --out {directory}`)")
        try:
            manifest = IndexManifest.model_validate_json((version / "manifest.json").read_text())
            with (version / "entries.jsonl").open() as fh:
                entries = [IndexEntry.model_validate_json(line) for line in fh if line.strip()]
            vectors = np.load(version / "vectors.npy", mmap_mode="r")
            index = faiss.read_index(str(version / "index.faiss"))
            centroids = np.load(version / "centroids.npy")
        except (OSError, ValidationError, ValueError, RuntimeError) as exc:
            raise InputError(f"{version}: damaged index ({str(exc).splitlines()[0]}); rebuild it") from None
        if manifest.format != FORMAT_VERSION:
            raise InputError(f"{directory}: index format {manifest.format}, this GeoAgent reads {FORMAT_VERSION}; rebuild it")
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = max(index.hnsw.efSearch, HNSW_EF_SEARCH)
        table = VectorTable(
            vectors=vectors,
            index=index,
            lat=np.array([e.lat for e in entries]),
            lon=np.array([e.lon for e in entries]),
            country=np.array([e.country for e in entries]),
            cluster=np.array([e.cluster for e in entries], dtype=np.int32),
            centroids=centroids,
        )
        return cls(directory, manifest, entries, table)

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


def _previous(directory: Path, spec: EmbedderSpec) -> dict[str, tuple[IndexEntry, np.ndarray]]:
    """Entries and vectors of the live version, when built by the same embedder (for incremental builds)."""
    try:
        old = ReferenceIndex.open(directory)
    except InputError:
        return {}
    if old.manifest.embedder != spec:
        return {}
    return {entry.id: (entry, np.asarray(old.table.vectors[i])) for i, entry in enumerate(old.entries)}


def build_index(
    source: Path,
    out: Path,
    embedder: Embedder,
    *,
    index_type: IndexType = "flat",
    kmeans_k: int = 100,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    items: list[SourceItem] | None = None,
) -> BuildReport:
    """Index the photos of ``source`` into ``out``; reuse embeddings of unchanged files from the live version.

    ``items``: what :func:`read_source` gave for ``source``, when the caller read it already.
    """
    out = out.expanduser()
    items = read_source(source) if items is None else items
    report = BuildReport()
    previous = _previous(out, embedder.spec)

    rows: list[tuple[SourceItem, os.stat_result]] = []
    for item in items:
        if item.problem or item.lat is None or item.lon is None:
            report.skipped.append((item.id, item.problem or ("no GPS in EXIF" if source.is_dir() else "invalid lat/lon")))
            continue
        try:
            stat = item.path.stat()
        except OSError as exc:
            report.skipped.append((item.id, os_error_reason(exc, item.path)))
            continue
        rows.append((item, stat))

    vectors: dict[str, np.ndarray] = {}
    todo: list[tuple[SourceItem, os.stat_result]] = []
    for item, stat in rows:
        old = previous.get(item.id)
        if old and old[0].size == stat.st_size and old[0].mtime_ns == stat.st_mtime_ns and old[0].path == str(item.path):
            vectors[item.id] = old[1]
            report.reused += 1
        else:
            todo.append((item, stat))
    if on_total:
        on_total(len(todo))
    for batch in _batches(todo, batch_size):
        images, ids = [], []
        for item, _ in batch:
            try:
                images.append(open_image(item.path))
                ids.append(item.id)
            except InputError as exc:
                report.skipped.append((item.id, str(exc).split(": ", 1)[-1]))
        if images:
            for item_id, vector in zip(ids, embedder.embed_images_sync(images, batch_size)):
                vectors[item_id] = vector
        report.embedded += len(images)
        if progress:
            progress(len(batch), len(images))

    kept = [(item, stat) for item, stat in rows if item.id in vectors]
    if not kept:
        raise InputError(f"{source}: nothing to index ({len(report.skipped)} files skipped)")
    lat = np.array([item.lat for item, _ in kept], dtype=np.float64)
    lon = np.array([item.lon for item, _ in kept], dtype=np.float64)
    places = reverse_geocode(lat, lon)
    clusters, centroids = geo_kmeans(lat, lon, kmeans_k)
    entries = [
        IndexEntry(
            id=item.id,
            path=str(item.path),
            lat=float(item.lat),  # type: ignore[arg-type]
            lon=float(item.lon),  # type: ignore[arg-type]
            country=item.country or country,
            place=place,
            cluster=int(cluster),
            size=stat.st_size,
            mtime_ns=stat.st_mtime_ns,
        )
        for (item, stat), (country, place), cluster in zip(kept, places, clusters)
    ]
    matrix = np.ascontiguousarray(np.stack([vectors[e.id] for e in entries]), dtype=np.float32)
    manifest = IndexManifest(
        embedder=embedder.spec,
        index_type=index_type,
        dim=matrix.shape[1],
        count=len(entries),
        kmeans_k=len(centroids),
        source=str(source.resolve()),
        built_at=time.time(),
        countries=dict(Counter(e.country for e in entries).most_common()),
    )
    report.indexed = len(entries)
    try:
        report.version = _commit(out, manifest, entries, matrix, build_faiss(matrix, index_type), centroids)
    except OSError as exc:
        raise InputError(f"{display_path(out)}: cannot write the index ({os_error_reason(exc)})") from None
    return report


def _batches(items: list[tuple[SourceItem, os.stat_result]], size: int) -> Iterable[list[tuple[SourceItem, os.stat_result]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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


def _commit(out: Path, manifest: IndexManifest, entries: list[IndexEntry], matrix: np.ndarray, index: faiss.Index, centroids: np.ndarray) -> str:
    """Write a new version beside the live one, then point CURRENT at it and remove the versions it replaces.

    Concurrent builds into one folder each stage in their own folder; moving CURRENT and removing old
    versions happen under a lock, so CURRENT always names a complete version (the last one committed).
    """
    out.mkdir(parents=True, exist_ok=True)
    name = f"v-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**6:06d}"
    staging = out / staging_name(name)
    staging.mkdir()
    try:
        (staging / "entries.jsonl").write_text("".join(e.model_dump_json() + "\n" for e in entries))
        np.save(staging / "vectors.npy", matrix)
        np.save(staging / "centroids.npy", centroids)
        faiss.write_index(index, str(staging / "index.faiss"))
        (staging / "manifest.json").write_text(manifest.model_dump_json(indent=2))
        for path in staging.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        with FileLock(out / LOCK):
            staging.rename(out / name)
            _write_atomic(out / POINTER, name.encode())
            _remove_replaced(out, name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return name


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
        "dim": m.dim,
        "kmeans_clusters": m.kmeans_k,
        "countries": m.countries,
        "built_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.built_at)),
        "source": m.source,
    }
