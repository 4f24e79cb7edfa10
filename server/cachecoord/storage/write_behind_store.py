"""Redis access for write-behind namespaces: the write that values and queues
a Put in one script, and the queues (Redis Streams, one per partition, one
consumer group) the flusher reads, acknowledges and dead-letters.

Queued ("dirty") values are stored without TTL, so Redis cannot evict them,
and get their TTL once flushed (SETTLE). Versions are ``max(previous + 1,
Redis clock in microseconds)``: they keep increasing even after Redis lost its
data, so a write made then still beats what PostgreSQL holds. Every call goes
through the namespace's circuit breaker and raises redis-py's errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import ResponseError

from cachecoord.invalidation.messages import Invalidation
from cachecoord.storage.breaker import CircuitBreaker, guarded
from cachecoord.storage.envelope import parse_tag_prefix
from cachecoord.storage.keys import KeySpace
from cachecoord.storage.redis_store import EntryStore, queue_script
from cachecoord.storage.write_behind_scripts import REPLAY, REVERT, SETTLE, WRITE

GROUP = "cachecoord"
"""The consumer group of every queue: one, shared by every instance's flusher."""


class WriteStatus(enum.IntEnum):
    """How a write script ended."""

    WRITTEN = 1
    CONFLICT = 0
    """The key is at another version (the reply carries it)."""
    QUEUE_FULL = -1
    NOT_CACHED = -2
    """A compare-and-set on a key Redis does not hold: load it, then retry."""


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    status: WriteStatus
    version: int
    """The new version (WRITTEN) or the current one (CONFLICT)."""
    replicas: int = 0
    """Replicas that acknowledged the write (when asked to wait for them)."""


@dataclass(frozen=True, slots=True)
class Queued:
    """One queue entry: a write waiting for PostgreSQL."""

    queue: str
    id: str
    key: str
    version: int
    kind: str  # "v" value, "n" deletion, "r" revert (a new version of the row PostgreSQL has)
    payload: bytes
    traceparent: str = ""
    tag_prefix: bytes = b""
    """The value's tags and tag clock (envelope.py tag_prefix; empty: none)."""

    @property
    def tags(self) -> tuple[str, ...]:
        return parse_tag_prefix(self.tag_prefix)[0]

    @classmethod
    def parse(cls, queue: str, entry_id: Any, fields: dict[bytes, bytes]) -> Queued:
        return cls(
            queue=queue,
            id=_text(entry_id),
            key=fields[b"k"].decode(),
            version=int(fields[b"v"]),
            kind=fields[b"t"].decode(),
            payload=fields[b"p"],
            traceparent=fields.get(b"c", b"").decode(),
            tag_prefix=fields.get(b"g", b""),
        )


@dataclass(frozen=True, slots=True)
class Pending:
    """A queue entry read by a consumer and not acknowledged."""

    queue: str
    id: str
    consumer: str
    idle_ms: int
    deliveries: int


@dataclass(frozen=True, slots=True)
class QueueDepth:
    depth: int
    oldest_age_s: float
    pending: int
    dead_letters: int


@dataclass(frozen=True, slots=True)
class Settle:
    """A flushed write whose cached value gets its TTL."""

    key: str
    version: int
    ttl_ms: int
    replacement: bytes = b""
    """The envelope of the row as PostgreSQL stored it, or empty: keep the value."""


class WriteBehindStore:
    """One write-behind namespace's values and queues in Redis; shares the
    client, key space and circuit breaker of the namespace's EntryStore."""

    def __init__(self, entries: EntryStore) -> None:
        self._entries = entries
        self._client = entries.client
        self._keys: KeySpace = entries.keys
        self.breaker: CircuitBreaker = entries.breaker
        register = self._client.register_script
        self._write = register(WRITE)
        self._replay = register(REPLAY)
        self._settle = register(SETTLE)
        self._revert = register(REVERT)

    @property
    def queues(self) -> list[str]:
        return self._keys.queues

    def _announce_args(self, key: str) -> list[int]:
        return self._entries.log.announce_args(self._keys.partition(key))

    # -- writes --------------------------------------------------------------

    async def write(
        self,
        key: str,
        payload: bytes,
        kind: str,
        *,
        expected: int | None,
        queue_bound: int,
        fresh_ms: int,
        message: Invalidation,
        traceparent: str = "",
        wait_replicas: int = 0,
        replay_of: int | None = None,
        tag_prefix: bytes = b"",
    ) -> WriteOutcome:
        """Write *payload* (kind ``v``, or ``n`` for a deletion) as the key's
        new dirty value and queue it, announcing *message* under the new
        version; with *expected*, only if the key's visible version is that
        (0: absent). With *wait_replicas*, WAIT for them (up to 1 s) on the
        script's connection. With *replay_of*, only if the key is still at
        that version (a dead letter's replay). *tag_prefix*: the value's tags
        and tag clock (envelope.py), kept in its envelope and queued with it."""
        head, tail = message.encode_around_version()
        names = [
            self._keys.value(key),
            self._keys.lease(key),
            self._keys.queue(key),
            self._keys.log(key),
        ]
        arguments: list[Any] = [
            payload,
            kind,
            -1 if expected is None else expected,
            queue_bound,
            self._keys.channel_of(self._keys.partition(key)),
            fresh_ms,
            key,
            traceparent,
            head,
            tail,
            tag_prefix,
            *self._announce_args(key),
        ]
        script = self._write
        if replay_of is not None:
            script = self._replay
            arguments.append(replay_of)
        acked = 0
        if wait_replicas:
            (status, version), acked = await self._entries.run_and_wait(
                script, names, arguments, wait_replicas, 1000
            )
        else:
            status, version = await self._entries.run(script, names, arguments)
        return WriteOutcome(WriteStatus(int(status)), int(version), acked)

    async def revert(
        self,
        key: str,
        rejected_version: int,
        row: bytes | None,
        *,
        fresh_ms: int,
        message: Invalidation,
    ) -> int:
        """Move the key on from its rejected write to a new version holding
        *row* (PostgreSQL's; None: absent), queued; the new version, or 0 if a
        newer write replaced the rejected one (see REVERT)."""
        head, tail = message.encode_around_version()
        reverted = await self._entries.run(
            self._revert,
            [
                self._keys.value(key),
                self._keys.lease(key),
                self._keys.queue(key),
                self._keys.log(key),
            ],
            [
                rejected_version,
                "n" if row is None else "v",
                row or b"",
                fresh_ms,
                self._keys.channel_of(self._keys.partition(key)),
                key,
                head,
                tail,
                *self._announce_args(key),
            ],
        )
        return int(reverted)

    @guarded
    async def settle(self, settles: Sequence[Settle]) -> None:
        """Give flushed values their TTL (SETTLE), in one pipeline."""
        async with self._client.pipeline(transaction=False) as pipe:
            for item in settles:
                await queue_script(
                    pipe,
                    self._settle,
                    [self._keys.value(item.key)],
                    [item.version, item.ttl_ms, item.replacement],
                )
            await pipe.execute()

    # -- queues --------------------------------------------------------------

    @guarded
    async def read_new(self, consumer: str, count: int, block_ms: int | None) -> list[Queued]:
        """Entries no consumer has read yet, up to *count* (waiting up to
        *block_ms* for some; None: not at all). Creates the consumer group on
        first use (or after Redis lost its data) and then returns none."""
        client = self._client
        replies: Any
        try:
            if isinstance(client, RedisCluster):
                # The partitions' queues live in different slots (shards), and
                # one XREADGROUP may only name streams of one slot: read each
                # with its own call, all at once.
                queues = self._keys.queues
                per_queue = max(1, count // len(queues))
                parts = await asyncio.gather(
                    *(
                        client.xreadgroup(
                            GROUP, consumer, streams={q: ">"}, count=per_queue, block=block_ms
                        )
                        for q in queues
                    )
                )
                replies = [reply for part in parts for reply in part or []]
            else:
                replies = await client.xreadgroup(
                    GROUP,
                    consumer,
                    streams=dict.fromkeys(self._keys.queues, ">"),
                    count=count,
                    block=block_ms,
                )
        except ResponseError as err:
            if "NOGROUP" not in str(err):
                raise
            await self._create_groups()
            return []
        return [
            Queued.parse(queue.decode(), entry_id, fields)
            for queue, entries in replies or []
            for entry_id, fields in entries
            if fields
        ]

    async def _create_groups(self) -> None:
        for queue in self._keys.queues:
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                await self._client.xgroup_create(queue, GROUP, id="0", mkstream=True)

    @guarded
    async def pending(self, queue: str, count: int, idle_ms: int) -> list[Pending]:
        """Up to *count* entries of *queue* read at least *idle_ms* ago and not
        acknowledged (none while the group does not exist)."""
        try:
            replies: Any = await self._client.xpending_range(
                queue, GROUP, min="-", max="+", count=count, idle=idle_ms
            )
        except ResponseError:
            return []  # no group yet
        return [
            Pending(
                queue=queue,
                id=_text(item["message_id"]),
                consumer=_text(item["consumer"]),
                idle_ms=int(item["time_since_delivered"]),
                deliveries=int(item["times_delivered"]),
            )
            for item in replies
        ]

    @guarded
    async def claim(
        self, queue: str, consumer: str, min_idle_ms: int, ids: Sequence[str]
    ) -> list[Queued]:
        """Take the pending entries *ids* over for *consumer* (XCLAIM); the
        ones that still exist."""
        claimed: Any = await self._client.xclaim(
            queue, GROUP, consumer, min_idle_time=min_idle_ms, message_ids=list(ids)
        )
        return [Queued.parse(queue, entry_id, fields) for entry_id, fields in claimed if fields]

    @guarded
    async def acknowledge(self, entries: Sequence[Queued]) -> None:
        """Acknowledge and delete flushed (or dead-lettered) entries, and
        forget their errors."""
        by_queue: defaultdict[str, list[str]] = defaultdict(list)
        for entry in entries:
            by_queue[entry.queue].append(entry.id)
        if not by_queue:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for queue, ids in by_queue.items():
                pipe.xack(queue, GROUP, *ids)
                pipe.xdel(queue, *ids)
                pipe.hdel(self._keys.errors, *ids)
            await pipe.execute()

    @guarded
    async def record_errors(self, errors: dict[str, str]) -> None:
        """Remember why PostgreSQL rejected entries (entry id -> error)."""
        await self._client.hset(self._keys.errors, mapping=errors)  # type: ignore[arg-type]

    @guarded
    async def error_of(self, entry_id: str) -> str | None:
        """Why PostgreSQL rejected the entry, None if it never did."""
        error: Any = await self._client.hget(self._keys.errors, entry_id)
        return error.decode() if error else None

    @guarded
    async def add_dead_letter(self, entry: Queued, error: str, reverted_to: int) -> None:
        await self._client.xadd(
            self._keys.dead_letters,
            {
                "k": entry.key,
                "v": entry.version,
                "t": entry.kind,
                "p": entry.payload,
                "g": entry.tag_prefix,
                "error": error,
                "queue": entry.queue,
                "id": entry.id,
                "reverted_to": reverted_to,
            },
        )

    @guarded
    async def depth(self) -> QueueDepth:
        """Queue depth, the oldest queued write's age, pending entries and
        dead letters."""
        queues = self._keys.queues
        async with self._client.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.xlen(queue)
                pipe.xrange(queue, count=1)
                pipe.xpending(queue, GROUP)
            pipe.xlen(self._keys.dead_letters)
            replies = await pipe.execute(raise_on_error=False)
        lengths, firsts, pendings = replies[0:-1:3], replies[1:-1:3], replies[2:-1:3]
        oldest = [int(entries[0][0].split(b"-")[0]) for entries in firsts if entries]
        age = time.time() - min(oldest) / 1000 if oldest else 0.0
        return QueueDepth(
            depth=sum(int(n) for n in lengths),
            oldest_age_s=max(0.0, age),
            pending=sum(int(p["pending"]) for p in pendings if isinstance(p, dict)),
            dead_letters=int(replies[-1]),
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
