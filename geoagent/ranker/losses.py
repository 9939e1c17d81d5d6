"""GeoRanker's multi-order distance losses: Plackett-Luce over rewards, and over pairwise reward differences.

A batch holds ``B`` queries with up to ``G`` candidates each: ``rewards`` and ``distances`` (km to the truth) are
``(B, G)``, and ``mask`` marks the real candidates when queries have fewer (padding may hold anything).

- First order: the candidates, ordered by increasing distance, are a Plackett-Luce ranking of the rewards; the loss
  is minus the mean log-probability of the first ``top`` picks of that ranking.
- Second order: every pair ``(i, j)`` with ``i`` nearer than ``j`` gets the reward difference ``r_i - r_j``; the
  pairs, ordered by their distance differences ``d_i - d_j`` (most negative first: the pair whose gap is largest
  should have the largest reward gap), are a Plackett-Luce ranking of those differences. With ``top``, only pairs
  whose nearer member is among the ``top`` nearest take part.
- Total: ``lambda1 * first + (1 - lambda1) * second``.

Each loss is averaged over a query's counted terms, then over queries that have any (a query with a single
candidate has no pair). Computed in float32 with ``logcumsumexp``, so large rewards neither overflow nor lose the
small differences that matter; gradients into padding are zero.
"""

from __future__ import annotations

import torch

from geoagent.ranker import recipe


def _check(rewards: torch.Tensor, distances: torch.Tensor, mask: torch.Tensor | None, top: int | None) -> torch.Tensor:
    """The mask as bool ``(B, G)`` (all True when none is given), after checking the shapes and ``top``."""
    if rewards.dim() != 2 or rewards.shape != distances.shape:
        raise ValueError(f"rewards and distances must both be (queries, candidates); got {tuple(rewards.shape)} and {tuple(distances.shape)}")
    if top is not None and top < 1:
        raise ValueError(f"top must be at least 1 (or None for every pick); got {top}")
    if mask is None:
        return torch.ones_like(rewards, dtype=torch.bool)
    if mask.shape != rewards.shape:
        raise ValueError(f"mask must be {tuple(rewards.shape)}; got {tuple(mask.shape)}")
    return mask.to(torch.bool)


def _plackett_luce_nll(scores: torch.Tensor, keys: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Mean over rows of minus the mean log-probability of the counted picks, when items are ranked by ``keys``
    ascending (ties keep their order); ``counted`` is indexed in that ranked order and must be False past the
    row's real items, which must carry ``keys = +inf`` (so they rank last) and are left out of every denominator."""
    real = torch.isfinite(keys)
    order = torch.sort(torch.where(real, keys, torch.inf), dim=1, stable=True).indices
    ranked = torch.gather(scores, 1, order)
    real = torch.gather(real, 1, order)
    # A finite stand-in for -inf: it adds nothing to a log-sum-exp, and unlike -inf its gradient is not NaN.
    ranked = torch.where(real, ranked, torch.finfo(ranked.dtype).min)
    rest = torch.flip(torch.logcumsumexp(torch.flip(ranked, [1]), dim=1), [1])  # log sum_{j >= i} exp(s_j)
    counted = counted & real
    log_p = torch.where(counted, ranked - rest, 0.0)
    terms = counted.sum(dim=1)
    rows = terms > 0
    if not bool(rows.any()):
        return scores.sum() * 0.0  # nothing to rank: zero, still attached to the graph
    per_row = -log_p.sum(dim=1)[rows] / terms[rows]
    return per_row.mean()


def _ranked_positions(distances: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's candidate indices sorted by increasing distance (padding last), and the sorted mask."""
    keys = torch.where(mask, distances, torch.inf)
    order = torch.sort(keys, dim=1, stable=True).indices
    return order, torch.gather(mask, 1, order)


def first_order_loss(
    rewards: torch.Tensor, distances: torch.Tensor, mask: torch.Tensor | None = None, top: int | None = recipe.TOP
) -> torch.Tensor:
    """Plackett-Luce loss of the rewards ranked by increasing distance; only the first ``top`` picks count
    (``None``: all of them)."""
    mask = _check(rewards, distances, mask, top)
    rewards, distances = rewards.float(), distances.float()
    positions = torch.arange(rewards.shape[1], device=rewards.device).expand_as(rewards)
    counted = positions < (top if top is not None else rewards.shape[1])
    return _plackett_luce_nll(rewards, torch.where(mask, distances, torch.inf), counted)


def second_order_loss(
    rewards: torch.Tensor, distances: torch.Tensor, mask: torch.Tensor | None = None, top: int | None = recipe.TOP
) -> torch.Tensor:
    """Plackett-Luce loss of the pairwise reward differences ranked by their distance differences; only pairs
    whose nearer candidate is among the ``top`` nearest take part (``None``: every pair)."""
    mask = _check(rewards, distances, mask, top)
    rewards, distances = rewards.float(), distances.float()
    order, ranked_mask = _ranked_positions(distances, mask)
    ranked_rewards = torch.gather(rewards, 1, order)
    ranked_distances = torch.gather(torch.where(mask, distances, 0.0), 1, order)
    near, far = torch.triu_indices(rewards.shape[1], rewards.shape[1], offset=1, device=rewards.device)
    delta_rewards = ranked_rewards[:, near] - ranked_rewards[:, far]
    delta_distances = ranked_distances[:, near] - ranked_distances[:, far]
    pairs = ranked_mask[:, near] & ranked_mask[:, far]
    if top is not None:
        pairs = pairs & (near < top)
    keys = torch.where(pairs, delta_distances, torch.inf)
    return _plackett_luce_nll(delta_rewards, keys, torch.ones_like(pairs))


def georanker_loss(
    rewards: torch.Tensor,
    distances: torch.Tensor,
    mask: torch.Tensor | None = None,
    lambda1: float = recipe.LAMBDA1,
    top: int | None = recipe.TOP,
) -> torch.Tensor:
    """GeoRanker's training loss: ``lambda1 * first_order + (1 - lambda1) * second_order``."""
    if not 0.0 <= lambda1 <= 1.0:
        raise ValueError(f"lambda1 must lie in [0, 1]; got {lambda1}")
    first = first_order_loss(rewards, distances, mask, top)
    second = second_order_loss(rewards, distances, mask, top)
    return lambda1 * first + (1.0 - lambda1) * second
