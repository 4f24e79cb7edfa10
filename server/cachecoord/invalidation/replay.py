"""Replaying the invalidation log to a Watch stream that resumes from a token.

The stream is registered for live events in the same step as the instance's
positions (*upto*: every change up to them has been applied here, every later
one will reach the stream live). The replay sends the changes of each
partition after the token's position up to *upto*, read from the log and
merged across partitions by position (the order they were made in, as far
as Redis' clock tells; exactly per key); live
events wait until it is over and skip what it sent. So nothing is missed
and nothing sent twice, and every change sent has been applied here. If the
log no longer reaches back to one of the token's positions (or the instance
has no position yet), nothing is replayed: the stream gets RESET(too_old).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Protocol

from cachecoord.errors import Unavailable
from cachecoord.invalidation.messages import Invalidation
from cachecoord.invalidation.positions import is_newer, order, reaches_back
from cachecoord.storage.errors import RedisError
from cachecoord.storage.invalidation_log import LogEntry, PartitionState

_log = logging.getLogger(__name__)


class LogReader(Protocol):
    def state(self, partition: int, position: str) -> Awaitable[PartitionState]: ...

    def read_after(
        self, partition: int, after: str, upto: str = "+", *, chunk: int = 500
    ) -> AsyncIterator[LogEntry]: ...


class ReplaySource(Protocol):
    """A namespace as this instance follows it (feed.py)."""

    @property
    def positions(self) -> Sequence[str]:
        """The position of the last change applied here, per partition."""
        ...

    @property
    def log(self) -> LogReader: ...


class Replay:
    """The changes after *since* up to *upto* (namespace -> position per
    partition), one at a time."""

    def __init__(
        self,
        since: Mapping[str, Sequence[str]],
        upto: Mapping[str, Sequence[str]],
        sources: Mapping[str, ReplaySource],
    ) -> None:
        self.since = since
        self.upto = upto
        self._sources = sources
        self._entries: AsyncIterator[Invalidation] | None = None
        self.too_old = False

    async def next(self) -> Invalidation | None:
        """The next change, None when there is none left (or the log does
        not reach back: then :attr:`too_old`). Raises Unavailable if Redis
        cannot be read."""
        try:
            if self._entries is None:
                if not await self._reaches_back():
                    self.too_old = True
                    return None
                self._entries = self._changes()
            change = await anext(self._entries, None)
        except RedisError as err:
            raise Unavailable(f"cannot read the invalidation log from Redis: {err}") from err
        return change

    async def _reaches_back(self) -> bool:
        for name, positions in sorted(self.since.items()):
            source = self._sources.get(name)
            if source is None:
                return False
            for partition, position in enumerate(positions):
                if not self.upto[name][partition]:
                    return False  # this instance has no position: it cannot tell
                if not is_newer(self.upto[name][partition], position):
                    continue  # nothing to replay; later changes come live
                if not reaches_back(await source.log.state(partition, position), position):
                    return False
        return True

    async def _changes(self) -> AsyncIterator[Invalidation]:
        partitions = [
            changes_after(self._sources[name].log, partition, position, self.upto[name][partition])
            for name, positions in sorted(self.since.items())
            for partition, position in enumerate(positions)
            if is_newer(self.upto[name][partition], position)
        ]
        async for change in merged(partitions):
            yield change


async def changes_after(
    log: LogReader, partition: int, after: str, upto: str = "+"
) -> AsyncIterator[Invalidation]:
    """The changes of one partition after *after* up to *upto*, oldest first."""
    async for entry in log.read_after(partition, after, upto):
        try:
            message = Invalidation.decode(entry.message)
        except (ValueError, KeyError, TypeError):
            _log.warning("ignoring a malformed log entry: %.200r", entry.message)
            continue
        yield message.at_position(partition, entry.position)


async def merged(partitions: Sequence[AsyncIterator[Invalidation]]) -> AsyncIterator[Invalidation]:
    """The changes of several partitions merged by position: in the order
    they were made as far as Redis' clock tells (exactly per key; across
    partitions, and a cluster's nodes, as far as their clocks agree and a
    millisecond's ties allow)."""
    heads: list[tuple[tuple[int, int], int, Invalidation]] = []
    for i, changes in enumerate(partitions):
        if (change := await anext(changes, None)) is not None:
            heads.append((order(change.position), i, change))
    heapq.heapify(heads)
    while heads:
        _, i, change = heapq.heappop(heads)
        yield change
        if (following := await anext(partitions[i], None)) is not None:
            heapq.heappush(heads, (order(following.position), i, following))
