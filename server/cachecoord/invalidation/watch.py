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


class Backlog:
    """The events a watcher has not read yet, at most *max_len* of them.

    A RESET replaces everything before it (the client drops all it cached
    anyway), and so does an overflow, as a RESET of its own (``overflow``);
    events offered after a RESET, until it is read, are dropped: it covers
    them. No I/O and no clock: :class:`Watcher` adds the waiting."""

    def __init__(self, max_len: int) -> None:
        self._max_len = max_len
        self._events: deque[WatchEvent] = deque()
        self._reset_pending = False

    def offer(self, event: WatchEvent) -> None:
        if event.kind is EventKind.RESET:
            self._events.clear()
            self._reset_pending = True
        elif self._reset_pending:
            return  # dropped: the pending RESET covers it
        elif len(self._events) >= self._max_len:
            self._events.clear()
            self._reset_pending = True
            event = OVERFLOW
        self._events.append(event)

    def take(self) -> WatchEvent | None:
        """The oldest event not read yet, if any."""
        if not self._events:
            return None
        event = self._events.popleft()
        if event.kind is EventKind.RESET:
            self._reset_pending = False
        return event

    def __len__(self) -> int:
        return len(self._events)


class Watcher:
    """One Watch stream's view: events of some namespaces, optionally only
    keys with a prefix."""

    def __init__(self, namespaces: frozenset[str], key_prefix: str, max_backlog: int) -> None:
        self.namespaces = namespaces
        self.key_prefix = key_prefix
        self._backlog = Backlog(max_backlog)
        self._ready = asyncio.Event()

    def wants(self, change: Invalidation) -> bool:
        # A whole-namespace invalidation (key None) concerns every prefix.
        return change.key is None or change.key.startswith(self.key_prefix)

    def offer(self, event: WatchEvent) -> None:
        self._backlog.offer(event)
        self._ready.set()

    async def next(self, heartbeat: float) -> WatchEvent:
        """The next event, or HEARTBEAT after *heartbeat* seconds of quiet."""
        while (event := self._backlog.take()) is None:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), heartbeat)
            except TimeoutError:
                return HEARTBEAT
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
