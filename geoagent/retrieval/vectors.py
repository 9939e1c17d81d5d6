"""Geotagged vectors in faiss: index types and their size rules, chunked index builds, submaps, search.

Shared by the reference-photo index and the gazetteer, which differ only in where vectors come from.

Index types, with the parameters :func:`default_params` picks for ``n`` vectors (stored in the index's
manifest; searches use them):

- ``flat``: exact. No faiss file: search scans ``vectors.npy``, memory-mapped, with faiss's exact kernel.
- ``hnsw``: an HNSW graph (M = 32) over the full vectors. efSearch 64 below 100k vectors, 128 below 1M,
  256 from 1M; efConstruction 80, 40 from 1M (build time grows with it). The graph is built in RAM
  (about n * (4d + 8M) bytes); searches read its vectors memory-mapped.
- ``ivf``: IVF-Flat. nlist = 2 * sqrt(n), at most n / 39 (faiss wants 39 training points per list), trained
  on 40 points per list; nprobe = nlist / 16, at least 16. Inverted lists are built in chunks, merged on
  disk and memory-mapped.
- ``ivfpq``: IVF with product quantization, for millions on a laptop: nlist and nprobe as ``ivf``, d / 8
  bytes per vector (8-bit codes; fewer bits when there are too few vectors to train 256 centroids). The
  approximate shortlist (the best ``rerank`` = 100, at least 2k) is re-scored exactly from ``vectors.npy``.

Sets under 1,000 vectors are searched exactly whatever the type. A submap search is exact over the
submap's own vectors, read from the memory-mapped matrix a chunk at a time.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, get_args

import faiss
import numpy as np
from pydantic import BaseModel

from geoagent.errors import ConfigError
from geoagent.geo import from_unit_vectors, unit_vectors

IndexType = Literal["flat", "hnsw", "ivf", "ivfpq"]
INDEX_TYPES: tuple[IndexType, ...] = get_args(IndexType)

EXACT_BELOW = 1000  # vectors: fewer are searched exactly, whatever the type (faster, and exact)
HNSW_NEIGHBOURS = 32  # graph degree M; 32 is faiss's recommendation for recall near 0.99
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_CONSTRUCTION_LARGE = 40  # from LARGE_INDEX vectors: halves the build time for a little recall
LARGE_INDEX = 1_000_000
HNSW_EF_SEARCH_STEPS = ((100_000, 64), (LARGE_INDEX, 128))  # (below n, efSearch); 256 beyond
HNSW_EF_SEARCH_MAX = 256
HNSW_EF_SEARCH = 128  # when the parameters name none
IVF_LISTS_PER_SQRT = 2  # nlist = 2 * sqrt(n)
IVF_MIN_POINTS_PER_LIST = 39  # below this faiss's k-means warns and clusters poorly
IVF_TRAIN_POINTS_PER_LIST = 40  # training sample per list: enough, and k-means cost grows with it
IVF_TRAIN_ITERATIONS = 10
IVF_NPROBE_MIN = 16
IVF_NPROBE_FRACTION = 16  # nprobe = nlist / 16: about 6% of the lists are visited
PQ_DIMS_PER_BYTE = 8  # one 8-bit sub-quantizer code per 8 dimensions: 64 bytes for 512-d
PQ_MAX_BITS = 8
PQ_MIN_BITS = 4
PQ_TRAIN_POINTS_PER_CENTROID = 64  # codebook training sample cap (faiss: 256): 64 trains 8-d codebooks well, 4x faster
RERANK_SHORTLIST = 100  # ivfpq: approximate candidates re-scored exactly per query (at least 2k)
INDEX_CHUNK_ROWS = 32_768  # vectors read, added or sharded at once while an index is built (64 MiB at 512-d)
SCORE_CHUNK_ROWS = 16_384  # vectors scored at once by an exact submap search
TRAIN_SEED = 0
MIN_CLUSTER_SIZE = 10  # average points per geographic cluster, at least
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"
TRAINED_FILE = "trained.faiss"  # ivf, ivfpq: the trained, empty index (quantizer, PQ codebooks), for appends


class IndexParams(BaseModel):
    """The faiss structure actually built and how it is searched; written to the manifest."""

    kind: IndexType  # flat when the set was too small for the requested type
    nlist: int | None = None  # ivf, ivfpq: inverted lists
    nprobe: int | None = None  # ivf, ivfpq: lists visited per query
    ef_search: int | None = None  # hnsw: candidates explored per query
    ef_construction: int | None = None  # hnsw
    hnsw_m: int | None = None  # hnsw: graph degree
    pq_m: int | None = None  # ivfpq: sub-quantizers (bytes per vector at 8 bits)
    pq_bits: int | None = None  # ivfpq: bits per sub-quantizer code
    rerank: int | None = None  # ivfpq: shortlist re-scored exactly
    trained_on: int | None = None  # ivf, ivfpq: vectors in the index when its quantizer was trained

    def describe(self) -> str:
        shown = self.model_dump(exclude={"kind", "trained_on"}, exclude_none=True)
        return " ".join([self.kind, *(f"{key}={value}" for key, value in shown.items())])


ParamOverrides = dict[str, int]  # nlist / nprobe / ef_search / pq_m given by the user
OVERRIDABLE: dict[str, tuple[IndexType, ...]] = {"nlist": ("ivf", "ivfpq"), "nprobe": ("ivf", "ivfpq"), "ef_search": ("hnsw",), "pq_m": ("ivfpq",)}


def check_overrides(index_type: IndexType, dim: int | None, overrides: ParamOverrides) -> None:
    """ConfigError for a parameter the type does not have, or a PQ size that does not divide the dimension."""
    for key in overrides:
        if index_type not in OVERRIDABLE[key]:
            raise ConfigError(f"{key} applies to {' and '.join(OVERRIDABLE[key])} indexes, not {index_type}")
    if dim is not None and dim % overrides.get("pq_m", 1):
        raise ConfigError(f"pq_m {overrides['pq_m']} bytes do not divide the embedding dimension {dim}")


def default_params(index_type: IndexType, n: int, dim: int, overrides: ParamOverrides | None = None) -> IndexParams:
    """The parameters for ``n`` vectors of ``dim`` dimensions (the rule is in the module docstring)."""
    overrides = overrides or {}
    check_overrides(index_type, dim, overrides)
    if index_type == "flat" or n < EXACT_BELOW:
        return IndexParams(kind="flat")
    if index_type == "hnsw":
        ef_search = next((ef for below, ef in HNSW_EF_SEARCH_STEPS if n < below), HNSW_EF_SEARCH_MAX)
        ef_construction = HNSW_EF_CONSTRUCTION if n < LARGE_INDEX else HNSW_EF_CONSTRUCTION_LARGE
        params = IndexParams(kind="hnsw", hnsw_m=HNSW_NEIGHBOURS, ef_construction=ef_construction, ef_search=ef_search)
        return params.model_copy(update=overrides)
    nlist = overrides.get("nlist") or max(1, min(int(IVF_LISTS_PER_SQRT * math.sqrt(n)), n // IVF_MIN_POINTS_PER_LIST))
    nprobe = overrides.get("nprobe") or max(IVF_NPROBE_MIN, nlist // IVF_NPROBE_FRACTION)
    params = IndexParams(kind=index_type, nlist=nlist, nprobe=min(nprobe, nlist), trained_on=n)
    if index_type == "ivfpq":
        pq_m = overrides.get("pq_m") or _pq_subquantizers(dim)
        train = _train_size(params, n)
        bits = max(PQ_MIN_BITS, min(PQ_MAX_BITS, int(math.log2(max(2, train / IVF_MIN_POINTS_PER_LIST)))))
        params = params.model_copy(update={"pq_m": pq_m, "pq_bits": bits, "rerank": RERANK_SHORTLIST})
    return params


def _pq_subquantizers(dim: int) -> int:
    """The most sub-quantizers dividing ``dim`` with at least PQ_DIMS_PER_BYTE dimensions each."""
    return max(m for m in range(1, max(1, dim // PQ_DIMS_PER_BYTE) + 1) if dim % m == 0)


def _train_size(params: IndexParams, n: int) -> int:
    """Training sample: 40 points per list; ivfpq also needs 39 per PQ centroid (256 of them at 8 bits)."""
    wanted = (params.nlist or 1) * IVF_TRAIN_POINTS_PER_LIST
    if params.kind == "ivfpq":
        wanted = max(wanted, (1 << PQ_MAX_BITS) * IVF_MIN_POINTS_PER_LIST)
    return min(n, wanted)


def new_index(params: IndexParams, dim: int) -> faiss.Index:
    """An empty faiss index for ``params`` (untrained for ivf/ivfpq); inner product = cosine on unit vectors."""
    if params.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m or HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction or HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = params.ef_search or HNSW_EF_SEARCH
        return index
    quantizer = faiss.IndexFlatIP(dim)
    if params.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, params.nlist, faiss.METRIC_INNER_PRODUCT)
    elif params.kind == "ivfpq":
        index = faiss.IndexIVFPQ(quantizer, dim, params.nlist, params.pq_m, params.pq_bits, faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.niter = IVF_TRAIN_ITERATIONS
        index.pq.cp.max_points_per_centroid = PQ_TRAIN_POINTS_PER_CENTROID
    else:
        raise ValueError(f"unknown index type {params.kind!r}")
    index.own_fields = True
    quantizer.this.disown()
    index.cp.niter = IVF_TRAIN_ITERATIONS
    index.nprobe = params.nprobe
    return index


def training_sample(vectors: np.ndarray, params: IndexParams) -> np.ndarray:
    """A seeded random sample of rows (read from a memory-mapped matrix row by row, not whole)."""
    n = len(vectors)
    size = _train_size(params, n)
    rows = np.sort(np.random.default_rng(TRAIN_SEED).choice(n, size, replace=False)) if size < n else np.arange(n)
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def build_faiss(vectors: np.ndarray, index_type: IndexType, params: IndexParams | None = None) -> faiss.Index:
    """An index over ``vectors`` held in memory (the gazetteer; small sets). Large indexes: :func:`write_ann`."""
    params = params or default_params(index_type, len(vectors), vectors.shape[1])
    index = new_index(params, vectors.shape[1])
    if params.kind in ("ivf", "ivfpq"):
        index.train(training_sample(vectors, params))
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


# --- building an index on disk, a chunk at a time ------------------------------------------------------------


@contextmanager
def c_stdout_silenced() -> Iterator[None]:
    """faiss reports on-disk list files with C printf on stdout, which carries our results: hide those lines."""
    if os.name == "nt":
        yield
        return
    import ctypes

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def chunks(vectors: np.ndarray, start: int = 0, rows: int = INDEX_CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of a (memory-mapped) matrix, ``rows`` at a time, each copied contiguous."""
    for first in range(start, len(vectors), rows):
        yield first, np.ascontiguousarray(vectors[first : first + rows], dtype=np.float32)


def write_ann(
    vectors: np.ndarray,
    folder: Path,
    params: IndexParams,
    *,
    final_folder: Path,
    base_folder: Path | None = None,
    base_lists: str | None = None,
    start: int = 0,
    chunk_rows: int = INDEX_CHUNK_ROWS,
) -> None:
    """Write the faiss files of ``params.kind`` for ``vectors`` (a memory-mapped matrix) into ``folder``.

    Rows are read ``chunk_rows`` at a time. With ``base_folder`` (the previous version, whose index covers
    rows ``[0, start)``), its trained quantizer is reused and only the rows from ``start`` on are added.
    An IVF index is filled as one shard per chunk, then the shards (and the base's lists) are merged into
    one memory-mapped list file, so memory stays at a chunk whatever the size. ``final_folder`` is where
    ``folder`` will be renamed: the list file is recorded there.
    """
    if params.kind == "flat":
        return
    if params.kind == "hnsw":
        index = faiss.read_index(str(base_folder / INDEX_FILE)) if base_folder else new_index(params, vectors.shape[1])
        for _, chunk in chunks(vectors, start, chunk_rows):
            index.add(chunk)
        faiss.write_index(index, str(folder / INDEX_FILE))
        return
    if base_folder is not None:
        empty = faiss.read_index(str(base_folder / TRAINED_FILE))
        bases = [read_ann(base_folder, params, base_lists)]
    else:
        empty = new_index(params, vectors.shape[1])
        empty.train(training_sample(vectors, params))
        bases = []
    faiss.write_index(empty, str(folder / TRAINED_FILE))
    shards = []
    for first, chunk in chunks(vectors, start, chunk_rows):
        shard = faiss.clone_index(empty)
        shard.add_with_ids(chunk, np.arange(first, first + len(chunk), dtype=np.int64))
        shards.append(folder / f".shard-{len(shards):05d}.faiss")
        faiss.write_index(shard, str(shards[-1]))
        del shard
    _merge_lists(empty, bases, shards, folder, final_folder)
    for path in shards:
        path.unlink()


def _merge_lists(empty: faiss.Index, bases: list[faiss.Index | None], shards: list[Path], folder: Path, final_folder: Path) -> None:
    """faiss.contrib.ondisk.merge_ondisk, also taking opened indexes, quiet on stdout."""
    opened = [index for index in bases if index is not None]
    opened += [faiss.read_index(str(path), faiss.IO_FLAG_MMAP) for path in shards]
    ivf = faiss.extract_index_ivf(empty)
    merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(folder / IVFDATA_FILE))
    pointers = faiss.InvertedListsPtrVector()
    for index in opened:
        pointers.push_back(faiss.extract_index_ivf(index).invlists)
    with c_stdout_silenced():
        merge = getattr(merged, "merge_from_multiple", None) or merged.merge_from  # named merge_from before faiss 1.9
        total = merge(pointers.data(), pointers.size(), False)
    merged.filename = str(final_folder.resolve() / IVFDATA_FILE)  # where the list file will be read from
    ivf.ntotal = empty.ntotal = total
    ivf.replace_invlists(merged, True)
    merged.this.disown()
    faiss.write_index(empty, str(folder / INDEX_FILE))
    del opened


def read_ann(folder: Path, params: IndexParams, recorded_lists: str | None) -> faiss.Index | None:
    """The version's faiss index, lists and vectors memory-mapped where faiss allows; None for flat."""
    path = folder / INDEX_FILE
    if params.kind == "flat" and not path.exists():
        return None
    if params.kind in ("ivf", "ivfpq"):
        lists = folder / IVFDATA_FILE
        here = recorded_lists is not None and os.path.exists(recorded_lists) and os.path.samefile(recorded_lists, lists)
        if here:
            index = faiss.read_index(str(path), faiss.IO_FLAG_READ_ONLY)
        else:  # the folder was moved or copied: point the list file at this folder
            with c_stdout_silenced():
                index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = params.nprobe or IVF_NPROBE_MIN
        # faiss starts 32 threads per search to prefetch lists; on memory-mapped lists that costs 10x the search
        faiss.downcast_InvertedLists(ivf.invlists).prefetch_nthread = 0
        return index
    # hnsw: its vectors stay on disk, memory-mapped (faiss >= 1.10; older versions load them)
    flags = getattr(faiss, "IO_FLAG_MMAP_IFC", 0) | faiss.IO_FLAG_READ_ONLY if params.kind == "hnsw" else 0
    index = faiss.read_index(str(path), flags)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = params.ef_search or max(index.hnsw.efSearch, HNSW_EF_SEARCH)
    return index


class NpyAppender:
    """A ``.npy`` matrix of float32 rows that grows as chunks are appended; its header is rewritten with the
    final row count on :meth:`close` (numpy pads headers so the row count can grow in place).

    ``resume``: append to an existing such file (a copy of a previous version's vectors).
    """

    def __init__(self, path: Path, dim: int, *, resume: bool = False) -> None:
        self.path, self.dim, self.rows = path, dim, 0
        self._fh: BinaryIO = open(path, "r+b" if resume else "wb")  # noqa: SIM115 - closed by close()
        if resume:
            np.lib.format.read_magic(self._fh)
            shape, _, dtype = np.lib.format.read_array_header_1_0(self._fh)
            if dtype != np.dtype("<f4") or shape[1:] != (dim,):
                raise ValueError(f"{path}: expected float32 rows of {dim}, found {dtype} {shape}")
            self.rows, self._data_offset = shape[0], self._fh.tell()
            self._fh.seek(0, os.SEEK_END)
        else:
            self._data_offset = self._header(0)

    def _header(self, rows: int) -> int:
        self._fh.seek(0)
        np.lib.format.write_array_header_1_0(self._fh, {"descr": "<f4", "fortran_order": False, "shape": (rows, self.dim)})
        return self._fh.tell()

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype="<f4").reshape(-1, self.dim)
        self._fh.write(rows.tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        """Write the final header and flush to disk (again: nothing)."""
        if self._fh.closed:
            return
        end = self._fh.tell()
        if self._header(self.rows) != self._data_offset:
            raise RuntimeError(f"{self.path}: the .npy header changed size")
        self._fh.seek(end)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()


# --- geography -----------------------------------------------------------------------------------------------


def geo_kmeans(lat: np.ndarray, lon: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cluster coordinates on the sphere: (cluster id per point, centroids as (k, 2) lat/lon).

    ``k`` is capped at a tenth of the points, so clusters stay submaps rather than single photos.
    """
    xyz = unit_vectors(lat, lon).astype(np.float32)
    k = max(1, min(k, len(xyz) // MIN_CLUSTER_SIZE))
    kmeans = faiss.Kmeans(3, k, niter=25, seed=seed, verbose=False, spherical=True, min_points_per_centroid=1)
    kmeans.train(xyz)
    _, assignment = kmeans.index.search(xyz, 1)
    c_lat, c_lon = from_unit_vectors(np.asarray(kmeans.centroids, dtype=np.float64))
    return assignment[:, 0].astype(np.int32), np.stack([c_lat, c_lon], axis=1)


def nearest_centroid(lat: np.ndarray, lon: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The geographic cluster of each coordinate: its nearest centroid (for rows appended to an index)."""
    centres = unit_vectors(centroids[:, 0], centroids[:, 1])
    return np.argmax(unit_vectors(lat, lon) @ centres.T, axis=1).astype(np.int32)


# --- search --------------------------------------------------------------------------------------------------


@dataclass
class VectorTable:
    """Vectors with a coordinate, country and cluster each, searchable whole or restricted to a submap."""

    vectors: np.ndarray  # (n, d) float32, L2-normalised; memory-mapped for a reference index
    index: faiss.Index | None  # None: exact search over ``vectors``
    lat: np.ndarray
    lon: np.ndarray
    country: np.ndarray  # ISO alpha-2 per row ("" unknown)
    cluster: np.ndarray  # geographic k-means cluster per row
    centroids: np.ndarray  # (k, 2) lat/lon
    rerank: int = 0  # > 0: the index is approximate in its scores too (PQ); re-score this many exactly

    def __len__(self) -> int:
        return len(self.vectors)

    def submap(self, countries: set[str] | None = None, clusters: set[int] | None = None) -> np.ndarray | None:
        """Rows inside the given countries and/or clusters (None: no restriction)."""
        if not countries and not clusters:
            return None
        mask = np.ones(len(self), dtype=bool)
        if countries:
            mask &= np.isin(self.country, sorted(c.upper() for c in countries))
        if clusters:
            mask &= np.isin(self.cluster, sorted(clusters))
        return np.flatnonzero(mask)

    def search(self, query: np.ndarray, k: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (row ids, cosine scores) for one query vector, optionally among ``rows`` only.

        A submap is searched exactly over its own vectors: no rebuild, and no recall loss from
        approximate indexes under selective filters.
        """
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if rows is not None:
            return self._exact_among(query[0], k, rows)
        ids, scores = self.search_many(query, k)
        keep = ids[0] >= 0
        return ids[0][keep], scores[0][keep]

    def search_many(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (row ids, scores), shape (len(queries), k), over the whole table; -1 pads missing hits."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.vectors.shape[1])
        k = min(k, len(self))
        if self.index is None:
            scores, ids = faiss.knn(queries, self.vectors, k, faiss.METRIC_INNER_PRODUCT)
            return ids.astype(np.int64), scores
        if not self.rerank:
            scores, ids = self.index.search(queries, k)
            return ids.astype(np.int64), scores
        _, shortlist = self.index.search(queries, min(len(self), max(self.rerank, 2 * k)))
        out_ids, out_scores = np.full((len(queries), k), -1, dtype=np.int64), np.full((len(queries), k), -np.inf, dtype=np.float32)
        for i, (query, candidates) in enumerate(zip(queries, shortlist)):
            found, sims = self._exact_among(query, k, np.unique(candidates[candidates >= 0]))
            out_ids[i, : len(found)], out_scores[i, : len(found)] = found, sims
        return out_ids, out_scores

    def _exact_among(self, query: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among ``rows``, reading their vectors a chunk at a time; ties keep ``rows`` order."""
        best_pos, best_sims = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        for start in range(0, len(rows), SCORE_CHUNK_ROWS):
            sims = np.asarray(self.vectors[rows[start : start + SCORE_CHUNK_ROWS]] @ query, dtype=np.float32)
            pos = np.concatenate([best_pos, np.arange(start, start + len(sims))])
            sims = np.concatenate([best_sims, sims])
            top = np.lexsort((pos, -sims))[:k]
            best_pos, best_sims = pos[top], sims[top]
        return rows[best_pos].astype(np.int64), best_sims

    def clusters_in(self, countries: set[str]) -> set[int]:
        """The geographic clusters holding rows of the given countries (vectorised: millions of rows)."""
        inside = np.isin(self.country, sorted(c.upper() for c in countries))
        return {int(c) for c in np.unique(np.asarray(self.cluster)[inside])}

    def nearest_clusters(self, lat: float, lon: float, n: int = 1) -> list[int]:
        """The ``n`` clusters whose centroids lie nearest a coordinate."""
        xyz = unit_vectors(np.array([lat]), np.array([lon]))[0]
        sims = unit_vectors(self.centroids[:, 0], self.centroids[:, 1]) @ xyz
        return [int(i) for i in np.argsort(-sims)[:n]]
