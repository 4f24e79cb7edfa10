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
from cachecoord.storage import envelope
from cachecoord.storage.breaker import CircuitBreaker, guarded
from cachecoord.storage.keys import KeySpace
from cachecoord.storage.redis_store import EntryStore, queue_script
from cachecoord.storage.scripts import ENVELOPE

GROUP = "cachecoord"
"""The consumer group of every queue: one, shared by every instance's flusher."""

_WRITE_BODY = """
local current = redis.call('GET', KEYS[1])
local previous, visible = 0, 0
if current then
  local kind
  previous, kind = envelope_version_and_tag(current)
  if kind == 'v' or kind == 'V' then visible = previous end
end
local expected = tonumber(ARGV[3])
if expected >= 0 then
  if not current then return {-2, 0} end
  if visible ~= expected then return {0, visible} end
end
if redis.call('XLEN', KEYS[3]) >= tonumber(ARGV[4]) then return {-1, 0} end
local now = redis.call('TIME')
local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
local version = string.format('%.0f', math.max(previous + 1, clock))
local fresh_until = string.format('%.0f', math.floor(clock / 1000) + tonumber(ARGV[6]))
redis.call('SET', KEYS[1], envelope_dirty(version, fresh_until, ARGV[2], ARGV[1]))
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[3], '*', 'k', ARGV[7], 'v', version, 't', ARGV[2], 'p', ARGV[1],
  'c', ARGV[8])
redis.call('PUBLISH', ARGV[5], ARGV[9] .. version .. ARGV[10])
return {1, tonumber(version)}
"""

# Value, enqueue (XADD) and invalidation message in one script, so a Put is
# acknowledged only when both the value and its queue entry exist.
# KEYS: value, lease, queue. ARGV: payload, kind (v|n), expected version (-1:
# none), queue bound, channel, fresh ms, key, traceparent of the Put (so the
# flush span can link to it), message before and after its version.
# Returns {1, version} written, {0, current} version conflict, {-1, 0} queue
# full, {-2, 0} not cached (the caller loads the key, then retries).
WRITE = ENVELOPE + _WRITE_BODY

# WRITE, run only if the key is still at the version the dead lettering left
# it at (ARGV[11]; an absent value passes: the caller checked PostgreSQL's
# version). KEYS and ARGV 1-10 as WRITE.
# Returns as WRITE, or {0, current} when the key was written since.
REPLAY = (
    ENVELOPE
    + """
local head = redis.call('GET', KEYS[1])
if head then
  local seen = envelope_version(head)
  if seen ~= tonumber(ARGV[11]) then return {0, seen} end
end
"""
    + _WRITE_BODY
)

# Give a flushed value its TTL, unless a newer write replaced it meanwhile;
# with ARGV[3], replace it by the row as PostgreSQL stored it (defaults and
# all) under the same version.
# KEYS: value. ARGV: flushed version, px, replacement envelope ('' none).
# Returns 'OK' if settled, 0 if the value was rewritten or is gone.
SETTLE = (
    ENVELOPE
    + """
local current = redis.call('GET', KEYS[1])
if current and envelope_version(current) == tonumber(ARGV[1]) then
  if ARGV[3] ~= '' then return redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2]) end
  return redis.call('SET', KEYS[1], envelope_clean(current), 'PX', ARGV[2])
end
return 0
"""
)

# A dead-lettered write never reaches PostgreSQL. If it is still the key's
# latest write (or Redis lost the key), the key moves on to a *new* version,
# numbered like every write-behind write (max(previous + 1, Redis clock in
# µs)), holding the row PostgreSQL has: dropping the value instead would make
# reads fall back to PostgreSQL's older version, and versions go backwards.
# The value is queued like a write (kind 'r': its flush only moves
# PostgreSQL's version of the key up to it), so it stays dirty (no TTL) until
# PostgreSQL's version has caught up, and a compare-and-set against the
# rejected version fails. Any in-flight fill is cancelled (lease deleted).
# KEYS: value, lease, queue. ARGV: rejected version, kind (v|n), PostgreSQL's
# row, fresh ms, channel, key, message before and after its version.
# Returns the new version, or 0 if a newer write replaced the rejected one.
REVERT = (
    ENVELOPE
    + """
local current = redis.call('GET', KEYS[1])
local previous = tonumber(ARGV[1])
if current then
  if envelope_version(current) ~= previous then return 0 end
end
local now = redis.call('TIME')
local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
local version = string.format('%.0f', math.max(previous + 1, clock))
local fresh_until = string.format('%.0f', math.floor(clock / 1000) + tonumber(ARGV[4]))
redis.call('SET', KEYS[1], envelope_dirty(version, fresh_until, ARGV[2], ARGV[3]))
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[3], '*', 'k', ARGV[6], 'v', version, 't', 'r', 'p', '', 'c', '')
redis.call('PUBLISH', ARGV[5], ARGV[7] .. version .. ARGV[8])
return tonumber(version)
"""
)


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

    @classmethod
    def parse(cls, entry_id: Any, fields: dict[bytes, bytes]) -> DeadLetter:
        return cls(
            id=_text(entry_id),
            key=fields[b"k"].decode(),
            version=int(fields[b"v"]),
            kind=_KINDS.get(fields.get(b"t", b""), "value"),
            payload=fields.get(b"p", b""),
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
    ) -> WriteOutcome:
        """Write *payload* (kind ``v``, or ``n`` for a deletion) as the key's
        new dirty value and queue it, announcing *message* under the new
        version; with *expected*, only if the key's visible version is that
        (0: absent). With *wait_replicas*, WAIT for them (up to 1 s) on the
        script's connection. With *replay_of*, only if the key is still at
        that version (a dead letter's replay)."""
        head, tail = message.encode_around_version()
        names = [self._keys.value(key), self._keys.lease(key), self._keys.queue(key)]
        arguments: list[Any] = [
            payload,
            kind,
            -1 if expected is None else expected,
            queue_bound,
            self._keys.channel,
            fresh_ms,
            key,
            traceparent,
            head,
            tail,
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
            [self._keys.value(key), self._keys.lease(key), self._keys.queue(key)],
            [
                rejected_version,
                "n" if row is None else "v",
                row or b"",
                fresh_ms,
                self._keys.channel,
                key,
                head,
                tail,
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

    @guarded
    async def cached_version(self, key: str) -> int | None:
        """The version of the key's cached value, None if none is cached."""
        raw: Any = await self._client.get(self._keys.value(key))
        return None if raw is None else envelope.decode(raw).version

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

    # -- operator commands (operations.py) -----------------------------------

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
    return int(_text(entry_id).split("-")[0])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
