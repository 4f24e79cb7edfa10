"""The seed article's cache-aside, the baseline of the stampede benchmark.

``getUserProfile``: GET from Redis; on a miss, SELECT from PostgreSQL and SET
the row with an expiry (``EX 3600``). No lease, no single-flight, no
coordination of any kind: the code every service writes by hand, which
cachecoord replaces. It runs in the benchmark's own process with the usual
asyncio clients: redis.asyncio (over a blocking pool, as cachecoord's; on a
Redis Cluster, redis.asyncio's cluster client) and a psycopg pool opened in
full before the measurement.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import cast

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from bench.cluster import AsyncRedis
from bench.slow_rows import KEY, NAIVE_QUERY

EXPIRY_S = 3600


@dataclass(frozen=True, slots=True)
class NaiveAnswer:
    value: str | None
    loaded: bool
    """True when this call read PostgreSQL (a cache miss)."""


class NaiveCacheAside:
    """``getUserProfile(userId)`` of the article, with these clients."""

    def __init__(
        self, redis_client: AsyncRedis, pool: AsyncConnectionPool[AsyncConnection]
    ) -> None:
        self.redis = redis_client
        self.pool = pool

    @staticmethod
    def cache_key(user_id: str) -> str:
        return f"user:{user_id}:profile"

    async def get_user_profile(self, user_id: str) -> NaiveAnswer:
        key = self.cache_key(user_id)
        cached = cast("bytes | None", await self.redis.get(key))
        if cached is not None:
            return NaiveAnswer(cached.decode(), loaded=False)
        async with self.pool.connection() as conn:
            cur = await conn.execute(NAIVE_QUERY, (int(user_id),))
            row = await cur.fetchone()
        if row is None:
            return NaiveAnswer(None, loaded=True)
        await self.redis.set(key, row[0], ex=EXPIRY_S)
        return NaiveAnswer(str(row[0]), loaded=True)


@asynccontextmanager
async def naive_cache_aside(
    client: AsyncRedis, database_url: str, *, redis_connections: int, db_connections: int
) -> AsyncIterator[NaiveCacheAside]:
    """The naive client over *client* (closed at the end) with its connection
    pools open: *redis_connections* connections to the node of the row's key
    and every PostgreSQL connection are made up front, as in a service that
    has been running for a while."""
    pool: AsyncConnectionPool[AsyncConnection] = AsyncConnectionPool(
        database_url, min_size=db_connections, max_size=db_connections, open=False, timeout=60
    )
    try:
        await pool.open(wait=True, timeout=30)
        key = NaiveCacheAside.cache_key(KEY)
        await asyncio.gather(*(client.exists(key) for _ in range(redis_connections)))
        yield NaiveCacheAside(client, pool)
    finally:
        await pool.close()
        await client.aclose()
