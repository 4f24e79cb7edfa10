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
from typing import Any

from opentelemetry import propagate
from redis.exceptions import RedisError

from cachecoord import telemetry
from cachecoord.config import NamespaceSettings, QueueFull
from cachecoord.errors import QueueFullError, Unavailable, VersionConflict
from cachecoord.invalidation.messages import Invalidation
from cachecoord.model import Deleted
from cachecoord.storage.write_behind_store import WriteBehindStore, WriteOutcome, WriteStatus
from cachecoord.strategies.write_through import WriteThrough

_CAS_ATTEMPTS = 20


class WriteBehind(WriteThrough):
    """Reads as every strategy; writes through Redis and a queue."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = WriteBehindStore(self.store)
        self._queue_bound = max(1, self.settings.max_queue // self.settings.partitions)

    @classmethod
    def partitions(cls, settings: NamespaceSettings) -> int:
        return settings.partitions

    async def put(
        self, key: str, value: bytes, expected_version: int | None, ttl_ms: int | None
    ) -> int:
        self.table.prepare(key, value)
        return await self._enqueue(key, value, "v", "put", expected_version, ttl_ms)

    async def delete(self, key: str, expected_version: int | None) -> Deleted:
        existed = (await self.get(key)).found
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
    ) -> int:
        for _ in range(_CAS_ATTEMPTS):
            expected = expected_version
            payload = value
            if kind == "v" and self.table.merges_rows:
                # A mapped row is written by columns: merge the given columns
                # into the current row, and make that a compare-and-set so a
                # concurrent writer's columns are not lost.
                current = await self.get(key)
                payload = self._merged(key, current.value, value)
                if expected is None:
                    expected = current.version if current.found else 0
                elif expected != (current.version if current.found else 0):
                    raise VersionConflict(key, expected, current.version if current.found else 0)
            outcome = await self._run_write(key, payload, kind, reason, expected, ttl_ms)
            if outcome.status is WriteStatus.WRITTEN:
                self.changed_here(key, outcome.version)
                self._check_replicas(outcome.replicas)
                return outcome.version
            if outcome.status is WriteStatus.CONFLICT:
                if expected_version is not None:
                    raise VersionConflict(key, expected_version, outcome.version)
                continue  # a concurrent merge won; merge again
            if outcome.status is WriteStatus.QUEUE_FULL:
                return await self._queue_full(key, value, kind, expected_version, ttl_ms)
            await self.get(key)  # not cached: load it, then compare again
        raise Unavailable(f"key {key!r} is written too often concurrently; retry")

    async def _run_write(
        self,
        key: str,
        payload: bytes,
        kind: str,
        reason: str,
        expected: int | None,
        ttl_ms: int | None,
    ) -> WriteOutcome:
        """Write and queue; with wait_replicas, WAIT for them and report how
        many acknowledged."""
        try:
            return await self.queue.write(
                key,
                payload,
                kind,
                expected=expected,
                queue_bound=self._queue_bound,
                fresh_ms=ttl_ms or self.settings.ttl,
                message=Invalidation(self.name, key, 0, reason, self.origin),
                traceparent=_traceparent(),
                wait_replicas=self.settings.wait_replicas,
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
    ) -> int:
        if self.settings.on_queue_full is QueueFull.REJECT or expected_version is not None:
            raise QueueFullError(
                f"the write-behind queue of namespace {self.name!r} is full "
                f"({self.settings.max_queue} writes waiting for PostgreSQL); retry later"
            )
        # Written through instead, at a version above every queued one (they
        # were numbered by the clock before now), so their later flush is a no-op.
        floor = time.time_ns() // 1000
        if kind == "n":
            async with self._write(key, "delete", None, floor) as (conn, recorded):
                await self.table.delete(conn, key)
            await self.after_commit(key, recorded, None, None)
            return recorded.version
        prepared = self.table.prepare(key, value)
        async with self._write(key, "put", None, floor) as (conn, recorded):
            stored = await self.table.write(conn, key, prepared)
        await self.after_commit(key, recorded, stored, ttl_ms)
        return recorded.version

    def _merged(self, key: str, current: bytes | None, patch: bytes) -> bytes:
        row: dict[str, Any] = {} if current is None else json.loads(current)
        writable = self.table.writable_columns
        merged = {name: value for name, value in row.items() if name in writable}
        merged.update(json.loads(patch))
        return str(self.table.prepare(key, json.dumps(merged).encode())).encode()

    def _check_replicas(self, acked: int) -> None:
        if acked < self.settings.wait_replicas:
            raise Unavailable(
                f"the write reached {acked} of {self.settings.wait_replicas} replicas in 1 s; "
                "it may be lost if the primary fails (it is still queued)"
            )


def _traceparent() -> str:
    if not telemetry.TRACING:
        return ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")
