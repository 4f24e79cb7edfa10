"""Fan-out of invalidation events to Watch streams.

Each watcher has a bounded backlog: a client that reads too slowly cannot
grow the server's memory. When its backlog overflows, it is emptied and
replaced by one RESET event (the client must drop everything it cached), and
events resume after the client has read that RESET. A watcher also gets
RESET when this instance missed events of its namespaces that the
invalidation log could not replay (feed.py).

Every event a stream sends carries its *resume token*: the position, in
each partition of each watched namespace's invalidation log, of the last
change the stream has passed (sent, or skipped for its key prefix).
A stream started with a token first replays the log after it (replay.py).

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
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from cachecoord import instruments
from cachecoord.invalidation import resume_token
from cachecoord.invalidation.messages import FILL, Invalidation
from cachecoord.invalidation.positions import NONE, is_newer
from cachecoord.invalidation.replay import Replay, ReplaySource


class EventKind(enum.Enum):
    INVALIDATED = "invalidated"
    RESET = "reset"
    HEARTBEAT = "heartbeat"
    RESUMED = "resumed"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: EventKind
    change: Invalidation | None = None
    reason: str = ""
    replayed: int = 0
    """RESUMED: how many events were replayed."""


SUBSCRIBED = WatchEvent(EventKind.RESET, reason="subscribed")
RESUBSCRIBED = WatchEvent(EventKind.RESET, reason="resubscribed")
OVERFLOW = WatchEvent(EventKind.RESET, reason="overflow")
TOO_OLD = WatchEvent(EventKind.RESET, reason="too_old")
HEARTBEAT = WatchEvent(EventKind.HEARTBEAT)

Advance = tuple[str, int, str]
"""A change a watcher passed without sending it: (namespace, partition, position)."""


@dataclass(slots=True)
class _Queued:
    event: WatchEvent
    passed: list[Advance] = field(default_factory=list)
    """Changes skipped (key prefix) after this event was queued: the token
    moves past them once this event is read."""


class Backlog:
    """The events a watcher has not read yet, at most *max_len* of them.

    A RESET replaces everything before it (the client drops all it cached
    anyway), and so does an overflow, as a RESET of its own (``overflow``);
    events offered after a RESET, until it is read, are dropped: it covers
    them. No I/O and no clock: :class:`Watcher` adds the waiting."""

    def __init__(self, max_len: int) -> None:
        self._max_len = max_len
        self._events: deque[_Queued] = deque()
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
        self._events.append(_Queued(event))

    def pass_by(self, advance: Advance) -> bool:
        """A change skipped: the token moves past it after the last queued
        event is read. False if nothing is queued (it moves now)."""
        if not self._events:
            return False
        self._events[-1].passed.append(advance)
        return True

    def take(self) -> WatchEvent | None:
        """The oldest event not read yet, if any."""
        taken = self.take_with_passed()
        return None if taken is None else taken[0]

    def take_with_passed(self) -> tuple[WatchEvent, list[Advance]] | None:
        """The oldest event not read yet, and the changes passed after it, if any."""
        if not self._events:
            return None
        queued = self._events.popleft()
        if queued.event.kind is EventKind.RESET:
            self._reset_pending = False
        return queued.event, queued.passed

    def __len__(self) -> int:
        return len(self._events)


class Watcher:
    """One Watch stream's view: events of some namespaces, optionally only
    keys with a prefix, and its position in each namespace's log."""

    def __init__(
        self,
        namespaces: frozenset[str],
        key_prefix: str,
        max_backlog: int,
        positions: Mapping[str, Sequence[str]],
    ) -> None:
        self.namespaces = namespaces
        self.key_prefix = key_prefix
        self._backlog = Backlog(max_backlog)
        self._max_backlog = max_backlog
        self._ready = asyncio.Event()
        # _offered: the newest change of each partition handed to this
        # watcher (sent, queued, skipped or covered by a RESET); _sent: as of
        # the last event read, which is what the token says.
        self._offered = {name: list(positions[name]) for name in namespaces}
        self._sent = {name: list(positions[name]) for name in namespaces}
        self._replay: Replay | None = None
        self._replayed = 0
        # Live events held while replaying (None: not replaying), and
        # whether a RESET is among them (it ends the replay).
        self._stash: list[Invalidation | WatchEvent] | None = None
        self._reset_held = False

    def wants(self, change: Invalidation) -> bool:
        # A whole-namespace invalidation (key None) concerns every prefix.
        return change.key is None or change.key.startswith(self.key_prefix)

    @property
    def resume_token(self) -> str:
        """Where the stream is, as of the last event read."""
        return resume_token.encode(self._sent)

    def offer_change(self, change: Invalidation) -> None:
        """A change of a watched namespace, live (from the instance's feed)."""
        if self._stash is not None:
            self._hold(change)
            return
        partitions = self._offered[change.namespace]
        if change.position and 0 <= change.partition < len(partitions):
            if not is_newer(change.position, partitions[change.partition]):
                return  # already passed (a replayed change received again)
            partitions[change.partition] = change.position
        if self.wants(change):
            self._backlog.offer(WatchEvent(EventKind.INVALIDATED, change))
            self._ready.set()
        elif change.position and not self._backlog.pass_by(
            (change.namespace, change.partition, change.position)
        ):
            self._sent[change.namespace][change.partition] = change.position

    def offer(self, event: WatchEvent) -> None:
        """A RESET (or another event without a change)."""
        if self._stash is not None:
            self._hold(event)
            return
        self._backlog.offer(event)
        self._ready.set()

    def _hold(self, item: Invalidation | WatchEvent) -> None:
        """Keep a live event for after the replay, within the backlog's bound."""
        assert self._stash is not None
        if len(self._stash) >= self._max_backlog:
            self._stash = [OVERFLOW]
            self._reset_held = True
        self._stash.append(item)
        self._reset_held = self._reset_held or isinstance(item, WatchEvent)

    def start_replay(self, replay: Replay) -> None:
        """Send *replay*'s changes first; live events wait until it ends."""
        self._replay = replay
        self._stash = []

    def move_to(self, positions: Mapping[str, Sequence[str]]) -> None:
        """Positions after a RESET this watcher was given (too_old): the
        stream continues from them."""
        for name, partitions in positions.items():
            self._offered[name] = list(partitions)

    async def next(self, heartbeat: float) -> WatchEvent:
        """The next event, or HEARTBEAT after *heartbeat* seconds of quiet."""
        if self._replay is not None:
            event = await self._next_replayed()
            if event is not None:
                return event
        while (taken := self._backlog.take_with_passed()) is None:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), heartbeat)
            except TimeoutError:
                return HEARTBEAT
        event, passed = taken
        if event.kind is EventKind.RESET:
            self._sent = {name: list(p) for name, p in self._offered.items()}
        elif event.change is not None and event.change.position:
            self._advance(event.change.namespace, event.change.partition, event.change.position)
        for advance in passed:
            self._advance(*advance)
        return event

    def _advance(self, namespace: str, partition: int, position: str) -> None:
        partitions = self._sent[namespace]
        if 0 <= partition < len(partitions) and is_newer(position, partitions[partition]):
            partitions[partition] = position

    async def _next_replayed(self) -> WatchEvent | None:
        """The next event of the replay, or None once it is over."""
        replay = self._replay
        assert replay is not None
        while True:
            if self._reset_held:
                # A RESET (resubscribed, overflow) while replaying covers it all.
                self._end_replay()
                return None
            change = await replay.next()
            if self._reset_held:
                continue
            if change is None:
                if replay.too_old:
                    instruments.watch_resumes.add(1, {"cache.outcome": "too_old"})
                    self.move_to(replay.upto)
                    self._backlog.offer(TOO_OLD)
                    self._end_replay()
                    return None
                instruments.watch_resumes.add(1, {"cache.outcome": "resumed"})
                resumed = WatchEvent(EventKind.RESUMED, replayed=self._replayed)
                self._end_replay()
                return resumed
            self._offered[change.namespace][change.partition] = change.position
            self._sent[change.namespace][change.partition] = change.position
            if self.wants(change):
                self._replayed += 1
                return WatchEvent(EventKind.INVALIDATED, change)

    def _end_replay(self) -> None:
        stash, self._stash, self._replay = self._stash or [], None, None
        self._reset_held = False
        for item in stash:
            if isinstance(item, WatchEvent):
                self.offer(item)
            else:
                self.offer_change(item)

    @property
    def backlog(self) -> int:
        return len(self._backlog)


class WatchHub:
    """Routes every invalidation this instance applies to the watchers."""

    def __init__(self, *, max_backlog: int = 1000) -> None:
        self._max_backlog = max_backlog
        self._by_namespace: defaultdict[str, set[Watcher]] = defaultdict(set)
        self._sources: dict[str, ReplaySource] = {}

    def add_source(self, namespace: str, source: ReplaySource) -> None:
        """Where *namespace*'s positions and log are (its feed)."""
        self._sources[namespace] = source

    def partitions(self, namespaces: Iterable[str]) -> dict[str, int]:
        return {name: len(self._positions(name)) for name in namespaces}

    def _positions(self, namespace: str) -> list[str]:
        source = self._sources.get(namespace)
        return list(source.positions) if source is not None else [NONE]

    @asynccontextmanager
    async def watch(
        self, namespaces: Iterable[str], key_prefix: str, token: str = ""
    ) -> AsyncIterator[Watcher]:
        """A watcher of *namespaces* from now (RESET subscribed first), or,
        with *token*, from where that token says (raises InvalidToken)."""
        names = frozenset(namespaces)
        resumed = resume_token.decode(token, self.partitions(names)) if token else None
        # Registered in one step with taking the instance's positions: every
        # change after them reaches this watcher live.
        upto = {name: self._positions(name) for name in names}
        watcher = Watcher(names, key_prefix, self._max_backlog, resumed or upto)
        if resumed is None:
            watcher.offer(SUBSCRIBED)
        else:
            watcher.start_replay(Replay(resumed, upto, self._sources))
        for name in names:
            self._by_namespace[name].add(watcher)
        try:
            yield watcher
        finally:
            for name in names:
                watchers = self._by_namespace[name]
                watchers.discard(watcher)
                if not watchers:
                    del self._by_namespace[name]

    def publish(self, change: Invalidation) -> None:
        if change.reason == FILL:
            return  # not a change
        for watcher in self._by_namespace.get(change.namespace, ()):
            watcher.offer_change(change)

    def reset(self, namespace: str) -> None:
        """This instance missed events of *namespace* that the log could not
        replay: its watchers get RESET(resubscribed) and continue from the
        instance's new positions."""
        positions = {namespace: self._positions(namespace)}
        for watcher in self._by_namespace.get(namespace, ()):
            watcher.move_to(positions)
            watcher.offer(RESUBSCRIBED)

    def __len__(self) -> int:
        return len({w for watchers in self._by_namespace.values() for w in watchers})
