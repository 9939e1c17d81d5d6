"""Confidence a person can act on: the probability that an answer lies within ``confidence_km`` of the truth.

The agent's own score (the share of the fused score mass near the top candidate) orders answers well but
means nothing as a number. A calibrator maps the evidence the agent already has — that score, the fused
margin between the top two candidates, how many matches the top won, the retrieval similarity, the prior's
mass on the top's country, the agreement of the reasoning guesses, a near-duplicate — to a probability,
fitted on a labelled set by ``geoagent eval --calibrate`` and applied with ``[agent] calibration = "file"``.

The calibrator is a logistic regression (L2-regularised, fitted by Newton's method on standardised
features). Why logistic and not isotonic: it combines several features (isotonic regression calibrates one
score), it has a dozen parameters instead of one step per distinct score, so a labelled set of a hundred or
two photos fits it without memorising, and its output moves smoothly with the evidence. Fitted on the same
kind of photos, profile, index and strategy it is applied to; the file records what it was fitted on, and the
agent warns when the settings differ.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from geoagent.errors import ConfigError
from geoagent.files import write_atomic
from geoagent.geo import haversine_km
from geoagent.types import Candidate, ConfidenceFeatures, Guess, LocateResult

L2 = 1.0  # ridge penalty on the standardised coefficients: a small labelled set must not be memorised
NEWTON_STEPS = 50
ECE_BINS = 10


FEATURE_NAMES = ["score", "margin", "votes", "retrieval", "prior", "reasoning", "near_duplicate"]


def features(
    ranked: Sequence[Candidate], terms: dict[str, dict[str, float]], prior: dict[str, float], guess: Guess | None,
    bandwidth_km: float, score: float, near_duplicate: bool,
) -> ConfidenceFeatures:
    """The features of a fused ranking (``terms`` as aggregate.fuse returns them)."""
    top = ranked[0]
    second = ranked[1].score if len(ranked) > 1 and ranked[1].score is not None else top.score
    own = terms.get(top.id, {})
    agreement = 0.0
    if guess is not None:
        agreement = math.exp(-float(haversine_km(top.lat, top.lon, guess.lat, guess.lon)) / bandwidth_km)
    return ConfidenceFeatures(
        score=score, margin=round(float((top.score or 0.0) - (second or 0.0)), 6), votes=own.get("votes", 0.0),
        retrieval=own.get("retrieval", 0.0), prior=round(prior.get(top.country or "", 0.0), 6),
        reasoning=round(agreement, 6), near_duplicate=near_duplicate,
    )  # fmt: skip


class FittedOn(BaseModel):
    """What a calibrator was fitted on: the labelled set and the settings whose answers it calibrates."""

    dataset: str
    photos: int
    within: int = Field(description="Photos whose answer lay within confidence_km of the truth.")
    profile: str = Field(description="The model that answered the pairwise questions (profile's model name).")
    strategy: str
    index: str | None = Field(description="The reference index folder; None: the gazetteer.")
    fitted_at: str
    geoagent_version: str


class Calibrator(BaseModel):
    """A fitted logistic calibrator: P(error < confidence_km | features)."""

    kind: Literal["logistic"] = "logistic"
    confidence_km: float
    features: list[str] = Field(default_factory=lambda: list(FEATURE_NAMES))
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    fitted_on: FittedOn

    def probability(self, values: ConfidenceFeatures) -> float:
        x = (np.asarray(values.vector()) - np.asarray(self.mean)) / np.asarray(self.scale)
        return round(float(_sigmoid(x @ np.asarray(self.coef) + self.intercept)), 4)

    def save(self, path: Path) -> None:
        write_atomic(path, (self.model_dump_json(indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: Path) -> Calibrator:
        """The calibrator in ``path``; a missing or malformed file is one ConfigError naming it."""
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such calibration file (write one with geoagent eval ... --calibrate {path})") from None
        except (OSError, ValidationError, ValueError) as exc:
            reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            raise ConfigError(f"{path}: not a GeoAgent calibration file ({reason}); refit it with geoagent eval --calibrate") from None

    def mismatch(self, profile: str, strategy: str, index: str | None) -> str | None:
        """Why this calibrator may not fit the current settings, or None."""
        fitted = self.fitted_on
        differences = [f"{name} {old!r} (now {new!r})" for name, old, new in
                       (("model", fitted.profile, profile), ("strategy", fitted.strategy, strategy), ("index", fitted.index, index))
                       if old != new]  # fmt: skip
        return None if not differences else "calibration fitted on another setup: " + ", ".join(differences)


def abstain(result: LocateResult) -> LocateResult:
    """"I don't know": no coordinate, country or place; the best guess stays the first candidate."""
    return result.model_copy(update={"lat": None, "lon": None, "country": None, "place": None, "abstained": True})


def _sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def fit(rows: Sequence[ConfidenceFeatures], hits: Sequence[bool], *, confidence_km: float, fitted_on: FittedOn) -> Calibrator:
    """Logistic regression of ``hits`` on the features, L2-penalised, by Newton's method (IRLS)."""
    if len(rows) < 10:
        raise ConfigError(f"calibration needs at least 10 answered photos, got {len(rows)}")
    x = np.asarray([r.vector() for r in rows], dtype=np.float64)
    y = np.asarray(hits, dtype=np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0  # a constant feature (no near-duplicates in the set) keeps a zero coefficient
    z = np.hstack([np.ones((len(x), 1)), (x - mean) / scale])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], L2)
    penalty[0] = 0.0  # the intercept is not shrunk
    for _ in range(NEWTON_STEPS):
        p = _sigmoid(z @ w)
        gradient = z.T @ (p - y) + penalty * w
        hessian = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return Calibrator(
        confidence_km=confidence_km, mean=mean.round(8).tolist(), scale=scale.round(8).tolist(),
        coef=w[1:].round(8).tolist(), intercept=round(float(w[0]), 8), fitted_on=fitted_on,
    )  # fmt: skip


def expected_calibration_error(confidences: Sequence[float], hits: Sequence[bool], bins: int = ECE_BINS) -> float | None:
    """ECE: the photo-weighted mean |accuracy - mean confidence| over equal-width confidence bins."""
    if not len(confidences):
        return None
    conf, hit = np.asarray(confidences, dtype=np.float64), np.asarray(hits, dtype=np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(hit[inside].mean() - conf[inside].mean())
    return round(float(total) / len(conf), 4)


def reliability(confidences: Sequence[float], hits: Sequence[bool], bins: int = ECE_BINS) -> list[dict[str, float | int]]:
    """The reliability diagram's points: per non-empty bin, its range, photos, mean confidence and accuracy."""
    conf, hit = np.asarray(confidences, dtype=np.float64), np.asarray(hits, dtype=np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            out.append({"low": b / bins, "high": (b + 1) / bins, "photos": int(inside.sum()),
                        "confidence": round(float(conf[inside].mean()), 4), "accuracy": round(float(hit[inside].mean()), 4)})  # fmt: skip
    return out


def coverage_curve(confidences: Sequence[float], hits: Sequence[bool]) -> list[dict[str, float | int]]:
    """Accuracy against coverage: answering only the photos at or above each threshold, most confident first.

    One point per distinct confidence, from answering everything (coverage 1) to the most confident photo alone.
    """
    conf, hit = np.asarray(confidences, dtype=np.float64), np.asarray(hits, dtype=np.float64)
    if not len(conf):
        return []
    order = np.argsort(-conf, kind="stable")
    conf, hit = conf[order], hit[order]
    correct = np.cumsum(hit)
    points = []
    for i in range(len(conf)):
        if i + 1 < len(conf) and conf[i + 1] == conf[i]:
            continue  # a threshold keeps every photo of equal confidence
        points.append({"threshold": round(float(conf[i]), 4), "coverage": round((i + 1) / len(conf), 4),
                       "answered": i + 1, "accuracy": round(float(correct[i] / (i + 1)), 4)})  # fmt: skip
    return points[::-1]


def at_coverage(curve: list[dict[str, float | int]], coverage: float) -> dict[str, float | int] | None:
    """The curve's point with the smallest coverage that is still at least ``coverage``."""
    eligible = [p for p in curve if p["coverage"] >= coverage - 1e-9]
    return min(eligible, key=lambda p: p["coverage"]) if eligible else None


def fitted_on(dataset: str, rows: int, within: int, profile: str, strategy: str, index: str | None) -> FittedOn:
    from geoagent import __version__

    return FittedOn(dataset=dataset, photos=rows, within=within, profile=profile, strategy=strategy, index=index,
                    fitted_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), geoagent_version=__version__)  # fmt: skip
