"""Write-behind: Put writes Redis and a durable queue, then answers; a flusher
writes PostgreSQL later (see flusher.py).

The value write, the enqueue (XADD on a Redis Stream) and the invalidation
message happen in one step (storage/write_behind_store.py), so a Put is
acknowledged only when both the value and its queue entry exist. Queued
("dirty") values are stored without TTL, so Redis cannot evict them (start-up
refuses ``allkeys-*`` eviction), and get their TTL once flushed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import propagate
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from cachecoord import telemetry
from cachecoord.config import NamespaceSettings, QueueFull
from cachecoord.errors import QueueFullError, Unavailable, VersionConflict
from cachecoord.model import Deleted
from cachecoord.storage import envelope
from cachecoord.storage.errors import RedisError
from cachecoord.storage.redis_store import EntryStore
from cachecoord.storage.tables import Table
from cachecoord.storage.write_behind_store import WriteBehindStore, WriteOutcome, WriteStatus
from cachecoord.strategies.base import Backends, Strategy, StrategyKind
from cachecoord.strategies.changes import Changes
from cachecoord.strategies.flusher import Flusher
from cachecoord.strategies.reads import Reader
from cachecoord.strategies.write_through import WriteThrough

_CAS_ATTEMPTS = 20


class WriteBehind:
    """Write-behind's writes (a WritePolicy): Redis and a queue, then the
    answer; PostgreSQL later (flusher.py). When the queue is full, *overflow*
    writes through."""

    def __init__(
        self,
        settings: NamespaceSettings,
        table: Table,
        queue: WriteBehindStore,
        pool: AsyncConnectionPool[AsyncConnection],
        *,
        reader: Reader,
        changes: Changes,
        overflow: WriteThrough,
    ) -> None:
        self._settings = settings
        self._table = table
        self._queue = queue
        self._pool = pool
        self._reader = reader
        self._changes = changes
        self._overflow = overflow
        self._queue_bound = max(1, settings.max_queue // settings.partitions)

    def flusher(self, consumer: str) -> Flusher:
        return Flusher(
            self._settings,
            self._table,
            self._queue,
            self._pool,
            changes=self._changes,
            consumer=consumer,
        )

    async def put(
        self,
        key: str,
        value: bytes,
        expected_version: int | None,
        ttl_ms: int | None,
        tags: Sequence[str] = (),
    ) -> int:
        self._table.prepare(key, value)
        clock = None
        if tags or self._table.tagged:
            # The clock before the write (strategies/tagging.py); if Redis
            # cannot say, the write cannot be made either.
            try:
                clock = await self._reader.store.started_tag_clock()
            except RedisError as err:
                raise Unavailable(f"Redis is unavailable: {err}") from err
        return await self._enqueue(
            key, value, "v", "put", expected_version, ttl_ms, tags=tags, tag_clock=clock
        )

    async def delete(self, key: str, expected_version: int | None) -> Deleted:
        existed = (await self._reader.get(key)).found
        version = await self._enqueue(key, b"", "n", "delete", expected_version, None)
        return Deleted(existed, version)

    async def _enqueue(
        self,
        key: str,
        value: bytes,
        kind: str,
        reason: str,
        expected_version: int | None,
        ttl_ms: int | None,
        *,
        tags: Sequence[str] = (),
        tag_clock: int | None = None,
    ) -> int:
        """Write and queue; a value's tags (given, or derived from the merged
        row of a mapped namespace) go with it when *tag_clock* is given."""
        for _ in range(_CAS_ATTEMPTS):
            expected = expected_version
            payload = value
            if kind == "v" and self._table.merges_rows:
                # A mapped row is written by columns: merge the given columns
                # into the current row, and make that a compare-and-set so a
                # concurrent writer's columns are not lost.
                current = await self._reader.get(key)
                payload = self._merged(key, current.value, value)
                if expected is None:
                    expected = current.version if current.found else 0
                elif expected != (current.version if current.found else 0):
                    raise VersionConflict(key, expected, current.version if current.found else 0)
            prefix = b""
            if tag_clock is not None and kind == "v":
                prefix = envelope.tag_prefix(self._table.row_tags(payload, tags), tag_clock)
            outcome = await self._run_write(key, payload, kind, reason, expected, ttl_ms, prefix)
            if outcome.status is WriteStatus.WRITTEN:
                self._changes.made_here(key, outcome.version)
                self._check_replicas(outcome.replicas)
                return outcome.version
            if outcome.status is WriteStatus.CONFLICT:
                if expected_version is not None:
                    raise VersionConflict(key, expected_version, outcome.version)
                continue  # a concurrent merge won; merge again
            if outcome.status is WriteStatus.QUEUE_FULL:
                return await self._queue_full(key, value, kind, expected_version, ttl_ms, tags)
            await self._reader.get(key)  # not cached: load it, then compare again
        raise Unavailable(f"key {key!r} is written too often concurrently; retry")

    async def _run_write(
        self,
        key: str,
        payload: bytes,
        kind: str,
        reason: str,
        expected: int | None,
        ttl_ms: int | None,
        tag_prefix: bytes,
    ) -> WriteOutcome:
        """Write and queue; with wait_replicas, WAIT for them and report how
        many acknowledged."""
        try:
            return await self._queue.write(
                key,
                payload,
                kind,
                expected=expected,
                queue_bound=self._queue_bound,
                fresh_ms=ttl_ms or self._settings.ttl,
                message=self._changes.message(key, 0, reason),
                traceparent=_traceparent(),
                wait_replicas=self._settings.wait_replicas,
                tag_prefix=tag_prefix,
            )
        except RedisError as err:
            raise Unavailable(
                f"Redis is unavailable; a write-behind Put cannot be made durable: {err}"
            ) from err

    async def _queue_full(
        self,
        key: str,
        value: bytes,
        kind: str,
        expected_version: int | None,
        ttl_ms: int | None,
        tags: Sequence[str] = (),
    ) -> int:
        if self._settings.on_queue_full is QueueFull.REJECT or expected_version is not None:
            raise QueueFullError(
                f"the write-behind queue of namespace {self._settings.name!r} is full "
                f"({self._settings.max_queue} writes waiting for PostgreSQL); retry later"
            )
        # Written through instead, at a version above every queued one (they
        # were numbered by the clock before now), so their later flush is a no-op.
        floor = time.time_ns() // 1000
        if kind == "n":
            return (await self._overflow.delete(key, None, floor=floor)).version
        return await self._overflow.put(key, value, None, ttl_ms, tags, floor=floor)

    def _merged(self, key: str, current: bytes | None, patch: bytes) -> bytes:
        row: dict[str, Any] = {} if current is None else json.loads(current)
        writable = self._table.writable_columns
        merged = {name: value for name, value in row.items() if name in writable}
        merged.update(json.loads(patch))
        return str(self._table.prepare(key, json.dumps(merged).encode())).encode()

    def _check_replicas(self, acked: int) -> None:
        if acked < self._settings.wait_replicas:
            raise Unavailable(
                f"the write reached {acked} of {self._settings.wait_replicas} replicas in 1 s; "
                "it may be lost if the primary fails (it is still queued)"
            )


def _traceparent() -> str:
    if not telemetry.TRACING:
        return ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def build(
    settings: NamespaceSettings, table: Table, store: EntryStore, backends: Backends
) -> Strategy:
    reader = Reader(settings, table, store, backends.pool, origin=backends.origin)
    changes = Changes(settings.name, backends.origin, reader)
    writes = WriteBehind(
        settings,
        table,
        WriteBehindStore(store),
        backends.pool,
        reader=reader,
        changes=changes,
        overflow=WriteThrough(table, store, backends, reader, changes),
    )
    return Strategy(
        settings, table=table, store=store, reader=reader, writes=writes, changes=changes
    )


WRITE_BEHIND = StrategyKind(
    build, partitions=lambda settings: settings.partitions, write_behind=True
)
