"""In-process single-flight: concurrent misses for one key share one load."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """Run at most one load per key at a time; latecomers await the same result.

    The load runs in its own task, so a caller whose RPC is cancelled does not
    cancel the load the others are waiting for.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._loads: dict[K, asyncio.Task[V]] = {}

    async def run(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        return await asyncio.shield(self.spawn(key, load))

    def spawn(self, key: K, load: Callable[[], Awaitable[V]]) -> asyncio.Task[V]:
        """Start *load* for *key* unless one is running; return the running task."""
        task = self._loads.get(key)
        if task is None:
            task = asyncio.create_task(_call(load), name=f"{self._name}-load")
            self._loads[key] = task
            task.add_done_callback(lambda _: self._loads.pop(key, None))
        return task

    def __contains__(self, key: object) -> bool:
        return key in self._loads

    def __len__(self) -> int:
        return len(self._loads)


async def _call(load: Callable[[], Awaitable[V]]) -> V:
    return await load()
