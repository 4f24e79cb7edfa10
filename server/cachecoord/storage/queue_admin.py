"""Redis access for the operator commands on write-behind queues
(operations.py): what the queues and their readers look like, and the dead
letters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from cachecoord.storage import envelope
from cachecoord.storage.breaker import CircuitBreaker, guarded
from cachecoord.storage.keys import KeySpace
from cachecoord.storage.redis_store import EntryStore
from cachecoord.storage.write_behind_store import GROUP


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A write PostgreSQL rejected max_attempts times, with the error."""

    id: str
    """Its id in the dead-letter stream (what replay and drop take)."""
    key: str
    version: int
    kind: str
    """``value``, ``delete``, or ``revert`` (a key's move back to PostgreSQL's row)."""
    payload: bytes
    error: str
    dead_at: float
    """Unix time it was dead-lettered."""
    reverted_to: int
    """The version the key moved on to (holding PostgreSQL's row); 0 if a
    newer write had replaced the rejected one already."""
    tag_prefix: bytes = b""
    """The write's tags and the tag clock read before it (envelope.py)."""

    @classmethod
    def parse(cls, entry_id: Any, fields: dict[bytes, bytes]) -> DeadLetter:
        return cls(
            id=_text(entry_id),
            key=fields[b"k"].decode(),
            version=int(fields[b"v"]),
            kind=_KINDS.get(fields.get(b"t", b""), "value"),
            payload=fields.get(b"p", b""),
            tag_prefix=fields.get(b"g", b""),
            error=fields.get(b"error", b"").decode(errors="replace"),
            dead_at=_id_ms(entry_id) / 1000,
            reverted_to=int(fields.get(b"reverted_to", b"0") or 0),
        )


_KINDS = {b"v": "value", b"n": "delete", b"r": "revert"}


@dataclass(frozen=True, slots=True)
class Reader:
    """A consumer of one queue (a flusher), as Redis reports it."""

    name: str
    pending: int
    idle_ms: int


class QueueAdmin:
    """One write-behind namespace's queues and dead letters, for an operator;
    shares the client, key space and breaker of *entries*."""

    def __init__(self, entries: EntryStore) -> None:
        self._client = entries.client
        self._keys: KeySpace = entries.keys
        self.breaker: CircuitBreaker = entries.breaker

    @property
    def queues(self) -> list[str]:
        return self._keys.queues

    @guarded
    async def cached_version(self, key: str) -> int | None:
        """The version of the key's cached value, None if none is cached."""
        raw: Any = await self._client.get(self._keys.value(key))
        return None if raw is None else envelope.decode(raw).version

    @guarded
    async def length(self, stream: str) -> int:
        """Entries in a queue or the dead-letter stream."""
        return int(await self._client.xlen(stream))

    @guarded
    async def oldest_ms(self, queue: str) -> int | None:
        """When the oldest entry of *queue* was added (Unix ms), None if empty."""
        first: Any = await self._client.xrange(queue, count=1)
        return _id_ms(first[0][0]) if first else None

    @guarded
    async def readers(self, queue: str) -> list[Reader]:
        """The consumers of *queue* (none while no flusher ever started)."""
        try:
            replies: Any = await self._client.xinfo_consumers(queue, GROUP)
        except ResponseError:
            return []  # no group yet
        return [
            Reader(_text(reply["name"]), int(reply["pending"]), int(reply["idle"]))
            for reply in replies
        ]

    @guarded
    async def dead_letters(self, ids: Sequence[str] | None, limit: int | None) -> list[DeadLetter]:
        """The dead letters, oldest first (only *ids* when given; at most
        *limit*, or all of them with None)."""
        stream = self._keys.dead_letters
        entries: list[Any] = []
        if ids:
            for entry_id in ids:
                entries += await self._client.xrange(stream, min=entry_id, max=entry_id) or []
        else:
            entries = await self._client.xrange(stream, count=limit) or []
        return [DeadLetter.parse(entry_id, fields) for entry_id, fields in entries if fields]

    @guarded
    async def drop_dead_letters(self, ids: Sequence[str]) -> int:
        """Delete dead letters; how many there were."""
        return int(await self._client.xdel(self._keys.dead_letters, *ids))


def _id_ms(entry_id: Any) -> int:
    """When a stream entry was added (Unix ms), from its id."""
    return int(_text(entry_id).split("-")[0])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
