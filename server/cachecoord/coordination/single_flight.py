"""In-process single-flight: concurrent misses for one key share one load.

Sharing a load is only safe for readers that joined it early enough. A
reader that starts after a write was acknowledged must not get a row read
before that write, and a load that is already running may well have read
it. So every load's result carries an *as-of tick*: the value of this
flight's tick counter just before the read (SQL query, Redis read, or
accepted lease fill) that proves the result current. A reader takes its tick
after its own Redis miss and may take a shared result only if its tick is
older than the result's as-of tick: every write acknowledged before the
reader's tick is then reflected in it. Otherwise the reader reads again.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Shared(Generic[V]):
    """A load's result: *value*, current for readers whose tick is below *as_of*."""

    value: V
    as_of: int


class SingleFlight(Generic[K, V]):
    """Run at most one load per key at a time; latecomers await the same result.

    The load runs in its own task, so a caller whose RPC is cancelled does not
    cancel the load the others are waiting for.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._loads: dict[K, tuple[int, asyncio.Task[Shared[V]]]] = {}
        self._ticks = itertools.count(1)

    def tick(self) -> int:
        """The next tick: marks a moment, ordered with every other tick of this flight."""
        return next(self._ticks)

    async def run(self, key: K, load: Callable[[], Awaitable[Shared[V]]], ticket: int) -> V | None:
        """Start *load* for *key*, or join the running one. Returns its value,
        or None if the caller joined a load that cannot serve *ticket* (a tick
        the caller took after its own cache miss): then it must read again.

        The caller that starts the load always takes its value: the load began
        after the caller did. A joiner takes it when *ticket* is older than the
        result's as-of tick, or than the load's start (a reader reading again
        after a refused result keeps its first ticket: the next load it finds
        started after that, so a second refusal cannot happen).
        """
        running = self._loads.get(key)
        if running is None:
            return (await asyncio.shield(self._start(key, load)[1])).value
        started, task = running
        shared = await asyncio.shield(task)
        return shared.value if may_join(ticket, started, shared.as_of) else None

    async def read_through(
        self,
        key: K,
        look: Callable[[], Awaitable[V | None]],
        load: Callable[[], Awaitable[Shared[V]]],
    ) -> V:
        """Read *key*: *look* in the cache (None: a miss), and on a miss take
        the load of *key* this flight runs if it can serve this read, else
        start *load* (:meth:`run`); a refused reader looks again.

        The reader's ticket is taken right after its first miss, and kept: a
        load it finds after a refusal started after that ticket, so it is
        refused at most once, and looks at most twice.
        """
        ticket = 0
        while True:
            found = await look()
            if found is not None:
                return found
            ticket = ticket or self.tick()
            shared = await self.run(key, load, ticket)
            if shared is not None:
                return shared

    def spawn(self, key: K, load: Callable[[], Awaitable[Shared[V]]]) -> asyncio.Task[Shared[V]]:
        """Start *load* for *key* unless one is running; return the running task
        (a fire-and-forget load, such as a background refresh)."""
        running = self._loads.get(key)
        return (running if running is not None else self._start(key, load))[1]

    def _start(
        self, key: K, load: Callable[[], Awaitable[Shared[V]]]
    ) -> tuple[int, asyncio.Task[Shared[V]]]:
        started = self.tick()
        task = asyncio.create_task(self._call(key, load), name=f"{self._name}-load")
        # Every caller may have gone (their RPCs cancelled, or the server
        # stopping): its failure is theirs, not one to log as never retrieved.
        task.add_done_callback(_retrieve)
        running = self._loads[key] = (started, task)
        return running

    async def _call(self, key: K, load: Callable[[], Awaitable[Shared[V]]]) -> Shared[V]:
        try:
            return await load()
        finally:
            # Gone from the map as soon as the result exists: a reader arriving
            # later starts afresh instead of joining a finished load.
            running = self._loads.get(key)
            if running is not None and running[1] is asyncio.current_task():
                del self._loads[key]

    def __contains__(self, key: object) -> bool:
        return key in self._loads

    def __len__(self) -> int:
        return len(self._loads)


def may_join(ticket: int, started: int, as_of: int) -> bool:
    """Whether a reader whose tick after its cache miss is *ticket* may take
    the result of a load that began at tick *started* and is current as of
    tick *as_of*: only if one of them came after the reader's miss. A write
    acknowledged before the reader began is then reflected in the result
    (it was acknowledged before that tick too); otherwise the load may have
    read the row before the write, and the reader must read again."""
    return ticket < max(started, as_of)


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
