"""Versioned keys (design 3.3, ``invalidation = "version"``): the Redis key of a
cached value includes its key's generation, and Invalidate bumps the
generation instead of deleting. The old entry stays in Redis, unreachable,
until it expires.

PostgreSQL is changed behind cachecoord's back to tell the generations apart:
the old cached copy says b"cached", the database says b"changed".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio
from strategy_support import cached_value, redis_client, serving, unique_namespace

from cachecoord.storage.keys import KeySpace
from cachecoord_client import AsyncClient, Layer
from conftest import settings_for
from local_servers import PostgresServer, RedisServer

CACHE_ASIDE = unique_namespace("versioned_ca")
WRITE_THROUGH = unique_namespace("versioned_wt")
NAMESPACES = f"""
[namespaces.{CACHE_ASIDE}]
kind = "managed"
strategy = "cache-aside"
invalidation = "version"

[namespaces.{WRITE_THROUGH}]
kind = "managed"
strategy = "write-through"
invalidation = "version"
"""


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def versioned(
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[AsyncClient]:
    """A client of an instance serving the two versioned namespaces."""
    tmp: Path = tmp_path_factory.mktemp("versioned")
    settings = settings_for(tmp, redis_server.url, postgres_server.dsn, namespaces=NAMESPACES)
    async with serving(settings) as (_, client):
        yield client


async def change_behind_cachecoord(dsn: str, namespace: str, key: str, value: bytes) -> None:
    """Update the row directly, as another program would: nothing is invalidated."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute(
            "UPDATE cachecoord.entries SET value = %s WHERE namespace = %s AND key = %s",
            (value, namespace, key),
        )


async def generation(url: str, namespace: str, key: str) -> int:
    async with redis_client(url) as client:
        return int(await client.get(KeySpace(namespace).generation(key)) or 0)


@pytest.mark.parametrize(
    "namespace", [CACHE_ASIDE, WRITE_THROUGH], ids=["cache-aside", "write-through"]
)
async def test_invalidate_makes_the_old_entry_unreachable_but_leaves_it(
    versioned: AsyncClient,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    key: str,
    namespace: str,
) -> None:
    version = await versioned.put(namespace, key, b"cached")
    await versioned.get(namespace, key)
    await change_behind_cachecoord(postgres_server.dsn, namespace, key, b"changed")
    before = await versioned.get(namespace, key)
    old = await generation(redis_server.url, namespace, key)

    await versioned.invalidate(namespace, [key])
    after = await versioned.get(namespace, key)
    again = await versioned.get(namespace, key)
    batch = await versioned.batch_get(namespace, [key])

    assert (before.value, before.layer) == (b"cached", Layer.REDIS)
    assert await generation(redis_server.url, namespace, key) == old + 1
    # The old entry is never served again: the next Get is a database load...
    assert (after.value, after.version, after.layer) == (b"changed", version, Layer.DATABASE)
    assert (again.value, again.layer) == (b"changed", Layer.REDIS)
    assert (batch[0].value, batch[0].layer) == (b"changed", Layer.REDIS)
    # ...while the old entry itself is still in Redis, under the old generation.
    old_key = f"{KeySpace(namespace).value(key)}:g{old}"
    assert await cached_value(redis_server.url, old_key) == b"cached"


@pytest.mark.parametrize(
    "namespace", [CACHE_ASIDE, WRITE_THROUGH], ids=["cache-aside", "write-through"]
)
async def test_put_in_versioned_namespace_is_read_back_with_its_version(
    versioned: AsyncClient, key: str, namespace: str
) -> None:
    first = await versioned.put(namespace, key, b"one")
    await versioned.get(namespace, key)
    second = await versioned.put(namespace, key, b"two")

    got = await versioned.get(namespace, key)
    deleted = await versioned.delete(namespace, key)

    assert second > first
    assert (got.value, got.version) == (b"two", second)
    assert deleted.deleted
    assert not (await versioned.get(namespace, key)).found
