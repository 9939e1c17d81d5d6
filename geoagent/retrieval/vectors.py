"""Geotagged vectors in faiss: build (Flat, HNSW, IVF), geographic k-means submaps, filtered search.

Shared by the reference-photo index and the gazetteer, which differ only in where vectors come from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

from geoagent.geo import from_unit_vectors, unit_vectors

IndexType = Literal["flat", "hnsw", "ivf"]
INDEX_TYPES: tuple[IndexType, ...] = ("flat", "hnsw", "ivf")
HNSW_NEIGHBOURS = 32  # graph degree M; 32 is faiss's recommendation for recall near 0.99
HNSW_EF_SEARCH = 128
IVF_NPROBE = 16
MIN_CLUSTER_SIZE = 10  # average points per geographic cluster, at least


def build_faiss(vectors: np.ndarray, index_type: IndexType) -> faiss.Index:
    """Inner product on L2-normalised vectors (cosine similarity)."""
    n, dim = vectors.shape
    if index_type == "flat" or n < 1000:  # tiny sets: exact search is both faster and exact
        index: faiss.Index = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = HNSW_EF_SEARCH
    elif index_type == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants ~39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(IVF_NPROBE, nlist)
    else:
        raise ValueError(f"unknown index type {index_type!r}")
    index.add(vectors)
    return index


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


@dataclass
class VectorTable:
    """Vectors with a coordinate, country and cluster each, searchable whole or restricted to a submap."""

    vectors: np.ndarray  # (n, d) float32, L2-normalised
    index: faiss.Index
    lat: np.ndarray
    lon: np.ndarray
    country: np.ndarray  # ISO alpha-2 per row ("" unknown)
    cluster: np.ndarray  # geographic k-means cluster per row
    centroids: np.ndarray  # (k, 2) lat/lon

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
        if rows is None:
            scores, ids = self.index.search(query, min(k, len(self)))
            keep = ids[0] >= 0
            return ids[0][keep].astype(np.int64), scores[0][keep]
        if len(rows) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        sims = self.vectors[rows] @ query[0]
        top = np.argsort(-sims, kind="stable")[:k]
        return rows[top].astype(np.int64), sims[top]

    def nearest_clusters(self, lat: float, lon: float, n: int = 1) -> list[int]:
        """The ``n`` clusters whose centroids lie nearest a coordinate."""
        xyz = unit_vectors(np.array([lat]), np.array([lon]))[0]
        sims = unit_vectors(self.centroids[:, 0], self.centroids[:, 1]) @ xyz
        return [int(i) for i in np.argsort(-sims)[:n]]
