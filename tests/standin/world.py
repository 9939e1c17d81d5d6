"""A synthetic geotagged world for end-to-end runs: reference photos, look-alike decoys nearby, and queries.

Every picture carries a marker, so the stand-in server knows where each image it is shown was taken.
Each place has a decoy 20-80 km away whose photo is another view of a similar scene, so retrieval often
ranks the decoy first: the situation in which a VLM's pairwise judgement earns its keep.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geoagent.eval.synthetic import perturb, save_with_gps, scene
from standin.markers import draw_marker

#: Countries of the world and roughly where they are.
COUNTRIES = {
    "FR": (46.6, 2.4), "JP": (36.2, 138.3), "BR": (-10.8, -52.9), "US": (39.8, -98.6),
    "KE": (0.2, 37.9), "AU": (-25.7, 134.5), "IN": (22.9, 79.6), "NO": (61.4, 8.8),
}  # fmt: skip


@dataclass(frozen=True)
class Spot:
    marker: int
    lat: float
    lon: float
    country: str
    path: Path
    ref: str = ""  # for queries: the id (CSV path) of the true reference


@dataclass
class World:
    root: Path
    references: list[Spot] = field(default_factory=list)
    queries: list[Spot] = field(default_factory=list)

    @property
    def truth(self) -> dict[int, tuple[float, float, str]]:
        """Marker -> (lat, lon, country), what the stand-in judge knows."""
        return {s.marker: (s.lat, s.lon, s.country) for s in self.references + self.queries}

    @property
    def references_csv(self) -> Path:
        return self.root / "references.csv"

    @property
    def queries_csv(self) -> Path:
        return self.root / "queries.csv"


def _offset(lat: float, lon: float, km: float, bearing: float) -> tuple[float, float]:
    dlat = km / 111.2 * math.cos(bearing)
    dlon = km / (111.2 * max(math.cos(math.radians(lat)), 0.05)) * math.sin(bearing)
    return lat + dlat, ((lon + dlon + 180) % 360) - 180


def build_world(root: Path, places_per_country: int = 6, countries: int = 8, seed: int = 0, decoy_strength: int = 1) -> World:
    """Write reference photos, decoys and queries as geotagged JPEGs, plus references.csv and queries.csv."""
    rng = np.random.default_rng(seed)
    world = World(root)
    marker = 1
    for c_index, (code, (c_lat, c_lon)) in enumerate(list(COUNTRIES.items())[:countries]):
        for p in range(places_per_country):
            scene_seed = seed * 100_000 + c_index * 1000 + p
            lat, lon = _offset(c_lat, c_lon, float(rng.uniform(0, 400)), float(rng.uniform(0, 2 * math.pi)))
            d_lat, d_lon = _offset(lat, lon, float(rng.uniform(20, 80)), float(rng.uniform(0, 2 * math.pi)))
            original = scene(scene_seed, palette_seed=c_index)
            decoy = original
            for k in range(decoy_strength):
                decoy = perturb(decoy, scene_seed * 7 + k + 1)
            for image, (s_lat, s_lon), kind in ((original, (lat, lon), "ref"), (decoy, (d_lat, d_lon), "decoy")):
                path = root / "references" / code / f"{kind}{p:03d}.jpg"
                save_with_gps(draw_marker(image, marker), path, s_lat, s_lon, quality=92)
                world.references.append(Spot(marker, s_lat, s_lon, code, path))
                marker += 1
            query_path = root / "queries" / f"{code}-{p:03d}.jpg"
            save_with_gps(draw_marker(perturb(original, scene_seed * 7 + 99), marker), query_path, lat, lon, quality=92)
            world.queries.append(Spot(marker, lat, lon, code, query_path, ref=f"references/{code}/ref{p:03d}.jpg"))
            marker += 1
    _write_csv(world.references_csv, world.references, root)
    _write_csv(world.queries_csv, world.queries, root, with_ref=True)
    return world


def _write_csv(path: Path, spots: list[Spot], root: Path, with_ref: bool = False) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "lat", "lon", "country"] + (["ref_id"] if with_ref else []))
        for s in spots:
            writer.writerow([s.path.relative_to(root).as_posix(), f"{s.lat:.6f}", f"{s.lon:.6f}", s.country] + ([s.ref] if with_ref else []))
