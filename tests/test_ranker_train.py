"""GeoRanker training: the multi-order Plackett-Luce losses against a brute-force reference, and (below) the
training loop on a tiny random Qwen2-VL and `geoagent ranker train` on the test world."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from geoagent.errors import ConfigError
from geoagent.geo import haversine_km
from geoagent.ranker.losses import first_order_loss, georanker_loss, second_order_loss
from geoagent.ranker.model import RewardModel
from geoagent.ranker.trainer import StepReport, Trainer, TrainOptions, checkpoints, run_training
from geoagent.ranker.training import ExampleBuilder, query_stream, read_queries
from conftest import TINY_CLIP, run_cli

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


# --- the data and the loop, on the test world and a tiny random Qwen2-VL --------------------------------

pytest_plugins = ("engine.fixtures",)

#: Small images keep the tiny model's sequences short (the processor snaps sides to 28-pixel blocks).
MAX_SIDE = 56


@pytest.fixture(scope="module")
def builder(world_retriever) -> ExampleBuilder:
    """Three neighbours and one random negative a query, from the world's index."""
    return ExampleBuilder(world_retriever.source, world_retriever.embedder, k=3, negatives=1, seed=0)


def load_tiny(folder: Path, seed: int = 0) -> Callable[[Path | None], RewardModel]:
    """How a test loads the trainable tiny model: a fresh adapter, or the one in a checkpoint."""
    return lambda adapter: RewardModel.load(folder, adapter, device="cpu", dtype="float32", max_side=MAX_SIDE, trainable=True, seed=seed)


def test_examples_hold_the_nearest_entries_but_never_the_query_itself_plus_seeded_negatives(world, builder) -> None:
    """Training on the gallery itself: each query's retrieved candidates leave out its own index entry, the random
    negatives are other entries, the distances are great-circle km to the truth, and the draw is seeded."""
    queries = read_queries(world.references_csv)
    batch = list(itertools.islice(query_stream(queries, seed=0), 6))
    examples = builder.build(batch)
    assert [ex.ordinal for ex in examples] == list(range(6))
    for ex in examples:
        own = ex.query.path.relative_to(world.root).as_posix()
        ids = [c.id for c in ex.candidates]
        assert own not in ids and len(ids) == len(set(ids)) == 4
        assert [c.negative for c in ex.candidates] == [False, False, False, True]
        for c in ex.candidates:
            assert c.distance_km == pytest.approx(float(haversine_km(ex.query.lat, ex.query.lon, c.lat, c.lon)))
            assert c.photo is not None
    again = builder.build(batch)
    assert [[c.id for c in ex.candidates] for ex in again] == [[c.id for c in ex.candidates] for ex in examples]
    other = ExampleBuilder(builder.index, builder.embedder, k=3, negatives=1, seed=1).build(batch)
    assert [ex.candidates[-1].id for ex in other] != [ex.candidates[-1].id for ex in examples]


def test_the_query_stream_reshuffles_each_epoch_and_resumes_mid_way(world) -> None:
    """Each epoch is a seeded permutation of every query; starting at ordinal n gives what the full stream gives there."""
    queries = read_queries(world.queries_csv)
    full = list(itertools.islice(query_stream(queries, seed=4), 2 * len(queries)))
    first, second = [q.path for _, q in full[: len(queries)]], [q.path for _, q in full[len(queries) :]]
    assert sorted(first) == sorted(second) == sorted(q.path for q in queries) and first != second
    assert list(itertools.islice(query_stream(queries, seed=4, start=len(queries) + 5), 10)) == full[len(queries) + 5 : len(queries) + 15]


def test_three_training_steps_reduce_the_loss_on_a_fixed_batch(world, builder, tiny_qwen2vl, tmp_path) -> None:
    """AdamW on the LoRA and value-head parameters only (the base stays frozen): three steps on one batch of two
    queries lower GeoRanker's loss on that batch, measured without dropout before and after."""
    queries = read_queries(world.queries_csv)
    batch = builder.build(list(itertools.islice(query_stream(queries, seed=0), 2)))
    ranker = load_tiny(tiny_qwen2vl)(None)
    options = TrainOptions(index=tmp_path, queries=world.queries_csv, out=tmp_path / "out", lr=1e-3, top=None)
    trainer = Trainer(ranker, options, total_steps=3)
    trained = {name for name, p in ranker.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name or "value_head" in name for name in trained)
    frozen = {name: p.detach().clone() for name, p in ranker.model.named_parameters() if not p.requires_grad}

    def batch_loss() -> float:
        ranker.model.eval()
        with torch.no_grad():
            return trainer.loss(batch).item()

    before = batch_loss()
    for _ in range(3):
        trainer.train_step([batch])
    after = batch_loss()
    assert after < before, (before, after)
    assert all(torch.equal(p, frozen[name]) for name, p in ranker.model.named_parameters() if name in frozen)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(world, builder, tiny_qwen2vl, tmp_path) -> None:
    """Four steps with a checkpoint every two, interrupted (Ctrl-C) after step 3: the rerun starts from step 2's
    checkpoint and its final adapter equals, tensor for tensor, that of a run never interrupted (same seed)."""
    queries = read_queries(world.queries_csv)

    def options(out: Path, seed: int = 7) -> TrainOptions:
        return TrainOptions(index=tmp_path, queries=world.queries_csv, out=out, steps=4, checkpoint_every=2, lr=1e-3,
                            batch_queries=1, accumulate=2, candidates=3, negatives=1, seed=seed)

    whole = run_training(options(tmp_path / "whole"), builder, queries, load_tiny(tiny_qwen2vl, 7), "tiny")

    def interrupt(report: StepReport) -> None:
        if report.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(options(tmp_path / "cut"), builder, queries, load_tiny(tiny_qwen2vl, 7), "tiny", on_step=interrupt)
    assert [p.name for p in checkpoints(tmp_path / "cut")] == ["step-00000002"]
    resumed = run_training(options(tmp_path / "cut"), builder, queries, load_tiny(tiny_qwen2vl, 7), "tiny")
    assert resumed.resumed_from == 2 and len(resumed.losses) == 2
    assert resumed.losses == pytest.approx(whole.losses[2:], rel=1e-6)
    expected, got = adapter_tensors(tmp_path / "whole"), adapter_tensors(tmp_path / "cut")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert not torch.equal(expected["base_model.model.value_head.weight"], adapter_tensors(checkpoints(tmp_path / "cut")[0])["base_model.model.value_head.weight"])
    assert [p.name for p in checkpoints(tmp_path / "cut")] == ["step-00000002", "step-00000004"]
    assert not [p for p in (tmp_path / "cut").rglob("*") if p.name.startswith(".")]  # no staging left behind

    def never(_: Path | None) -> RewardModel:
        raise AssertionError("the model loaded before the checkpoint was refused")

    with pytest.raises(ConfigError, match="made with --seed 7, this run has 8"):  # another data stream: refused
        run_training(options(tmp_path / "cut", seed=8), builder, queries, never, "tiny")


def test_a_bfloat16_base_trains_under_autocast_with_a_float32_adapter(world, builder, tiny_qwen2vl, tmp_path) -> None:
    """The GPU recipe, run on the CPU: base weights in bfloat16, LoRA and value head kept in float32, forward
    passes under bfloat16 autocast; a step gives a finite loss and moves the adapter."""
    queries = read_queries(world.queries_csv)
    batch = builder.build(list(itertools.islice(query_stream(queries, seed=0), 2)))
    ranker = RewardModel.load(tiny_qwen2vl, device="cpu", dtype="bfloat16", max_side=MAX_SIDE, trainable=True)
    trainer = Trainer(ranker, TrainOptions(index=tmp_path, queries=world.queries_csv, out=tmp_path / "out", lr=1e-3), total_steps=2)
    assert trainer.weights_dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in trainer.parameters)
    autocast_seen: list[bool] = []
    ranker.model.get_base_model().model.register_forward_hook(lambda *_: autocast_seen.append(torch.is_autocast_enabled("cpu")))
    before = [p.detach().clone() for p in trainer.parameters]
    assert math.isfinite(trainer.train_step([batch]))
    assert autocast_seen == [True]
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.parameters))


# --- the command ----------------------------------------------------------------------------------------


def test_ranker_train_end_to_end_writes_an_adapter_the_ranker_loads(world, tiny_qwen2vl, tmp_path) -> None:
    """`geoagent ranker train` in a fresh process, on the test world's index and queries: exit 0, a summary line,
    checkpoints, and a final adapter in GeoRanker's format that the ranker's strict loader accepts, holding the
    trained weights (those of the last checkpoint, not a fresh adapter's)."""
    config = tmp_path / "train.toml"
    config.write_text(
        f'[retrieval]\nclip_model = "{TINY_CLIP}"\nclip_pretrained = "none"\n'
        f'[ranker]\nbase_model = "{tiny_qwen2vl}"\ndevice = "cpu"\nmax_image_side = {MAX_SIDE}\n'
    )
    out = tmp_path / "adapter"
    result = run_cli(
        "ranker", "train", "--index", str(world.root / "index"), "--queries", str(world.queries_csv), "--out", str(out),
        "--steps", "2", "--checkpoint-every", "1", "--candidates", "2", "--negatives", "1", "--accumulate", "1",
        "--lr", "1e-3", "--config", str(config), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "trained 2 steps" in result.stdout and str(out.name) in result.stdout
    assert "step 2/2 loss" in result.stderr  # off a terminal: a line a checkpoint instead of a bar
    assert [p.name for p in checkpoints(out)] == ["step-00000001", "step-00000002"]
    stored = json.loads((out / "adapter_config.json").read_text())
    assert (stored["r"], stored["lora_alpha"], stored["modules_to_save"], stored["base_model_name_or_path"]) == (16, 32, ["value_head"], str(tiny_qwen2vl))
    RewardModel.load(tiny_qwen2vl, out, device="cpu", dtype="float32", max_side=MAX_SIDE)  # strict: every tensor must land
    head = "base_model.model.value_head.weight"
    assert torch.equal(adapter_tensors(out)[head], adapter_tensors(checkpoints(out)[-1])[head])
    fresh = RewardModel.load(tiny_qwen2vl, None, device="cpu", dtype="float32", max_side=MAX_SIDE)
    fresh.save_adapter(tmp_path / "fresh")
    assert not torch.equal(adapter_tensors(tmp_path / "fresh")[head], adapter_tensors(out)[head])


@pytest.mark.parametrize(
    ("flags", "message", "code"),
    [
        (["--lambda1", "1.5"], "--lambda1: ", 2),
        (["--queries", "missing.csv"], "missing.csv: no such dataset", 1),
    ],
    ids=["lambda1-out-of-range", "queries-missing"],
)
def test_ranker_train_reports_bad_input_in_one_line_before_loading_anything(world, tmp_path, flags, message, code) -> None:
    """A bad flag or a missing queries file is one line on stderr naming it, no traceback, before any model loads."""
    base = {"--index": str(world.root / "index"), "--queries": str(world.queries_csv), "--out": str(tmp_path / "out")}
    args = [item for key, value in base.items() if key not in flags for item in (key, value)]
    result = run_cli("ranker", "train", *args, *flags, cwd=tmp_path)
    assert result.returncode == code
    assert message in result.stderr and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
