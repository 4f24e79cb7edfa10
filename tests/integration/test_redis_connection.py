"""Redis connections on uvloop, the loop ``cachecoord serve`` runs on: a
write on a connection whose transport was closed under it fails as
redis-py's ConnectionError (Redis unreachable: UNAVAILABLE, retried by the
background loops), not with uvloop's RuntimeError (which became INTERNAL in
a Put while Redis was being killed). redis-py 8.2 does this itself, which is
why cachecoord no longer wraps its connection classes: these tests fail if a
locked redis-py stops doing it."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis
import uvloop
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from cachecoord.config import RedisSettings
from cachecoord.storage import subscription
from cachecoord.storage.redis_store import connect
from local_servers import RedisCluster, RedisServer


async def _write_on_closed_transport(conn: AbstractConnection) -> None:
    """Close *conn*'s transport the way a reset from Redis does (uvloop closes
    it on the read error), then write on it."""
    await conn.send_command("PING")
    assert await conn.read_response() in (b"PONG", "PONG")
    assert conn._writer is not None
    conn._writer.transport.abort()
    await asyncio.sleep(0)
    with pytest.raises(RedisConnectionError):
        await conn.send_command("PING")


async def _on_a_pooled_connection(client: redis.Redis) -> None:
    conn = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await _write_on_closed_transport(conn)
    finally:
        await client.connection_pool.release(conn)
        await client.aclose()


def test_a_write_on_a_closed_transport_is_a_connection_error(
    redis_server: RedisServer,
) -> None:
    async def cut() -> None:
        client = connect(RedisSettings(url=redis_server.url))
        assert isinstance(client, redis.Redis)
        await _on_a_pooled_connection(client)

    uvloop.run(cut())


def test_the_invalidation_bus_connection_too(redis_server: RedisServer) -> None:
    async def cut() -> None:
        await _on_a_pooled_connection(subscription.connect(redis_server.url))

    uvloop.run(cut())


def test_the_connections_of_every_cluster_node_too(redis_cluster: RedisCluster) -> None:
    async def cut() -> None:
        client = connect(RedisSettings(url=redis_cluster.url, cluster=True))
        assert isinstance(client, redis.RedisCluster)
        try:
            await client.initialize()  # the nodes it discovers
            for node in client.get_nodes():
                conn = node.acquire_connection()
                try:
                    await _write_on_closed_transport(conn)
                finally:
                    node.release(conn)
        finally:
            await client.aclose()

    uvloop.run(cut())
