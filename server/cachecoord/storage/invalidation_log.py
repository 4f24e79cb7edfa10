"""A namespace's invalidation log in Redis: one Redis Stream per partition
(keys.py), appended to by the script that makes each change (ANNOUNCE in
scripts.py), bounded by length and age.

A *position* is a stream entry id (``<ms>-<seq>``). Entries hold the change's
message (field ``m``, the JSON of invalidation/messages.py without its
position). A stream created to take a position from (:meth:`positions`) is
created empty (``XADD ... MAXLEN 0``): its last-generated id is then the
position, and no entry carries it.

Whether the log still reaches back to a position is decided from facts read
here (:class:`PartitionState`) by :func:`cachecoord.invalidation.positions.reaches_back`.
Redis 7.0's ``max-deleted-entry-id`` does not move when a stream is
trimmed (only XDEL moves it), so the test is instead whether the entry at
the position is still there (the log is trimmed from its head only).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from cachecoord.storage.breaker import CircuitBreaker, guarded
from cachecoord.storage.keys import KeySpace
from cachecoord.storage.scripts import ANNOUNCE_ALL

# KEYS: log. Creates the stream with a marker entry if it does not exist.
# Returns its last-generated id.
_POSITION = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.call('XADD', KEYS[1], '*', 'b', '')
end
redis.setresp(3)
return redis.call('XINFO', 'STREAM', KEYS[1])['map']['last-generated-id']
"""

# KEYS: log. ARGV: position. Returns {exists (0|1), last-generated id,
# whether the entry at the position is there (0|1)}.
_STATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, '', 0} end
redis.setresp(3)
local last = redis.call('XINFO', 'STREAM', KEYS[1])['map']['last-generated-id']
local at = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
return {1, last, #at}
"""


@dataclass(frozen=True, slots=True)
class LogBounds:
    """How much of a namespace's log is kept (namespace settings log_*)."""

    max_entries: int = 10_000
    max_age_ms: int = 600_000


@dataclass(frozen=True, slots=True)
class PartitionState:
    """What the log of one partition holds, as far as a position is concerned."""

    exists: bool
    last: str
    """The stream's last-generated id ('' if it does not exist)."""
    holds_position: bool
    """Whether the entry at the position asked about is still in the stream."""


@dataclass(frozen=True, slots=True)
class LogEntry:
    partition: int
    position: str
    message: bytes


class InvalidationLog:
    """One namespace's log partitions."""

    def __init__(
        self,
        client: Any,
        keys: KeySpace,
        bounds: LogBounds,
        *,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.bounds = bounds
        self.breaker = breaker or CircuitBreaker(failures=5, cooldown_ms=1000)
        register = client.register_script
        self._position = register(_POSITION)
        self._state = register(_STATE)
        self._announce_all = register(ANNOUNCE_ALL)

    @property
    def partitions(self) -> int:
        return self.keys.partitions

    def announce_args(self, partition: int) -> list[int]:
        """The last arguments of every script that announces a change in
        *partition* (ANNOUNCE in scripts.py)."""
        return [partition, self.bounds.max_entries, self.bounds.max_age_ms]

    @guarded
    async def announce(self, partition: int, message: bytes) -> str:
        """Announce a change that no entry script made (a tag's invalidation)
        in *partition*'s log; its position."""
        position = await self._announce_all(
            keys=[self.keys.log_of(partition)],
            args=[self.keys.channel_of(partition), message, *self.announce_args(partition)],
        )
        return _text(position)

    async def announce_all(self, message: bytes) -> list[str]:
        """Announce a whole-namespace change in every partition's log (one
        script per partition: each log is on its own slot); the positions."""
        return [await self.announce(p, message) for p in range(self.partitions)]

    @guarded
    async def positions(self) -> list[str]:
        """The current position of every partition (a missing stream is created)."""
        return [
            _text(await self._position(keys=[self.keys.log_of(p)], args=[]))
            for p in range(self.partitions)
        ]

    @guarded
    async def state(self, partition: int, position: str) -> PartitionState:
        """What the log of *partition* holds ('' asks about no position: 0-0,
        an id no entry has)."""
        exists, last, held = await self._state(
            keys=[self.keys.log_of(partition)], args=[position or "0-0"]
        )
        return PartitionState(bool(exists), _text(last), bool(held))

    async def read_after(
        self, partition: int, after: str, upto: str = "+", *, chunk: int = 500
    ) -> AsyncIterator[LogEntry]:
        """The changes of *partition* after position *after* (exclusive) up to
        *upto* (inclusive), oldest first, read *chunk* entries at a time."""
        start = f"({after}"
        while True:
            entries = await self._range(self.keys.log_of(partition), start, upto, chunk)
            for entry_id, fields in entries:
                message = fields.get(b"m")
                if message is not None:
                    yield LogEntry(partition, _text(entry_id), message)
            if len(entries) < chunk:
                return
            start = f"({_text(entries[-1][0])}"

    @guarded
    async def _range(self, log: str, start: str, end: str, count: int) -> Any:
        return await self.client.xrange(log, min=start, max=end, count=count)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
