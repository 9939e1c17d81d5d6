"""Values loaded in worker threads and kept, most recently used first: reference photos recur across queries."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class ThreadLoads(Generic[K, V]):
    """One loading task per key, run with ``load`` in a worker thread; the ``size`` most recent are kept.

    Callers asking for one key at once share its load, and a task evicted by another caller meanwhile is still
    awaited by those holding it.
    """

    def __init__(self, load: Callable[[K], V], size: int) -> None:
        self._load, self._size = load, size
        self._tasks: OrderedDict[K, asyncio.Task[V]] = OrderedDict()

    async def get(self, key: K) -> V:
        if key not in self._tasks:
            self._tasks[key] = asyncio.create_task(asyncio.to_thread(self._load, key))
        self._tasks.move_to_end(key)
        task = self._tasks[key]
        while len(self._tasks) > self._size:
            self._tasks.popitem(last=False)
        return await asyncio.shield(task)
