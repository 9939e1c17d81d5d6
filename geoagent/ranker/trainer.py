"""Fine-tuning a GeoRanker adapter: the loop behind ``geoagent ranker train``.

AdamW over the LoRA and value-head parameters (kept in float32), GeoRanker's multi-order loss, gradient
accumulation, a linear learning-rate decay to zero (the Hugging Face Trainer's default, which GeoRanker ran
with), gradient norm clipped at 1. ``[ranker] dtype = "auto"`` loads the base in bfloat16 on a GPU, and the
forward passes then run under bfloat16 autocast; on the CPU everything is float32.

On disk, under the output folder::

    OUT/adapter_config.json, adapter_model.safetensors   the final adapter, GeoRanker's format
    OUT/checkpoints/step-00000100/                       an adapter as above, plus trainer_state.pt:
                                                         optimizer, schedule, step, RNG states, data options

A checkpoint is written to a hidden folder and renamed into place, so a crash never leaves a half one; the last
:data:`KEEP_CHECKPOINTS` are kept. A run resumes from the newest one by default, and then continues exactly as
if it had never stopped: the data stream is a pure function of the seed and the step, and the RNG states (LoRA
dropout) are restored.

Blocking throughout: run it in a worker thread when called from async code.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from geoagent.errors import ConfigError
from geoagent.paths import display_path
from geoagent.ranker import recipe
from geoagent.ranker.losses import georanker_loss
from geoagent.ranker.model import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RankItem, RewardModel
from geoagent.ranker.training import ExampleBuilder, TrainExample, TrainOptions, query_stream

if TYPE_CHECKING:
    from geoagent.eval.datasets import EvalItem

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step-"
STATE_FILE = "trainer_state.pt"
KEEP_CHECKPOINTS = 2
@dataclass(frozen=True)
class StepReport:
    """Sent after every optimizer step."""

    step: int
    total: int
    loss: float
    checkpoint: Path | None = None  # written after this step


@dataclass
class TrainReport:
    adapter: Path
    steps: int
    resumed_from: int = 0
    last_loss: float | None = None
    losses: list[float] = field(default_factory=list)  # this run's steps, in order


def _autocast(device: str, weights: torch.dtype) -> AbstractContextManager[Any]:
    """bfloat16 autocast over bfloat16 base weights (``[ranker] dtype`` auto: on a GPU), so the float32 adapter
    meets them in bfloat16; nothing over float32 weights (auto: on the CPU)."""
    if weights != torch.bfloat16:
        return nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def rank_items(examples: Sequence[TrainExample]) -> list[RankItem]:
    """The model inputs of a batch of examples, query by query, candidates in order."""
    return [RankItem(ex.image, c.lat, c.lon, c.photo) for ex in examples for c in ex.candidates]


class Trainer:
    """The optimizer state around a trainable :class:`RewardModel`: loss, steps, checkpoints."""

    def __init__(self, ranker: RewardModel, options: TrainOptions, total_steps: int) -> None:
        self.ranker, self.options, self.total_steps, self.step = ranker, options, total_steps, 0
        self.weights_dtype = ranker.model.get_base_model().get_input_embeddings().weight.dtype
        self.parameters = [p for p in ranker.model.parameters() if p.requires_grad]
        if not self.parameters:
            raise ConfigError("ranker train: the model has no trainable parameters (was it loaded with trainable=True?)")
        for parameter in self.parameters:  # LoRA and value head in float32 even over a bfloat16 base
            parameter.data = parameter.data.float()
        self.optimizer = torch.optim.AdamW(self.parameters, lr=options.lr, weight_decay=recipe.WEIGHT_DECAY)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda done: max(0.0, 1.0 - done / total_steps))

    def loss(self, examples: Sequence[TrainExample]) -> torch.Tensor:
        """GeoRanker's loss over a batch of examples (queries with ragged candidate counts are masked)."""
        counts = [len(ex.candidates) for ex in examples]
        with _autocast(self.ranker.device, self.weights_dtype):
            flat = self.ranker.forward(rank_items(examples))
        rewards = torch.nn.utils.rnn.pad_sequence(list(flat.split(counts)), batch_first=True)
        distances = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor([c.distance_km for c in ex.candidates], dtype=torch.float32) for ex in examples], batch_first=True
        ).to(rewards.device)
        width = rewards.shape[1]
        mask = torch.arange(width, device=rewards.device)[None, :] < torch.tensor(counts, device=rewards.device)[:, None]
        return georanker_loss(rewards, distances, mask, lambda1=self.options.lambda1, top=self.options.top)

    def train_step(self, micro_batches: Sequence[Sequence[TrainExample]]) -> float:
        """One optimizer step over ``micro_batches`` (gradients accumulated); the mean loss. Empty micro-batches
        (every photo unreadable) are passed over; a step with none left still counts, without an update."""
        self.ranker.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        batches = [batch for batch in micro_batches if batch]
        losses = []
        for batch in batches:
            loss = self.loss(batch)
            (loss / len(batches)).backward()
            losses.append(float(loss.detach()))
        if batches:
            torch.nn.utils.clip_grad_norm_(self.parameters, recipe.MAX_GRAD_NORM)
            self.optimizer.step()
        self.schedule.step()
        self.step += 1
        return sum(losses) / len(losses) if losses else math.nan

    # --- checkpoints ------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": rng,
            "data": self.options.data_key(),
        }

    def save_checkpoint(self, out: Path, base_model_name: str | None) -> Path:
        """Adapter and trainer state at this step, written whole or not at all; older ones beyond the last
        :data:`KEEP_CHECKPOINTS` are removed."""
        folder = out / CHECKPOINTS
        final = folder / f"{STEP_PREFIX}{self.step:08d}"
        staging = folder / f".{final.name}.{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        self.ranker.save_adapter(staging, base_model_name=base_model_name)
        torch.save(self.state(), staging / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in checkpoints(out)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def restore(self, state: dict[str, Any]) -> None:
        """Optimizer, schedule, step and RNG states from a checkpoint's :func:`read_state` (its adapter is loaded
        with the model)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def read_state(checkpoint: Path, options: TrainOptions) -> dict[str, Any]:
    """A checkpoint's trainer state, refused (ConfigError) when it was made with other data options."""
    state: dict[str, Any] = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    now = options.data_key()
    for name, was in state["data"].items():
        if now.get(name) != was:
            raise ConfigError(
                f"{display_path(checkpoint)}: made with --{name.replace('_', '-')} {was}, this run has {now.get(name)}; "
                f"rerun with the same value, or --no-resume to start over"
            )
    return state


def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints under ``out``, oldest first."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(STEP_PREFIX) and (p / STATE_FILE).is_file() and (p / ADAPTER_WEIGHTS).is_file()]
    return sorted(found, key=lambda p: p.name)


def micro_batches(stream: Iterator[tuple[int, EvalItem]], builder: ExampleBuilder, options: TrainOptions) -> list[list[TrainExample]]:
    """The next step's micro-batches: ``accumulate`` of them, ``batch_queries`` queries each."""
    return [builder.build([next(stream) for _ in range(options.batch_queries)]) for _ in range(options.accumulate)]


def save_final(ranker: RewardModel, out: Path, base_model_name: str | None) -> Path:
    """The trained adapter into ``out`` itself (each file replaced atomically), where ``[ranker] adapter`` can
    point."""
    staging = out / f".adapter.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    ranker.save_adapter(staging, base_model_name=base_model_name)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):  # the weights first: a config never names missing weights
        os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)
    return out


def run_training(
    options: TrainOptions,
    builder: ExampleBuilder,
    queries: Sequence[EvalItem],
    load_ranker: Callable[[Path | None], RewardModel],
    base_model_name: str | None,
    on_step: Callable[[StepReport], None] | None = None,
) -> TrainReport:
    """Train from scratch or from the newest checkpoint under ``options.out``; ``load_ranker(adapter)`` loads the
    trainable model (a fresh adapter for None). Returns where the final adapter went."""
    out = options.out
    existing = checkpoints(out)
    if existing and not options.resume:
        shutil.rmtree(out / CHECKPOINTS)
        existing = []
    resume_from = existing[-1] if existing else None
    state = read_state(resume_from, options) if resume_from is not None else None  # refused before the model loads
    total = options.total_steps(len(queries))
    torch.manual_seed(options.seed)
    ranker = load_ranker(resume_from)
    trainer = Trainer(ranker, options, total)
    if state is not None:
        trainer.restore(state)
    report = TrainReport(adapter=out, steps=total, resumed_from=trainer.step)
    per_step = options.batch_queries * options.accumulate
    stream = query_stream(queries, options.seed, start=trainer.step * per_step)
    while trainer.step < total:
        loss = trainer.train_step(micro_batches(stream, builder, options))
        report.losses.append(loss)
        report.last_loss = loss
        saved = None
        if trainer.step % options.checkpoint_every == 0 or trainer.step == total:
            saved = trainer.save_checkpoint(out, base_model_name)
        if on_step is not None:
            on_step(StepReport(trainer.step, total, loss, saved))
    save_final(ranker, out, base_model_name)
    return report

