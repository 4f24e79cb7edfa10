"""Cache-aside end to end: Redis, then PostgreSQL, fill, invalidate on write."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import psycopg
import pytest
import redis

from cachecoord.storage.keys import KeySpace
from cachecoord_client import AsyncClient, Layer
from local_servers import PostgresServer, RedisServer


async def next_message(pubsub: Any, wait: float = 2.0) -> Any:
    """The next published message (skipping subscribe confirmations)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while loop.time() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            return message
    return None


@pytest.fixture
def sql_log(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every SQL statement the in-process server executes (a spy, not a fake)."""
    statements: list[str] = []
    original = psycopg.AsyncCursor.execute

    async def execute(self: psycopg.AsyncCursor[Any], query: Any, *args: Any, **kw: Any) -> Any:
        statements.append(query if isinstance(query, str) else query.as_string(None))
        return await original(self, query, *args, **kw)

    monkeypatch.setattr(psycopg.AsyncCursor, "execute", execute)
    return statements


async def test_get_of_mapped_row_is_its_json(client: AsyncClient) -> None:
    got = await client.get("users", "1")
    assert got.found
    row = json.loads(got.value)
    assert row["id"] == 1
    assert row["name"] == "Ada Lovelace"


async def test_first_get_loads_from_database_then_hits_redis(client: AsyncClient, key: str) -> None:
    await client.put("blobs", key, b"v1")
    first = await client.get("blobs", key)
    second = await client.get("blobs", key)
    assert (first.layer, second.layer) == (Layer.DATABASE, Layer.REDIS)
    assert first.value == second.value == b"v1"
    assert first.version == second.version
    assert 0 < second.ttl_ms <= 5 * 60 * 1000 * 1.1


async def test_missing_key_is_not_found_and_not_an_empty_value(
    client: AsyncClient, key: str
) -> None:
    await client.put("blobs", f"{key}-empty", b"")
    missing = await client.get("blobs", key)
    empty = await client.get("blobs", f"{key}-empty")
    assert not missing.found
    assert empty.found
    assert empty.value == b""
    # The "not found" is cached too, and still not found.
    assert not (await client.get("blobs", key)).found


async def test_put_then_get_returns_new_value_and_higher_version(
    client: AsyncClient, key: str
) -> None:
    v1 = await client.put("blobs", key, b"one")
    await client.get("blobs", key)  # cache it
    v2 = await client.put("blobs", key, b"two")
    got = await client.get("blobs", key)
    assert v2 > v1
    assert (got.value, got.version) == (b"two", v2)


async def test_put_to_mapped_namespace_updates_only_given_columns(
    client: AsyncClient, new_user_id: Any
) -> None:
    user = new_user_id()
    await client.put("users", user, json.dumps({"name": "Edsger", "karma": 3}).encode())
    await client.put("users", user, json.dumps({"karma": 5}).encode())
    row = json.loads((await client.get("users", user)).value)
    assert (row["id"], row["name"], row["karma"]) == (int(user), "Edsger", 5)


async def test_delete_removes_row_and_cached_copy(client: AsyncClient, key: str) -> None:
    created = await client.put("blobs", key, b"x")
    await client.get("blobs", key)
    deleted = await client.delete("blobs", key)
    again = await client.delete("blobs", key)
    assert deleted.deleted
    assert deleted.version > created
    assert not again.deleted
    assert not (await client.get("blobs", key)).found
    # A key re-created after a delete gets a higher version than the delete's.
    assert await client.put("blobs", key, b"y") > deleted.version


async def test_ttl_expiry_reloads_from_database(
    client: AsyncClient, key: str, redis_server: RedisServer
) -> None:
    await client.put("short", key, b"v")
    assert (await client.get("short", key)).layer is Layer.DATABASE
    assert (await client.get("short", key)).layer is Layer.REDIS
    r = redis.Redis.from_url(redis_server.url)
    try:
        for _ in range(100):
            if not await asyncio.to_thread(r.exists, KeySpace("short").value(key)):
                break
            await asyncio.sleep(0.05)
    finally:
        r.close()
    assert (await client.get("short", key)).layer is Layer.DATABASE


async def test_batch_get_mixes_hits_and_misses_with_one_sql_query(
    client: AsyncClient, key: str, sql_log: list[str]
) -> None:
    keys = [f"{key}-{i}" for i in range(6)]
    for k in keys[:4]:
        await client.put("blobs", k, k.encode())
    for k in keys[:2]:
        await client.get("blobs", k)  # now cached
    sql_log.clear()
    entries = await client.batch_get("blobs", [*keys, keys[0]])
    loads = [s for s in sql_log if "cachecoord.entries" in s]
    assert len(loads) == 1, sql_log
    assert [e.key for e in entries] == [*keys, keys[0]]
    assert [e.found for e in entries] == [True, True, True, True, False, False, True]
    assert [e.layer for e in entries[:4]] == [Layer.REDIS] * 2 + [Layer.DATABASE] * 2
    assert entries[2].value == keys[2].encode()
    # The misses were filled: now every existing key is a Redis hit.
    again = await client.batch_get("blobs", keys[:4])
    assert {e.layer for e in again} == {Layer.REDIS}


async def test_invalidate_drops_cached_copy_and_publishes(
    client: AsyncClient, key: str, redis_server: RedisServer
) -> None:
    await client.put("blobs", key, b"v")
    await client.get("blobs", key)
    r = redis.asyncio.Redis.from_url(redis_server.url)
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("cc:inv:blobs")
    try:
        assert await client.invalidate("blobs", [key]) == 1
        message = await next_message(pubsub)
    finally:
        await pubsub.aclose()
        await r.aclose()
    assert message is not None
    event = json.loads(message["data"])
    assert (event["namespace"], event["key"], event["reason"]) == ("blobs", key, "invalidate")
    assert event["origin"]
    assert time.time() - 5 < event["at"] <= time.time()  # when it was published
    assert (await client.get("blobs", key)).layer is Layer.DATABASE


async def test_invalidate_all_drops_every_key_of_the_namespace_only(
    client: AsyncClient, key: str
) -> None:
    await client.put("short", key, b"s")
    await client.get("short", key)
    await client.put("blobs", key, b"b")
    await client.get("blobs", key)
    assert await client.invalidate("short", all=True) >= 1
    assert (await client.get("short", key)).layer is Layer.DATABASE
    assert (await client.get("blobs", key)).layer is Layer.REDIS


async def test_write_is_published_with_its_version(
    client: AsyncClient, key: str, redis_server: RedisServer
) -> None:
    r = redis.asyncio.Redis.from_url(redis_server.url)
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("cc:inv:blobs")
    try:
        version = await client.put("blobs", key, b"v")
        message = await next_message(pubsub)
    finally:
        await pubsub.aclose()
        await r.aclose()
    assert message is not None
    event = json.loads(message["data"])
    assert (event["key"], event["version"], event["reason"]) == (key, version, "put")


async def test_concurrent_puts_get_distinct_increasing_versions(
    client: AsyncClient, key: str
) -> None:
    versions = await asyncio.gather(*(client.put("blobs", key, b"%d" % i) for i in range(20)))
    assert len(set(versions)) == 20
    latest = await client.get("blobs", key)
    assert latest.version == max(versions)


async def test_database_is_source_of_truth_for_written_values(
    client: AsyncClient, key: str, postgres_server: PostgresServer
) -> None:
    version = await client.put("blobs", key, b"durable")
    async with await psycopg.AsyncConnection.connect(postgres_server.dsn) as conn:
        cur = await conn.execute(
            "SELECT e.value, v.version FROM cachecoord.entries e JOIN cachecoord.versions v "
            "USING (namespace, key) WHERE namespace = 'blobs' AND key = %s",
            (key,),
        )
        assert await cur.fetchone() == (b"durable", version)
