"""Operator operations on the write-behind queues and their dead letters.

They read and write Redis (and PostgreSQL, for a replay) directly, with the
server's configuration and key names (storage/keys.py); no instance has to
answer. ``cachecoord queue`` and ``cachecoord dead-letters`` (cli_operator.py)
print what they return.

A replay goes through the normal write-behind path: the dead-lettered value
is written again as a new write (the same script as a Put: a new version,
queued, announced on the invalidation channel), and a flusher writes it to
PostgreSQL under the usual version guard. It is refused when the key was
written since it was dead-lettered: a newer write always wins.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ResponseError

from cachecoord.config import ConfigError, NamespaceSettings, Settings, StrategyName
from cachecoord.storage import envelope
from cachecoord.storage.keys import KeySpace
from cachecoord.strategies.flusher import GROUP
from cachecoord.strategies.write_behind import WRITE

RedisClient = Redis | RedisCluster

# The Put script, run only if the key is still at the version the dead
# lettering left it at (ARGV[12]; an absent value passes: the caller checked
# PostgreSQL's version). KEYS and ARGV 1-11 as WRITE (strategies/write_behind.py).
# Returns {1, version} written, {0, current} written since, {-1, 0} queue full.
REPLAY = (
    """
local head = redis.call('GET', KEYS[1])
if head then
  local seen = string.match(head, '^(%d+):')
  if seen ~= ARGV[12] then return {0, tonumber(seen)} end
end
"""
    + WRITE
)


@dataclass(frozen=True, slots=True)
class Consumer:
    """A flusher (one per instance and namespace) reading the queues."""

    name: str
    pending: int
    """Entries it has read and not yet acknowledged (being flushed, or failing)."""
    idle_ms: int
    """Time since it last read; long for an instance that died."""


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """The write-behind queues of one namespace."""

    namespace: str
    depth: int
    """Writes waiting for PostgreSQL (read by a flusher or not)."""
    pending: int
    """Of those, read by a flusher and not yet acknowledged."""
    oldest_age_s: float | None
    """Age of the oldest waiting write; None when the queues are empty."""
    dead_letters: int
    max_queue: int
    partitions: int
    consumers: list[Consumer] = field(default_factory=list)


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


@dataclass(frozen=True, slots=True)
class Replayed:
    """What a replay did with one dead letter."""

    id: str
    key: str
    outcome: str
    """``replayed`` (queued again, as version ``version``), ``superseded``
    (the key was written since: left alone, ``version`` is the key's),
    ``missing`` (no such dead letter) or ``not-replayable`` (a revert: it
    carries no value)."""
    version: int = 0


def write_behind(settings: Settings, names: list[str]) -> dict[str, NamespaceSettings]:
    """The write-behind namespaces among *names* (all of them when empty)."""
    behind = {
        name: ns
        for name, ns in settings.namespaces.items()
        if ns.strategy is StrategyName.WRITE_BEHIND
    }
    unknown = [name for name in names if name not in behind]
    if unknown:
        raise ConfigError(
            f"not a write-behind namespace of this configuration: {', '.join(unknown)}; "
            f"write-behind namespaces: {', '.join(behind) or '(none)'}"
        )
    return {name: behind[name] for name in names} if names else behind


def keyspace(ns: NamespaceSettings) -> KeySpace:
    return KeySpace(ns.name, ns.partitions)


async def queue_status(client: RedisClient, ns: NamespaceSettings) -> QueueStatus:
    keys = keyspace(ns)
    depth = pending = 0
    oldest_ms: int | None = None
    consumers: dict[str, Consumer] = {}
    for queue in keys.queues:
        depth += int(await client.xlen(queue))
        first: Any = await client.xrange(queue, count=1)
        if first:
            ms = _id_ms(first[0][0])
            oldest_ms = ms if oldest_ms is None else min(oldest_ms, ms)
        try:
            readers: Any = await client.xinfo_consumers(queue, GROUP)
        except ResponseError:
            continue  # no group yet: no flusher ever started
        for reader in readers:
            name = _text(reader["name"])
            seen = consumers.get(name)
            count, idle = int(reader["pending"]), int(reader["idle"])
            pending += count
            consumers[name] = (
                Consumer(name, count, idle)
                if seen is None
                else Consumer(name, seen.pending + count, min(seen.idle_ms, idle))
            )
    return QueueStatus(
        namespace=ns.name,
        depth=depth,
        pending=pending,
        oldest_age_s=None if oldest_ms is None else max(0.0, time.time() - oldest_ms / 1000),
        dead_letters=int(await client.xlen(keys.dead_letters)),
        max_queue=ns.max_queue,
        partitions=ns.partitions,
        consumers=sorted(consumers.values(), key=lambda c: c.name),
    )


async def dead_letters(
    client: RedisClient,
    ns: NamespaceSettings,
    ids: list[str] | None = None,
    limit: int | None = 1000,
) -> list[DeadLetter]:
    """The namespace's dead letters, oldest first (only *ids* when given; at
    most *limit*, or all of them with None)."""
    stream = keyspace(ns).dead_letters
    entries: list[Any] = []
    if ids:
        for entry_id in ids:
            entries += await client.xrange(stream, min=entry_id, max=entry_id) or []
    else:
        entries = await client.xrange(stream, count=limit) or []
    return [_dead_letter(entry_id, fields) for entry_id, fields in entries if fields]


async def drop(client: RedisClient, ns: NamespaceSettings, ids: list[str]) -> int:
    """Delete dead letters; how many there were."""
    if not ids:
        return 0
    return int(await client.xdel(keyspace(ns).dead_letters, *ids))


async def replay(
    client: RedisClient, database_url: str, ns: NamespaceSettings, ids: list[str]
) -> list[Replayed]:
    """Write dead letters again as new writes (see the module docstring);
    replayed ones leave the dead-letter stream."""
    keys = keyspace(ns)
    script = client.register_script(REPLAY)
    origin = f"cli-{socket.gethostname()}-{os.getpid()}"
    found = {letter.id: letter for letter in await dead_letters(client, ns, ids)}
    results = []
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for entry_id in ids:
            letter = found.get(entry_id)
            if letter is None:
                results.append(Replayed(entry_id, "", "missing"))
                continue
            if letter.kind == "revert":
                results.append(Replayed(entry_id, letter.key, "not-replayable"))
                continue
            current = await _current_version(client, conn, keys, letter.key)
            if not letter.reverted_to or current != letter.reverted_to:
                results.append(Replayed(entry_id, letter.key, "superseded", current))
                continue
            kind = "n" if letter.kind == "delete" else "v"
            status, version = await script(
                keys=[keys.value(letter.key), keys.lease(letter.key), keys.queue(letter.key)],
                args=[
                    letter.payload,
                    kind,
                    -1,
                    max(1, ns.max_queue // ns.partitions),
                    keys.channel,
                    ns.ttl,
                    ns.name,
                    letter.key,
                    "delete" if kind == "n" else "put",
                    origin,
                    "",
                    letter.reverted_to,
                ],
            )
            if int(status) == -1:
                raise QueueFull(f"the write-behind queue of namespace {ns.name!r} is full")
            if int(status) == 0:
                results.append(Replayed(entry_id, letter.key, "superseded", int(version)))
                continue
            await client.xdel(keys.dead_letters, entry_id)
            results.append(Replayed(entry_id, letter.key, "replayed", int(version)))
    return results


class QueueFull(Exception):
    """A replay found the namespace's queue full."""


async def _current_version(
    client: RedisClient, conn: psycopg.AsyncConnection[Any], keys: KeySpace, key: str
) -> int:
    """The key's newest version: its cached value's, else PostgreSQL's record."""
    raw: Any = await client.get(keys.value(key))
    if raw is not None:
        return envelope.decode(raw).version
    cur = await conn.execute(
        "SELECT version FROM cachecoord.versions WHERE namespace = %s AND key = %s",
        (keys.namespace, key),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


def _dead_letter(entry_id: Any, fields: dict[bytes, bytes]) -> DeadLetter:
    return DeadLetter(
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


def _id_ms(entry_id: Any) -> int:
    return int(_text(entry_id).split("-")[0])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
