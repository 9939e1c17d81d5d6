"""The georanker strategy's service: the reward model loaded once per process, scoring off the event loop.

Photos in flight ask for rewards concurrently; their candidates queue up and go through the model together,
``batch_size`` per forward pass, in one worker thread (a GPU is busiest with full batches, and a second
thread would only contend for it). Rewards become votes by rank (first 1, last 0), as the sorting strategy's
full order does, and go through the same fusion as every strategy's votes.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from geoagent.agent.aggregate import rank_votes
from geoagent.errors import InputError
from geoagent.images import open_image
from geoagent.loading import loading
from geoagent.loads import ThreadLoads
from geoagent.ranker import require_extra
from geoagent.ranker.weights import resolve_weights

if TYPE_CHECKING:
    from PIL import Image

    from geoagent.config import RankerConfig
    from geoagent.ranker.model import RankItem, RewardModel
    from geoagent.types import Candidate

REFERENCE_IMAGES = 512  # candidate photos kept, shrunk, across queries (references recur in batches)

_models: dict[tuple[str, ...], RewardModel] = {}
_models_lock = threading.Lock()


def shared_model(config: RankerConfig) -> RewardModel:
    """The reward model ``config`` describes, loaded on first use and shared by the whole process (blocking).

    The extra is checked and the weights located first (fast, clear errors, no torch import), then loaded.
    """
    require_extra()
    base, adapter = resolve_weights(config)
    key = (str(base.resolve()), str(adapter.resolve()), config.device, config.dtype, str(config.max_image_side))
    with _models_lock:
        if key not in _models:
            from geoagent.ranker.model import RewardModel

            _models[key] = RewardModel.load(base, adapter, device=config.device, dtype=config.dtype, max_side=config.max_image_side)
        return _models[key]


@dataclass
class ModelVotes:
    """What the ranker said about one photo's pool: votes in [0, 1], raw rewards, and who had no photo."""

    votes: dict[str, float]
    rewards: dict[str, float]
    without_photo: list[str] = field(default_factory=list)


@dataclass
class _Request:
    items: list[RankItem]
    done: asyncio.Future[list[float]]


class Ranker:
    """Scores candidates with a :class:`RewardModel`, batching the requests of every photo in flight.

    One per event loop (a GeoAgent holds one); the model behind it is shared by the process.
    """

    def __init__(self, model: RewardModel, batch_size: int) -> None:
        self.model, self.batch_size = model, batch_size
        self._queue: list[_Request] = []
        self._worker: asyncio.Task[None] | None = None
        self._images = ThreadLoads(self._load_image, REFERENCE_IMAGES)

    @classmethod
    async def load(cls, config: RankerConfig) -> Ranker:
        """Load (or reuse) the process's model in a worker thread."""
        with loading(f"loading GeoRanker {config.base_model}"):
            return cls(await asyncio.to_thread(shared_model, config), config.batch_size)

    async def rewards(self, items: list[RankItem]) -> list[float]:
        """One reward per item, computed with the other photos' pending items in as few passes as fit."""
        if not items:
            return []
        request = _Request(items, asyncio.get_running_loop().create_future())
        self._queue.append(request)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await request.done

    async def _drain(self) -> None:
        """Run the queue: whatever is pending goes in one call; what arrives meanwhile waits for the next."""
        while self._queue:
            await asyncio.sleep(0)  # let photos that are about to ask join this call
            taken, self._queue = [r for r in self._queue if not r.done.done()], []
            items = [item for request in taken for item in request.items]
            try:
                rewards = await asyncio.to_thread(self.model.rewards_sync, items, self.batch_size)
            except Exception as exc:  # the model's failure is every waiting photo's
                for request in taken:
                    if not request.done.done():
                        request.done.set_exception(exc)
                continue
            start = 0
            for request in taken:
                end = start + len(request.items)
                if not request.done.done():
                    request.done.set_result(rewards[start:end])
                start = end

    def _load_image(self, path: str | Path) -> Image.Image | None:
        from geoagent.ranker.model import fit_image

        try:
            return fit_image(open_image(path), self.model.max_side)
        except InputError:
            return None  # moved or deleted since indexing: scored from the coordinates alone

    async def votes(self, query: Image.Image, pool: list[Candidate]) -> ModelVotes:
        """Rewards for ``pool`` against the query photo, and votes by reward rank (ties keep the pool's order).

        A candidate without a photo (gazetteer, the reasoning guess, a reference gone missing) is scored from the
        query photo and its coordinates alone, as GeoRanker scores its generated candidates.
        """
        from geoagent.ranker.model import RankItem, fit_image

        fitted = await asyncio.to_thread(fit_image, query, self.model.max_side)
        photos = await asyncio.gather(*(self._images.get(c.image_path) if c.image_path else _none() for c in pool))
        items = [RankItem(fitted, c.lat, c.lon, photo) for c, photo in zip(pool, photos)]
        rewards = dict(zip((c.id for c in pool), await self.rewards(items)))
        ordered = sorted(pool, key=lambda c: -rewards[c.id])
        return ModelVotes(
            votes=rank_votes([c.id for c in ordered]),
            rewards=rewards,
            without_photo=[c.id for c, photo in zip(pool, photos) if photo is None],
        )


async def _none() -> None:
    return None
