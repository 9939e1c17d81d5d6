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
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ValidationError

from geoagent.errors import ConfigError, InputError
from geoagent.geo import reverse_geocode
from geoagent.images import IMAGE_SUFFIXES, open_image
from geoagent.retrieval.embedder import EmbedderSpec
from geoagent.retrieval.vectors import HNSW_EF_SEARCH, IndexType, VectorTable, build_faiss, geo_kmeans
from geoagent.types import Candidate

if TYPE_CHECKING:
    from geoagent.retrieval.embedder import Embedder

FORMAT_VERSION = 1
POINTER = "CURRENT"


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
    problem: str | None = None  # why it has no coordinate, when known


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
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        gps, problem = read_gps(path)
        lat, lon = gps if gps else (None, None)
        yield SourceItem(path.relative_to(root).as_posix(), path.resolve(), lat, lon, problem=problem)


def read_csv(csv_path: Path) -> Iterator[SourceItem]:
    """Rows ``path,lat,lon[,country]``, paths relative to the CSV's folder."""
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "lat", "lon"} - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))} (need path,lat,lon[,country])")
        for line, row in enumerate(reader, start=2):
            rel = (row.get("path") or "").strip()
            try:
                lat, lon = float(row["lat"]), float(row["lon"])
                if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                    raise ValueError
            except (TypeError, ValueError):
                yield SourceItem(rel or f"line {line}", csv_path.parent / rel, None, None)
                continue
            country = (row.get("country") or "").strip().upper() or None
            yield SourceItem(rel, (csv_path.parent / rel).resolve(), lat, lon, country)


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
        raise InputError(f"{source}: no such folder or CSV")
    raise InputError(f"{source}: expected a folder of photos or a CSV with path,lat,lon[,country]")


# --- the index on disk ---------------------------------------------------------------------------------


def current_version(directory: Path) -> Path | None:
    pointer = directory / POINTER
    if not pointer.is_file():
        return None
    version = directory / pointer.read_text().strip()
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
) -> BuildReport:
    """Index the photos of ``source`` into ``out``; reuse embeddings of unchanged files from the live version."""
    out = out.expanduser()
    items = read_source(source)
    report = BuildReport()
    previous = _previous(out, embedder.spec)

    rows: list[tuple[SourceItem, os.stat_result]] = []
    for item in items:
        if item.lat is None or item.lon is None:
            report.skipped.append((item.id, item.problem or ("no GPS in EXIF" if source.is_dir() else "invalid lat/lon")))
            continue
        try:
            stat = item.path.stat()
        except OSError:
            report.skipped.append((item.id, "file not found"))
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
    report.version = _commit(out, manifest, entries, matrix, build_faiss(matrix, index_type), centroids)
    return report


def _batches(items: list[tuple[SourceItem, os.stat_result]], size: int) -> Iterable[list[tuple[SourceItem, os.stat_result]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _commit(out: Path, manifest: IndexManifest, entries: list[IndexEntry], matrix: np.ndarray, index: faiss.Index, centroids: np.ndarray) -> str:
    """Write a new version beside the live one, then point CURRENT at it; old versions are removed after."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"v-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**6:06d}"
    staging = out / f".{name}.partial"
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
        staging.rename(out / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _write_atomic(out / POINTER, name.encode())
    for stale in out.iterdir():
        if stale.name != name and stale.is_dir() and (stale.name.startswith("v-") or stale.name.endswith(".partial")):
            shutil.rmtree(stale, ignore_errors=True)
    return name


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
