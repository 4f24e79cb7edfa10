"""Operator operations on the write-behind queues and their dead letters.

They read and write Redis (through storage/queue_admin.py and
storage/write_behind_store.py) and
PostgreSQL (for a replay) directly, with the server's configuration; no
instance has to answer. ``cachecoord queue`` and ``cachecoord dead-letters`` (cli_operator.py)
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

from cachecoord.config import ConfigError, NamespaceSettings, Settings, StrategyName
from cachecoord.invalidation.messages import Invalidation
from cachecoord.storage.invalidation_log import LogBounds
from cachecoord.storage.keys import KeySpace
from cachecoord.storage.queue_admin import DeadLetter, QueueAdmin
from cachecoord.storage.redis_store import Client, EntryStore
from cachecoord.storage.write_behind_store import WriteBehindStore, WriteStatus

RedisClient = Client


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


def keyspace(ns: NamespaceSettings, *, sharded: bool = False) -> KeySpace:
    """*sharded*: changes go out on shard channels (redis.sharded_pubsub)."""
    return KeySpace(ns.name, ns.partitions, write_behind=True, sharded=sharded)


def _admin(client: RedisClient, ns: NamespaceSettings) -> QueueAdmin:
    return QueueAdmin(EntryStore(client, keyspace(ns), generations=False))


async def queue_status(client: RedisClient, ns: NamespaceSettings) -> QueueStatus:
    store = _admin(client, ns)
    depth = pending = 0
    oldest_ms: int | None = None
    consumers: dict[str, Consumer] = {}
    for queue in store.queues:
        depth += await store.length(queue)
        ms = await store.oldest_ms(queue)
        if ms is not None:
            oldest_ms = ms if oldest_ms is None else min(oldest_ms, ms)
        for reader in await store.readers(queue):
            seen = consumers.get(reader.name)
            pending += reader.pending
            consumers[reader.name] = (
                Consumer(reader.name, reader.pending, reader.idle_ms)
                if seen is None
                else Consumer(
                    reader.name, seen.pending + reader.pending, min(seen.idle_ms, reader.idle_ms)
                )
            )
    return QueueStatus(
        namespace=ns.name,
        depth=depth,
        pending=pending,
        oldest_age_s=None if oldest_ms is None else max(0.0, time.time() - oldest_ms / 1000),
        dead_letters=await store.length(keyspace(ns).dead_letters),
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
    return await _admin(client, ns).dead_letters(ids, limit)


async def drop(client: RedisClient, ns: NamespaceSettings, ids: list[str]) -> int:
    """Delete dead letters; how many there were."""
    if not ids:
        return 0
    return await _admin(client, ns).drop_dead_letters(ids)


async def replay(
    client: RedisClient,
    database_url: str,
    ns: NamespaceSettings,
    ids: list[str],
    *,
    sharded: bool = False,
) -> list[Replayed]:
    """Write dead letters again as new writes (see the module docstring);
    replayed ones leave the dead-letter stream (*sharded*: announced on
    shard channels, as the instances do with redis.sharded_pubsub)."""
    entries = EntryStore(
        client,
        keyspace(ns, sharded=sharded),
        generations=False,
        log_bounds=LogBounds(ns.log_max_entries, ns.log_max_age),
    )
    admin, store = QueueAdmin(entries), WriteBehindStore(entries)
    origin = f"cli-{socket.gethostname()}-{os.getpid()}"
    found = {letter.id: letter for letter in await admin.dead_letters(ids, None)}
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
            current = await _current_version(admin, conn, ns.name, letter.key)
            if not letter.reverted_to or current != letter.reverted_to:
                results.append(Replayed(entry_id, letter.key, "superseded", current))
                continue
            kind = "n" if letter.kind == "delete" else "v"
            reason = "delete" if kind == "n" else "put"
            outcome = await store.write(
                letter.key,
                letter.payload,
                kind,
                expected=None,
                queue_bound=max(1, ns.max_queue // ns.partitions),
                fresh_ms=ns.ttl,
                message=Invalidation(ns.name, letter.key, 0, reason, origin),
                replay_of=letter.reverted_to,
                tag_prefix=letter.tag_prefix,
            )
            if outcome.status is WriteStatus.QUEUE_FULL:
                raise QueueFull(f"the write-behind queue of namespace {ns.name!r} is full")
            if outcome.status is WriteStatus.CONFLICT:
                results.append(Replayed(entry_id, letter.key, "superseded", outcome.version))
                continue
            await admin.drop_dead_letters([entry_id])
            results.append(Replayed(entry_id, letter.key, "replayed", outcome.version))
    return results


class QueueFull(Exception):
    """A replay found the namespace's queue full."""


async def _current_version(
    store: QueueAdmin, conn: psycopg.AsyncConnection[Any], namespace: str, key: str
) -> int:
    """The key's newest version: its cached value's, else PostgreSQL's record."""
    cached = await store.cached_version(key)
    if cached is not None:
        return cached
    cur = await conn.execute(
        "SELECT version FROM cachecoord.versions WHERE namespace = %s AND key = %s",
        (namespace, key),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0
