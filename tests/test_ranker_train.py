"""GeoRanker training: the multi-order Plackett-Luce losses against a brute-force reference, and (below) the
training loop on a tiny random Qwen2-VL and `geoagent ranker train` on the test world."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from geoagent.ranker.losses import first_order_loss, georanker_loss, second_order_loss

# --- the losses -------------------------------------------------------------------------------------------


def pl_probability(scores: list[float], order: tuple[int, ...]) -> float:
    """The Plackett-Luce probability of picking ``order`` (a full ranking), straight from its definition."""
    remaining, p = list(range(len(scores))), 1.0
    for pick in order:
        p *= math.exp(scores[pick]) / sum(math.exp(scores[j]) for j in remaining)
        remaining.remove(pick)
    return p


def prefix_probability(scores: list[float], prefix: tuple[int, ...]) -> float:
    """P(the first picks are ``prefix``), by summing the probability of every full ranking that starts so."""
    return sum(pl_probability(scores, order) for order in itertools.permutations(range(len(scores))) if order[: len(prefix)] == prefix)


def brute_first(rewards: list[float], distances: list[float], top: int | None) -> float:
    order = tuple(sorted(range(len(rewards)), key=lambda i: distances[i]))
    picks = min(top or len(order), len(order))
    return -math.log(prefix_probability(rewards, order[:picks])) / picks


def brute_second(rewards: list[float], distances: list[float], top: int | None) -> float:
    order = sorted(range(len(rewards)), key=lambda i: distances[i])
    pairs = [(a, b) for rank, a in enumerate(order) for b in order[rank + 1 :] if top is None or rank < top]
    deltas = [rewards[a] - rewards[b] for a, b in pairs]
    ranking = tuple(sorted(range(len(pairs)), key=lambda p: distances[pairs[p][0]] - distances[pairs[p][1]]))
    return -math.log(prefix_probability(deltas, ranking)) / len(pairs)


def ragged_batch(sizes: tuple[int, ...], seed: int) -> tuple[list[list[float]], list[list[float]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries with ``sizes`` candidates (random rewards, distinct distances), padded with garbage to one tensor."""
    rng = torch.Generator().manual_seed(seed)
    width = max(sizes)
    rewards = torch.full((len(sizes), width), 1e4)  # padding: values that would dominate any sum they entered
    distances = torch.full((len(sizes), width), -5.0)  # and that would rank first if they were ranked
    mask = torch.zeros(len(sizes), width, dtype=torch.bool)
    rows_r, rows_d = [], []
    for row, n in enumerate(sizes):
        r = (torch.randn(n, generator=rng) * 2).tolist()
        d = (torch.randperm(50, generator=rng)[:n].double() * 37.5).tolist()
        rewards[row, :n], distances[row, :n], mask[row, :n] = torch.tensor(r), torch.tensor(d), True
        rows_r.append(r)
        rows_d.append(d)
    return rows_r, rows_d, rewards, distances, mask


def test_the_brute_force_reference_is_a_distribution() -> None:
    """The reference itself: Plackett-Luce probabilities of all rankings of four items sum to one."""
    scores = [0.3, -1.2, 2.0, 0.7]
    assert sum(pl_probability(scores, order) for order in itertools.permutations(range(4))) == pytest.approx(1.0)


@pytest.mark.parametrize("top", [None, 1, 2])
def test_losses_match_the_enumerated_plackett_luce_probability_on_a_ragged_batch(top: int | None) -> None:
    """Batched over queries of 1 to 4 candidates with garbage padding, each loss equals the mean over queries of
    minus the (per-pick) log-probability enumerated by brute force; a one-candidate query has no pair."""
    sizes = (4, 2, 3, 1, 4)
    rows_r, rows_d, rewards, distances, mask = ragged_batch(sizes, seed=3)
    first = [brute_first(r, d, top) for r, d in zip(rows_r, rows_d)]
    second = [brute_second(r, d, top) for r, d in zip(rows_r, rows_d) if len(r) > 1]
    assert first_order_loss(rewards, distances, mask, top).item() == pytest.approx(sum(first) / len(first), rel=1e-5)
    assert second_order_loss(rewards, distances, mask, top).item() == pytest.approx(sum(second) / len(second), rel=1e-5)
    total = georanker_loss(rewards, distances, mask, lambda1=0.3, top=top).item()
    assert total == pytest.approx(0.3 * sum(first) / len(first) + 0.7 * sum(second) / len(second), rel=1e-5)


def test_padding_gets_no_gradient_and_extreme_rewards_stay_finite() -> None:
    """Rewards in the thousands (exp would overflow) give a finite loss and finite gradients, none into padding."""
    _, _, rewards, distances, mask = ragged_batch((4, 2, 3), seed=5)
    rewards = torch.where(mask, rewards * 2000, rewards).requires_grad_()
    loss = georanker_loss(rewards, distances, mask, top=None)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(rewards.grad).all()
    assert (rewards.grad[~mask] == 0).all() and (rewards.grad[mask] != 0).any()


@pytest.mark.parametrize("loss", [first_order_loss, second_order_loss, georanker_loss], ids=lambda f: f.__name__)
@pytest.mark.parametrize("top", [None, 1])
def test_rewards_in_distance_order_lose_less_than_reversed(loss, top: int | None) -> None:
    """Rewards falling with distance (the nearest candidate best) give a lower loss than the same rewards
    reversed, in bfloat16 too (the loss works in float32 whatever the rewards' dtype)."""
    distances = torch.tensor([[10.0, 250.0, 900.0, 2500.0, 7000.0]])
    ordered = torch.tensor([[3.0, 1.5, 0.0, -1.0, -2.5]])
    reversed_ = ordered.flip(1)
    for dtype in (torch.float32, torch.bfloat16):
        assert loss(ordered.to(dtype), distances, top=top) < loss(reversed_.to(dtype), distances, top=top)


def test_bad_shapes_and_weights_are_refused() -> None:
    """Mismatched shapes, a lambda1 outside [0, 1] and top < 1 are errors, not silent broadcasts."""
    with pytest.raises(ValueError, match="rewards and distances"):
        first_order_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="lambda1"):
        georanker_loss(torch.zeros(2, 3), torch.zeros(2, 3), lambda1=1.5)
    with pytest.raises(ValueError, match="top"):
        second_order_loss(torch.zeros(2, 3), torch.zeros(2, 3), top=0)
