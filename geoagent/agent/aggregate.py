"""From votes to a ranking: pairwise vote models, then fusion with retrieval, the prior and geography.

Fused score per candidate = w_votes * votes + w_retrieval * retrieval + w_prior * prior
                          + w_proximity * proximity to the reasoning estimate
                          + w_consensus * consensus (support from strong candidates nearby),
each term scaled to [0, 1] within the pool.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from geoagent.geo import distance_matrix_km, haversine_km
from geoagent.types import Candidate, Guess, Match

BT_ITERATIONS = 200
BT_PSEUDO_GAMES = 0.5  # a half game won and lost against a unit-strength opponent anchors the scale


def _outcomes(ids: Sequence[str], matches: Iterable[Match]) -> tuple[np.ndarray, np.ndarray]:
    """(wins[i, j], games[i, j]) with a tie counting half a win each."""
    index = {cid: i for i, cid in enumerate(ids)}
    wins = np.zeros((len(ids), len(ids)))
    games = np.zeros_like(wins)
    for match in matches:
        if match.votes and all(vote is None for vote in match.votes):
            continue  # every ask failed: the match says nothing (the tournament settled it on evidence)
        i, j = index[match.a], index[match.b]
        games[i, j] += 1
        games[j, i] += 1
        if match.winner is None:
            wins[i, j] += 0.5
            wins[j, i] += 0.5
        else:
            w, l_ = (i, j) if match.winner == match.a else (j, i)
            wins[w, l_] += 1
    return wins, games


def _unit(values: np.ndarray) -> np.ndarray:
    span = values.max() - values.min() if len(values) else 0.0
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


NEUTRAL_SHARE = 0.5  # Copeland's share for a candidate with no answered match: neither won nor lost


def copeland(ids: Sequence[str], matches: Iterable[Match]) -> dict[str, float]:
    """Share of matches won (ties half), in [0, 1]. A candidate with no answered match (every ask failed, or
    none was asked) is neutral, as in :func:`bradley_terry`: a half share, not the 0 of losing every match."""
    wins, games = _outcomes(ids, matches)
    played = games.sum(axis=1)
    share = np.divide(wins.sum(axis=1), played, out=np.full(len(ids), NEUTRAL_SHARE), where=played > 0)
    return dict(zip(ids, share.tolist()))


def bradley_terry(ids: Sequence[str], matches: Iterable[Match]) -> dict[str, float]:
    """Bradley-Terry strengths fitted by Hunter's MM algorithm, as log-strengths scaled to [0, 1].

    Unlike win counts, it weighs whom a candidate beat: beating the strong counts more.
    """
    wins, games = _outcomes(ids, matches)
    n = len(ids)
    if n == 0:
        return {}
    strength = np.ones(n)
    total_wins = wins.sum(axis=1) + BT_PSEUDO_GAMES
    for _ in range(BT_ITERATIONS):
        pair_sum = strength[:, None] + strength[None, :]
        denominator = (games / pair_sum).sum(axis=1) + 2 * BT_PSEUDO_GAMES / (strength + 1.0)
        updated = total_wins / denominator
        if np.allclose(updated, strength, rtol=1e-9):
            break
        strength = updated
    return dict(zip(ids, _unit(np.log(strength)).tolist()))


def rank_votes(ordered_ids: Sequence[str]) -> dict[str, float]:
    """Votes from a full order: first 1, last 0."""
    n = len(ordered_ids)
    return {cid: (n - 1 - r) / (n - 1) if n > 1 else 1.0 for r, cid in enumerate(ordered_ids)}


def fuse(
    pool: list[Candidate],
    votes: dict[str, float],
    prior: dict[str, float],
    guess: Guess | None,
    *,
    w_votes: float,
    w_retrieval: float,
    w_prior: float,
    w_proximity: float,
    w_consensus: float,
    bandwidth_km: float,
    proximity_km: float,
) -> tuple[list[Candidate], dict[str, dict[str, float]]]:
    """Rank the pool; returns the candidates sorted (score and rank set) and each one's fusion terms."""
    if not pool:
        return [], {}
    retrieval = np.array([c.retrieval_score if c.retrieval_score is not None else np.nan for c in pool])
    known = ~np.isnan(retrieval)
    retrieval_term = np.zeros(len(pool))
    if known.any():
        retrieval_term[known] = _unit(retrieval[known]) if known.sum() > 1 else 1.0
    top_prior = max(prior.values(), default=0.0)
    prior_term = np.array([prior.get(c.country or "", 0.0) / top_prior if top_prior > 0 else 0.0 for c in pool])
    vote_term = np.array([votes.get(c.id, 0.0) for c in pool])
    lat, lon = np.array([c.lat for c in pool]), np.array([c.lon for c in pool])
    proximity_term = (
        np.exp(-haversine_km(lat, lon, guess.lat, guess.lon) / proximity_km) if guess is not None else np.zeros(len(pool))
    )
    base = w_votes * vote_term + w_retrieval * retrieval_term + w_prior * prior_term + w_proximity * proximity_term
    support = np.clip(base, 0, None)
    kernel = np.exp(-distance_matrix_km(lat, lon) / bandwidth_km)
    np.fill_diagonal(kernel, 0.0)
    total = support.sum() - support
    consensus_term = np.divide(kernel @ support, total, out=np.zeros(len(pool)), where=total > 0)
    score = base + w_consensus * consensus_term

    order = sorted(range(len(pool)), key=lambda i: (-score[i], -retrieval_term[i], i))
    ranked = [pool[i].model_copy(update={"score": round(float(score[i]), 6), "rank": r}) for r, i in enumerate(order, 1)]
    terms = {
        pool[i].id: {
            "votes": round(float(vote_term[i]), 4),
            "retrieval": round(float(retrieval_term[i]), 4),
            "prior": round(float(prior_term[i]), 4),
            "proximity": round(float(proximity_term[i]), 4),
            "consensus": round(float(consensus_term[i]), 4),
        }
        for i in range(len(pool))
    }
    return ranked, terms


CONFIDENCE_TEMPERATURE = 0.3  # fused scores span about 0..2.5; softer than this and every answer looks certain


def confidence(ranked: list[Candidate], bandwidth_km: float, temperature: float = CONFIDENCE_TEMPERATURE) -> float:
    """Share of the pool's softmax score mass lying within ``bandwidth_km`` of the top candidate."""
    if not ranked:
        return 0.0
    scores = np.array([c.score for c in ranked])
    weights = np.exp((scores - scores.max()) / temperature)
    top = ranked[0]
    near = haversine_km(np.array([c.lat for c in ranked]), np.array([c.lon for c in ranked]), top.lat, top.lon) <= bandwidth_km
    return round(float(weights[near].sum() / weights.sum()), 4)
