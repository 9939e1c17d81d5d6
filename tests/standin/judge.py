"""How the stand-in decides answers: from the markers in the images it is shown and the schema it is asked for."""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from geoagent.images import COMPOSITE_LABEL_HEIGHT, COMPOSITE_PAD
from standin.markers import read_marker
from standin.server import SeenRequest


def marker_judge(seen: SeenRequest) -> dict[str, Any]:
    """Answers the test schemas: ``code`` (the first image's marker) and ``codes`` (every image's, in order)."""
    properties = seen.schema.get("properties", {})
    codes = [read_marker(image) for image in seen.images]
    if "codes" in properties:
        return {"codes": [c if c is not None else -1 for c in codes]}
    if "code" in properties:
        return {"code": codes[0] if codes and codes[0] is not None else -1}
    raise ValueError(f"the marker judge cannot answer schema {seen.schema_name!r}")


@dataclass
class Knobs:
    """How good the simulated VLM is. Defaults follow the research this product rests on."""

    # Pairwise (and set-wise) judgement: see WorldJudge._nearest_choice.
    pairwise_accuracy: float = 0.95  # the ceiling: picks the nearer of two clearly different candidates this often (when unbiased)
    first_position_bias: float = 0.05  # answers the first shown option ("A") regardless this often
    # The next three are assumptions, not measured on a real model: errors concentrate on near-equal choices and
    # repeat when the order is swapped. tests/test_judge.py and docs/reference/simulation.md show what they imply.
    near_equal_km: float = 25.0  # distances are judged as (d + this): within a city's scale (acc@25km) places look alike
    distance_sharpness: float = 3.0  # odds of picking the nearer of two = ((d_far + 25) / (d_near + 25)) ** this
    shared_belief: float = 0.5  # this share of option sets is answered from one belief in every order (errors repeat)
    pointwise_noise: float = 1.5  # per-candidate noise on a 0-10 score
    pointwise_calibration: float = 4.0  # per-query offset: scores are monotone in distance, badly calibrated
    prior_accuracy: float = 0.8  # the prior's top country is the true one this often
    reasoning_error_km: float = 150.0  # scale of a reasoning guess's error
    seed: int = 0


_CANDIDATE = re.compile(r"^Candidate(?: ([A-Z]))?:\s*(.*)$", re.MULTILINE)
_SLOT = re.compile(r"\((?:image|panel) (\d+)\)")
_COORDS = re.compile(r"\((-?\d+(?:\.\d+)?), (-?\d+(?:\.\d+)?)\)")


def split_panels(image: Image.Image) -> list[Image.Image]:
    """The panels of a composite (query | A | B, labelled underneath), or the image itself."""
    width, height = image.size
    side = height - COMPOSITE_LABEL_HEIGHT
    strip = np.asarray(image.convert("RGB"), dtype=np.float32)[side + 2 :, :, :]
    if side <= 0 or width % side or not strip.size or np.abs(strip - COMPOSITE_PAD).max(axis=2).mean() > 40:
        return [image]
    panels = []
    for i in range(width // side):
        box = np.asarray(image.crop((i * side, 0, (i + 1) * side, side)).convert("RGB"), dtype=np.float32)
        content = np.abs(box - COMPOSITE_PAD).max(axis=2) > 24
        rows, cols = np.flatnonzero(content.mean(axis=1) > 0.5), np.flatnonzero(content.mean(axis=0) > 0.5)
        if len(rows) and len(cols):
            panels.append(Image.fromarray(box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.uint8)))
    return panels


def panel_markers(image: Image.Image) -> list[int | None]:
    """The marker of each panel of ``image``, read once per decoded image (the server decodes the same bytes
    once, so a photo asked about again is not read again); kept on the image itself."""
    markers: list[int | None] | None = getattr(image, "_standin_markers", None)
    if markers is None:
        markers = [read_marker(panel) for panel in split_panels(image)]
        image._standin_markers = markers  # type: ignore[attr-defined]
    return markers


class WorldJudge:
    """Answers geolocation questions about a synthetic world, knowing where each marker was taken."""

    def __init__(self, truth: dict[int, tuple[float, float, str]], knobs: Knobs | None = None) -> None:
        self.truth = truth
        self.knobs = knobs or Knobs()
        self.countries = sorted({country for _, _, country in truth.values()})

    def __call__(self, seen: SeenRequest) -> dict[str, Any]:
        properties = seen.schema.get("properties", {})
        if "code" in properties or "codes" in properties:
            return marker_judge(seen)
        if seen.truncated:  # the question lost its start (the query photo first): a real model guesses
            return self._guess(seen, properties)
        markers = [marker for image in seen.images for marker in panel_markers(image)]
        if not markers or markers[0] not in self.truth:
            raise ValueError(f"no known marker on the query image (read {markers[:1]})")
        lat, lon, country = self.truth[markers[0]]  # type: ignore[index]
        digest = hashlib.sha256(f"{self.knobs.seed}|{_words(seen.prompt)}|{markers}|{seen.options.get('seed')}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        if "countries" in properties:
            return self._prior(country, rng)
        if "clues" in properties:
            return self._reasoning(lat, lon, country, rng)
        candidates = {slot or "X": self._locate(detail, markers) for slot, detail in _CANDIDATE.findall(seen.prompt)}
        if "choice" in properties and len(candidates) > 2:  # a set-wise question: which of these is nearest
            letters = list(candidates)
            index = self._nearest_choice(lat, lon, [candidates[letter] for letter in letters], rng, markers[0])  # type: ignore[arg-type]
            return {"reasoning": "stand-in set-wise choice", "choice": letters[index]}
        if "choice" in properties:
            return self._pairwise(lat, lon, candidates["A"], candidates["B"], rng, markers[0])  # type: ignore[arg-type]
        if "score" in properties:
            query_rng = random.Random(markers[0] * 7919 + self.knobs.seed)
            offset = query_rng.uniform(-self.knobs.pointwise_calibration, self.knobs.pointwise_calibration)
            distance = _km(lat, lon, *candidates["X"])
            # Coarse: 50 km apart scores about the same as the right place, so noise and offsets decide.
            score = 10 - 2.5 * math.log10(1 + distance / 100) + offset + rng.gauss(0, self.knobs.pointwise_noise)
            return {"reasoning": "stand-in score", "score": int(min(10, max(0, round(score))))}
        raise ValueError(f"cannot answer schema {seen.schema_name!r}")

    def _guess(self, seen: SeenRequest, properties: dict[str, Any]) -> dict[str, Any]:
        """A plausible answer that ignores what was cut away: a seeded coin flip, a random place."""
        digest = hashlib.sha256(f"guess|{self.knobs.seed}|{_words(seen.prompt)}|{seen.options.get('seed')}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        if "choice" in properties:
            return {"reasoning": "stand-in guess", "choice": rng.choice("AB")}
        if "score" in properties:
            return {"reasoning": "stand-in guess", "score": rng.randint(0, 10)}
        country = rng.choice(self.countries)
        if "countries" in properties:
            return {"countries": [{"code": country, "probability": 0.5}]}
        if "clues" in properties:
            lat, lon = rng.uniform(-60, 70), rng.uniform(-180, 180)
            return {"clues": ["stand-in guess"], "country": country, "latitude": lat, "longitude": lon, "confidence": 0.1}
        raise ValueError(f"cannot answer schema {seen.schema_name!r}")

    def _locate(self, detail: str, markers: list[int | None]) -> tuple[float, float]:
        slot = _SLOT.search(detail)
        if slot and int(slot.group(1)) <= len(markers) and markers[int(slot.group(1)) - 1] in self.truth:
            lat, lon, _ = self.truth[markers[int(slot.group(1)) - 1]]  # type: ignore[index]
            return lat, lon
        coords = _COORDS.search(detail)
        if coords is None:
            raise ValueError(f"cannot tell where candidate {detail!r} is")
        return float(coords.group(1)), float(coords.group(2))

    def _pairwise(self, lat: float, lon: float, a: tuple[float, float], b: tuple[float, float], rng: random.Random, query_marker: int) -> dict[str, Any]:
        choice = self._nearest_choice(lat, lon, [a, b], rng, query_marker)
        return {"reasoning": "stand-in comparison", "choice": "AB"[choice]}

    def _nearest_choice(self, lat: float, lon: float, options: list[tuple[float, float]], rng: random.Random, query_marker: int) -> int:
        """Which of ``options`` (index 0 shown first) the simulated VLM says lies nearest (lat, lon).

        An honest error model, like real VLMs judging pairs or sets:

        - *position bias*: with probability ``first_position_bias`` it answers index 0, whatever is shown;
        - *hard sets are hard*: otherwise each option's appeal is ``-distance_sharpness * ln(d + near_equal_km)``
          plus Gumbel noise and the most appealing wins (a Luce choice): of two options P(nearer) =
          sigmoid(distance_sharpness * ln((d_far + near_equal_km) / (d_near + near_equal_km))), 0.5 for equal
          distances; and with probability ``2 (1 - pairwise_accuracy)`` the model lapses and picks uniformly, so
          a clearly different pair is judged right ``pairwise_accuracy`` of the time (the ceiling);
        - *errors repeat*: for a share ``shared_belief`` of option sets the noise and the lapse come from one
          belief seeded by the query and the UNORDERED set of options, so asking again in another order gives
          the same option (and the same error); the rest draw fresh noise from ``rng`` (this ask's).
        """
        knobs = self.knobs
        if rng.random() < knobs.first_position_bias:
            return 0
        canonical = sorted(set(options))
        digest = hashlib.sha256(f"belief|{knobs.seed}|{query_marker}|{canonical}".encode()).digest()
        belief = random.Random(int.from_bytes(digest[:8], "big"))
        noise = belief if belief.random() < knobs.shared_belief else rng
        lapse = min(1.0, max(0.0, 2 * (1 - knobs.pairwise_accuracy)))
        if noise.random() < lapse:
            return options.index(canonical[noise.randrange(len(canonical))])
        appeal = {}
        for option in canonical:  # drawn in canonical order: one belief gives each option the same noise in any order
            gumbel = -math.log(max(-math.log(1.0 - noise.random()), 1e-300))
            appeal[option] = -knobs.distance_sharpness * math.log(_km(lat, lon, *option) + knobs.near_equal_km + 1e-9) + gumbel
        return max(range(len(options)), key=lambda i: appeal[options[i]])

    def _prior(self, country: str, rng: random.Random) -> dict[str, Any]:
        others = [c for c in self.countries if c != country] or ["ZZ"]
        other = rng.choice(others)
        first, second = (country, other) if rng.random() < self.knobs.prior_accuracy else (other, country)
        return {"countries": [{"code": first, "probability": 0.7}, {"code": second, "probability": 0.2}]}

    def _reasoning(self, lat: float, lon: float, country: str, rng: random.Random) -> dict[str, Any]:
        km, bearing = abs(rng.gauss(0, self.knobs.reasoning_error_km)), rng.uniform(0, 2 * math.pi)
        g_lat = max(-89.9, min(89.9, lat + km / 111.2 * math.cos(bearing)))
        g_lon = ((lon + km / (111.2 * max(math.cos(math.radians(lat)), 0.05)) * math.sin(bearing) + 180) % 360) - 180
        return {"clues": ["stand-in: the marker says so"], "country": country, "latitude": g_lat, "longitude": g_lon, "confidence": 0.6}


def _words(prompt: str) -> str:
    """The prompt's words, whitespace collapsed: a model reads the same words the same way whether a protocol
    sent them as separate messages or parts (joined by newlines) or one flattened text (litellm's Ollama route)."""
    return " ".join(prompt.split())


def _km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(min(1.0, a)))
