"""Redis access for the cache: the connection pool and the Lua scripts.

Each script touches the keys of a single entry (one hash tag), so all of them
stay valid on Redis Cluster. Scripts are registered once; redis-py sends them
by SHA and reloads them on NOSCRIPT.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import cast

import redis.asyncio as redis

from cachecoord.config import RedisSettings
from cachecoord.storage import keys

# Fill only while the reader's lease is still there: any write or invalidation
# since the lease was granted deleted it (memcache leases, NSDI'13 3.2.1).
FILL = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
return 1
"""

# Drop the cached copy and any lease (so an in-flight fill is rejected), and
# tell every instance; atomically, so no reader sees one without the other.
INVALIDATE = """
local dropped = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return dropped
"""

# Cache a value just written (write-through) unless a newer version is cached.
STORE = """
local current = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[2])
if current then
  local version = tonumber(string.match(current, '^(%d+):'))
  if version and version >= tonumber(ARGV[3]) then
    redis.call('PUBLISH', ARGV[4], ARGV[5])
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""


def connect(settings: RedisSettings) -> redis.Redis:
    """A client over a *blocking* pool: a burst waits up to pool_timeout for a
    connection instead of failing at once. RESP2 is chosen explicitly so reply
    types do not change with redis-py's default protocol."""
    pool = redis.BlockingConnectionPool.from_url(
        settings.url,
        max_connections=settings.max_connections,
        timeout=settings.pool_timeout / 1000,
        socket_timeout=settings.socket_timeout / 1000,
        socket_connect_timeout=settings.socket_timeout / 1000,
        protocol=2,
    )
    return redis.Redis(connection_pool=pool)


class RedisStore:
    """Cache entries in Redis, addressed by namespace and key."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._fill = client.register_script(FILL)
        self._invalidate = client.register_script(INVALIDATE)
        self._store = client.register_script(STORE)

    async def get(self, namespace: str, key: str) -> bytes | None:
        raw = await self.client.get(keys.value_key(namespace, key))
        return cast("bytes | None", raw)

    async def get_many(self, namespace: str, key_list: Sequence[str]) -> list[bytes | None]:
        raws = await self.client.mget([keys.value_key(namespace, k) for k in key_list])
        return cast("list[bytes | None]", raws)

    async def take_leases(
        self, namespace: str, tokens: dict[str, str], lease_ms: int
    ) -> dict[str, bool]:
        """Try to take the lease of each key; True where this caller got it."""
        pipe = self.client.pipeline(transaction=False)
        for key, token in tokens.items():
            pipe.set(keys.lease_key(namespace, key), token, nx=True, px=lease_ms)
        results = await pipe.execute()
        return {key: bool(ok) for key, ok in zip(tokens, results, strict=True)}

    async def fill_many(
        self, namespace: str, fills: dict[str, tuple[str, bytes, int]]
    ) -> dict[str, bool]:
        """Store each ``key -> (lease token, envelope, px)`` if its lease still holds."""
        if not fills:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for key, (token, envelope, px) in fills.items():
            await self._fill(
                keys=[keys.value_key(namespace, key), keys.lease_key(namespace, key)],
                args=[token, envelope, px],
                client=pipe,
            )
        results = await pipe.execute()
        return {key: bool(ok) for key, ok in zip(fills, results, strict=True)}

    async def invalidate(self, namespace: str, messages: dict[str, bytes]) -> int:
        """Drop the entries and leases of ``key -> message`` and publish each
        message; returns how many cached values were dropped."""
        if not messages:
            return 0
        channel = keys.invalidation_channel(namespace)
        pipe = self.client.pipeline(transaction=False)
        for key, message in messages.items():
            await self._invalidate(
                keys=[keys.value_key(namespace, key), keys.lease_key(namespace, key)],
                args=[channel, message],
                client=pipe,
            )
        return sum(int(n) for n in await pipe.execute())

    async def store(
        self, namespace: str, key: str, envelope: bytes, px: int, version: int, message: bytes
    ) -> bool:
        """Cache a freshly written value unless a newer version is already cached."""
        stored = await self._store(
            keys=[keys.value_key(namespace, key), keys.lease_key(namespace, key)],
            args=[envelope, px, version, keys.invalidation_channel(namespace), message],
        )
        return bool(stored)

    async def drop_namespace(self, namespace: str, message: bytes) -> int:
        """Delete every cached key of *namespace* (SCAN, never KEYS) and publish."""
        dropped = 0
        async for batch in _batches(self.client.scan_iter(match=keys.scan_pattern(namespace))):
            dropped += int(await self.client.unlink(*batch))
        await self.client.publish(keys.invalidation_channel(namespace), message)
        return dropped


async def _batches(iterator: AsyncIterator[bytes], size: int = 500) -> AsyncIterator[list[bytes]]:
    batch: list[bytes] = []
    async for item in iterator:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
