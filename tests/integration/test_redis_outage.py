"""Redis failures never fail a read, and never leave a committed write stale."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from cachecoord.app import App
from cachecoord_client import AsyncClient, Layer
from conftest import settings_for
from local_servers import RedisServer


@pytest_asyncio.fixture(loop_scope="session")
async def durable_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A Redis of this test's own, with an append-only file, so that a value
    cached before a crash is still there after the restart."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.stop)


@pytest_asyncio.fixture(loop_scope="session")
async def own_client(
    durable_redis: RedisServer, own_database: str, tmp_path: Path
) -> AsyncIterator[AsyncClient]:
    app = App(settings_for(tmp_path, durable_redis.url, own_database))
    await app.start()
    async with AsyncClient(f"127.0.0.1:{app.port}") as client:
        yield client
    await app.stop()


async def test_get_is_served_from_postgres_while_redis_is_down(
    own_client: AsyncClient, durable_redis: RedisServer, key: str
) -> None:
    await own_client.put("blobs", key, b"v1")
    await asyncio.to_thread(durable_redis.kill)
    got = await own_client.get("blobs", key)
    user = await own_client.get("users", "1")
    batch = await own_client.batch_get("blobs", [key, f"{key}-missing"])
    assert (got.found, got.value, got.layer) == (True, b"v1", Layer.DATABASE)
    assert user.found
    assert [e.found for e in batch] == [True, False]


async def test_write_during_redis_outage_is_invalidated_once_redis_returns(
    own_client: AsyncClient, durable_redis: RedisServer, key: str
) -> None:
    await own_client.put("blobs", key, b"old")
    assert (await own_client.get("blobs", key)).layer is Layer.DATABASE
    assert (await own_client.get("blobs", key)).value == b"old"  # cached, and in the AOF
    await asyncio.to_thread(durable_redis.kill)
    version = await own_client.put("blobs", key, b"new")  # commits; the cache delete fails
    await asyncio.to_thread(durable_redis.restart)
    # The stale copy came back with Redis; the outbox drainer must remove it.
    for _ in range(100):
        got = await own_client.get("blobs", key)
        if got.value == b"new":
            break
        await asyncio.sleep(0.1)
    assert (got.value, got.version) == (b"new", version)
