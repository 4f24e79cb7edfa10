"""Redis and PostgreSQL outages, driven by killing and restarting the real servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import psycopg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from cachecoord.app import App
from cachecoord.config import Duration
from cachecoord.storage.keys import KeySpace
from cachecoord_client import AsyncClient, CacheCoordError, Layer
from conftest import SCHEMA, settings_for
from local_servers import PostgresServer, RedisServer

NAMESPACES = """
[namespaces.blobs]
kind = "managed"
ttl = "5m"

[namespaces.brief]
kind = "managed"
ttl = "200ms"
ttl_jitter = 0
stale_if_error = "1h"

[namespaces.sessions]
kind = "managed"
strategy = "write-through"

[namespaces.queued]
kind = "managed"
strategy = "write-behind"
flush_interval = "50ms"
retry_after = "100ms"
"""


@dataclass
class Stack:
    redis: RedisServer
    postgres: PostgresServer
    app: App
    client: AsyncClient


@pytest_asyncio.fixture(loop_scope="session")
async def stack(tmp_path: Path, server_dirs: Callable[[str], Path]) -> AsyncIterator[Stack]:
    """An instance with a Redis and a PostgreSQL of its own, to kill at will."""
    redis_server = RedisServer(tmp_path / "redis")
    postgres = PostgresServer(server_dirs("postgres"))
    await asyncio.to_thread(redis_server.start)
    await asyncio.to_thread(postgres.start)
    async with await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True) as conn:
        await conn.execute(SCHEMA.encode())
    settings = settings_for(tmp_path, redis_server.url, postgres.dsn, namespaces=NAMESPACES)
    settings = replace(
        settings,
        redis=replace(settings.redis, breaker_failures=3, breaker_cooldown=Duration(300)),
        postgres=replace(settings.postgres, pool_timeout=Duration(500)),
    )
    app = App(settings)
    await app.start()
    client = AsyncClient(f"127.0.0.1:{app.port}", default_timeout=10)
    yield Stack(redis_server, postgres, app, client)
    await client.close()
    await app.stop()
    await asyncio.to_thread(redis_server.stop)
    await asyncio.to_thread(postgres.stop)


async def test_breaker_skips_a_dead_redis_and_probes_until_it_is_back(stack: Stack) -> None:
    await stack.client.put("blobs", "b", b"v")
    await stack.client.get("blobs", "b")
    breaker = stack.app.cache.strategy("blobs").store.breaker if stack.app.cache else None
    assert breaker is not None
    await asyncio.to_thread(stack.redis.kill)
    for _ in range(5):
        got = await stack.client.get("blobs", "b")
        assert (got.value, got.layer) == (b"v", Layer.DATABASE)
    assert breaker.is_open
    await asyncio.to_thread(stack.redis.restart)
    for _ in range(100):
        if (await stack.client.get("blobs", "b")).layer is Layer.REDIS:
            break
        await asyncio.sleep(0.05)
    assert not breaker.is_open
    assert (await stack.client.get("blobs", "b")).layer is Layer.REDIS


async def test_postgres_outage_serves_cached_values_and_fails_misses_fast(stack: Stack) -> None:
    client = stack.client
    await client.put("blobs", "cached", b"c")
    await client.get("blobs", "cached")
    await client.put("brief", "old", b"o")
    await client.get("brief", "old")
    await asyncio.sleep(0.3)  # "old" is now past its 200 ms TTL (kept for stale-if-error)
    await asyncio.to_thread(stack.postgres.kill)
    try:
        hit = await client.get("blobs", "cached")
        assert (hit.value, hit.layer, hit.stale) == (b"c", Layer.REDIS, False)
        stale = await client.get("brief", "old")
        assert (stale.value, stale.stale) == (b"o", True)
        # The server's own answer is timed: a client without gRPC's retries
        # (the Python client retries a Get on UNAVAILABLE by default).
        once = AsyncClient(f"127.0.0.1:{stack.app.port}", options=[("grpc.enable_retries", 0)])
        started = time.monotonic()
        with pytest.raises(CacheCoordError) as missing:
            await once.get("blobs", "never-cached")
        elapsed = time.monotonic() - started
        await once.close()
        assert missing.value.code is grpc.StatusCode.UNAVAILABLE
        assert elapsed < 3
        with pytest.raises(CacheCoordError) as write:
            await client.put("sessions", "s", b"new")
        assert write.value.code is grpc.StatusCode.UNAVAILABLE
        # Write-behind keeps accepting: the queue is in Redis.
        version = await client.put("queued", "q", b"later")
    finally:
        await asyncio.to_thread(stack.postgres.restart)
    # The pool reconnects by itself; then: nothing half-written by the failed
    # write-through Put...
    for _ in range(100):
        try:
            found = (await client.get("sessions", "s")).found
            break
        except CacheCoordError as err:
            if err.code is not grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.1)
    assert not found
    # ...and the write-behind Put reaches PostgreSQL once it is back.
    for _ in range(100):
        async with await psycopg.AsyncConnection.connect(stack.postgres.dsn) as conn:
            cur = await conn.execute(
                "SELECT v.version FROM cachecoord.entries e JOIN cachecoord.versions v "
                "USING (namespace, key) WHERE namespace = 'queued' AND key = 'q'"
            )
            row = await cur.fetchone()
        if row == (version,):
            break
        await asyncio.sleep(0.1)
    assert row == (version,)


async def test_a_slow_database_is_bounded_by_the_callers_deadline(stack: Stack) -> None:
    async with await psycopg.AsyncConnection.connect(stack.postgres.dsn) as blocker:
        await blocker.execute("LOCK TABLE cachecoord.entries IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(CacheCoordError) as slow:
            await stack.client.get("blobs", "blocked-key", timeout=0.5)
        elapsed = time.monotonic() - started
        await blocker.rollback()
    assert slow.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.5
    # The server is not stuck: the next call works.
    assert not (await stack.client.get("blobs", "blocked-key")).found


async def test_lock_calls_while_redis_is_down_answer_unavailable(stack: Stack) -> None:
    client = stack.client
    held = await client.acquire_lock("outage-lock", ttl_ms=60_000)
    await asyncio.to_thread(stack.redis.kill)
    codes = []
    try:
        for call in (
            client.acquire_lock("another-lock", ttl_ms=1_000),
            client.extend_lock("outage-lock", held.token, ttl_ms=60_000),
            client.release_lock("outage-lock", held.token),
        ):
            with pytest.raises(CacheCoordError) as failed:
                await call
            codes.append(failed.value.code)
    finally:
        await asyncio.to_thread(stack.redis.restart)
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 3


async def test_write_behind_puts_survive_a_postgres_outage_longer_than_their_retries(
    stack: Stack,
) -> None:
    """queued: retry_after 100 ms, max_attempts 5 (the default): the entries
    are redelivered at about 0.1, 0.3, 0.7 and 1.5 s; PostgreSQL stays down 4 s."""
    client = stack.client
    await asyncio.to_thread(stack.postgres.kill)
    try:
        versions = {
            f"down-{i}": await client.put("queued", f"down-{i}", b"acked") for i in range(5)
        }
        await asyncio.sleep(4)  # the outage itself
    finally:
        await asyncio.to_thread(stack.postgres.start)
    partitions = stack.app.settings.namespaces["queued"].partitions
    for _ in range(150):  # until the queue is empty (flushed or dead-lettered), 15 s at most
        if not await queued_writes(stack.redis.url, "queued", partitions):
            break
        await asyncio.sleep(0.1)
    async with await psycopg.AsyncConnection.connect(stack.postgres.dsn) as conn:
        cur = await conn.execute(
            "SELECT e.key, e.value, v.version FROM cachecoord.entries e "
            "JOIN cachecoord.versions v USING (namespace, key) WHERE namespace = 'queued'"
        )
        rows = {key: (bytes(value), version) async for key, value, version in cur}
    reads = {key: await client.get("queued", key) for key in versions}
    assert rows == {key: (b"acked", version) for key, version in versions.items()}
    assert {key: (got.found, got.value) for key, got in reads.items()} == dict.fromkeys(
        versions, (True, b"acked")
    )


async def queued_writes(url: str, namespace: str, partitions: int) -> int:
    """Entries in the namespace's write-behind queues (flushed ones are deleted)."""
    client = aioredis.Redis.from_url(url, protocol=2)
    try:
        return sum(
            [int(await client.xlen(queue)) for queue in KeySpace(namespace, partitions).queues]
        )
    finally:
        await client.aclose()
