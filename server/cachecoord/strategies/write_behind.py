"""Write-behind: Put writes Redis and a durable queue, then answers; a flusher
writes PostgreSQL later (see flusher.py).

The value write, the enqueue (XADD on a Redis Stream) and the invalidation
message happen in one Lua script, so a Put is acknowledged only when both the
value and its queue entry exist. Queued ("dirty") values are stored without
TTL, so Redis cannot evict them (start-up refuses ``allkeys-*`` eviction), and
get their TTL once flushed. Versions are ``max(previous + 1, Redis clock in
microseconds)``: they keep increasing even after Redis lost its data, so a
write made then still beats what PostgreSQL holds.
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
from cachecoord.model import Deleted
from cachecoord.strategies.write_through import WriteThrough

# KEYS: value, lease, queue. ARGV: payload, kind (v|n), expected version (-1:
# none), queue bound, channel, fresh ms, namespace, key, reason, origin,
# traceparent of the Put (so the flush span can link to it).
# Returns {1, version} written, {0, current} version conflict, {-1, 0} queue
# full, {-2, 0} not cached (the caller loads the key, then retries).
WRITE = """
local current = redis.call('GET', KEYS[1])
local previous, visible = 0, 0
if current then
  local v, kind = string.match(current, '^(%d+):%d+:%d+:(.)')
  previous = tonumber(v)
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
-- Upper-case tag: dirty until flushed (see storage/envelope.py); no TTL.
redis.call('SET', KEYS[1], version .. ':' .. fresh_until .. ':0:' .. string.upper(ARGV[2]) ..
  ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[3], '*', 'k', ARGV[8], 'v', version, 't', ARGV[2], 'p', ARGV[1],
  'c', ARGV[11])
redis.call('PUBLISH', ARGV[5], '{"namespace":' .. cjson.encode(ARGV[7]) .. ',"key":' ..
  cjson.encode(ARGV[8]) .. ',"version":' .. version .. ',"reason":' .. cjson.encode(ARGV[9]) ..
  ',"origin":' .. cjson.encode(ARGV[10]) .. ',"at":' .. string.format('%.6f', clock / 1000000) ..
  '}')
return {1, tonumber(version)}
"""

_CAS_ATTEMPTS = 20


class WriteBehind(WriteThrough):
    """Reads as every strategy; writes through Redis and a queue."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._write_script = self.store.client.register_script(WRITE)
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
            status, version, acked = await self._run_write(
                key, payload, kind, reason, expected, ttl_ms
            )
            if status == 1:
                self.changed_here(key, version)
                self._check_replicas(acked)
                return version
            if status == 0:
                if expected_version is not None:
                    raise VersionConflict(key, expected_version, version)
                continue  # a concurrent merge won; merge again
            if status == -1:
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
    ) -> tuple[int, int, int]:
        """Run the write script; with wait_replicas, WAIT on its connection
        and return how many replicas acknowledged (else 0)."""
        keys = self.store.keys
        names = [keys.value(key), keys.lease(key), keys.queue(key)]
        try:
            arguments = [
                payload,
                kind,
                -1 if expected is None else expected,
                self._queue_bound,
                keys.channel,
                ttl_ms or self.settings.ttl,
                self.name,
                key,
                reason,
                self.origin,
                _traceparent(),
            ]
            acked = 0
            if self.settings.wait_replicas:
                (status, version), acked = await self.store.run_and_wait(
                    self._write_script, names, arguments, self.settings.wait_replicas, 1000
                )
            else:
                status, version = await self.store.run(self._write_script, names, arguments)
        except RedisError as err:
            raise Unavailable(
                f"Redis is unavailable; a write-behind Put cannot be made durable: {err}"
            ) from err
        return int(status), int(version), acked

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
