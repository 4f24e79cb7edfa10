"""Fan-out of invalidation events to Watch streams.

Each watcher has a bounded backlog: a client that reads too slowly cannot
grow the server's memory. When its backlog overflows, it is emptied and
replaced by one RESET event (the client must drop everything it cached), and
events resume after the client has read that RESET. Every watcher also gets
RESET whenever this instance's subscription dropped (events may be lost).

An event tells its reader that *this instance* has the change: the message is
handed to the namespace's strategy (near cache eviction) in the same
synchronous callback, before the event is queued (app.py registers
``Strategy.on_message`` ahead of :meth:`WatchHub.publish`), and no read the
instance answers afterwards takes a value read before the change (see
strategies/reads.py). So a client that reads through the instance it
watches never gets the older version after the event (docs/guarantees.md
section 2, rules 2 and 3).
"""

from __future__ import annotations

import asyncio
import enum
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from cachecoord.invalidation.messages import Invalidation


class EventKind(enum.Enum):
    INVALIDATED = "invalidated"
    RESET = "reset"
    HEARTBEAT = "heartbeat"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: EventKind
    change: Invalidation | None = None
    reason: str = ""


SUBSCRIBED = WatchEvent(EventKind.RESET, reason="subscribed")
RESUBSCRIBED = WatchEvent(EventKind.RESET, reason="resubscribed")
OVERFLOW = WatchEvent(EventKind.RESET, reason="overflow")
HEARTBEAT = WatchEvent(EventKind.HEARTBEAT)


class Watcher:
    """One Watch stream's view: events of some namespaces, optionally only
    keys with a prefix."""

    def __init__(self, namespaces: frozenset[str], key_prefix: str, max_backlog: int) -> None:
        self.namespaces = namespaces
        self.key_prefix = key_prefix
        self._max_backlog = max_backlog
        self._backlog: deque[WatchEvent] = deque()
        self._ready = asyncio.Event()
        self._overflowed = False

    def wants(self, change: Invalidation) -> bool:
        # A whole-namespace invalidation (key None) concerns every prefix.
        return change.key is None or change.key.startswith(self.key_prefix)

    def offer(self, event: WatchEvent) -> None:
        if event.kind is EventKind.RESET:
            self._backlog.clear()
            self._overflowed = True
        elif self._overflowed:
            return  # dropped: the pending RESET covers it
        elif len(self._backlog) >= self._max_backlog:
            self._backlog.clear()
            self._overflowed = True
            event = OVERFLOW
        self._backlog.append(event)
        self._ready.set()

    async def next(self, heartbeat: float) -> WatchEvent:
        """The next event, or HEARTBEAT after *heartbeat* seconds of quiet."""
        while not self._backlog:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), heartbeat)
            except TimeoutError:
                return HEARTBEAT
        event = self._backlog.popleft()
        if event.kind is EventKind.RESET:
            self._overflowed = False
        return event

    @property
    def backlog(self) -> int:
        return len(self._backlog)


class WatchHub:
    """Routes every invalidation this instance receives to the watchers."""

    def __init__(self, *, max_backlog: int = 1000) -> None:
        self._max_backlog = max_backlog
        self._by_namespace: defaultdict[str, set[Watcher]] = defaultdict(set)

    @asynccontextmanager
    async def watch(self, namespaces: Iterable[str], key_prefix: str) -> AsyncIterator[Watcher]:
        watcher = Watcher(frozenset(namespaces), key_prefix, self._max_backlog)
        watcher.offer(SUBSCRIBED)
        for name in watcher.namespaces:
            self._by_namespace[name].add(watcher)
        try:
            yield watcher
        finally:
            for name in watcher.namespaces:
                watchers = self._by_namespace[name]
                watchers.discard(watcher)
                if not watchers:
                    del self._by_namespace[name]

    def publish(self, change: Invalidation) -> None:
        if change.reason == "fill":
            return  # not a change
        for watcher in self._by_namespace.get(change.namespace, ()):
            if watcher.wants(change):
                watcher.offer(WatchEvent(EventKind.INVALIDATED, change))

    def reset(self) -> None:
        """This instance may have missed events: every watcher gets RESET."""
        for watcher in {w for watchers in self._by_namespace.values() for w in watchers}:
            watcher.offer(RESUBSCRIBED)

    def __len__(self) -> int:
        return len({w for watchers in self._by_namespace.values() for w in watchers})
