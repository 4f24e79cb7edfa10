"""The transactional outbox (design 5): an instance that dies between its
PostgreSQL commit and the cache update leaves no stale read behind.

The death is made with a hook, not a sleep: the strategy's ``after_commit``
(the step right after the commit) blocks forever for one key, the Put is
cancelled and the instance stopped. A new instance on the same Redis and
PostgreSQL must then stop serving the old cached copy.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import psycopg
import pytest
from strategy_support import cached_value, named, poll, serving, unique_namespace

from cachecoord.app import App
from cachecoord.config import Settings
from cachecoord.storage.keys import KeySpace
from cachecoord.storage.postgres import RecordedWrite
from cachecoord.strategies.cache_aside import CacheAside
from cachecoord.strategies.write_through import WriteThrough
from conftest import settings_for
from local_servers import PostgresServer, RedisServer


async def outbox_rows(dsn: str, namespace: str, key: str) -> int:
    """Invalidations of the key committed and not yet applied to Redis."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM cachecoord.outbox WHERE namespace = %s AND key = %s",
            (namespace, key),
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def die_after_commit(
    settings: Settings,
    namespace: str,
    key: str,
    strategy: type[CacheAside],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On an instance of its own: write b"old" to *key* and cache it, then
    write b"new" and let the instance die right after that commit."""
    committed, never = asyncio.Event(), asyncio.Event()
    after_commit = strategy.after_commit

    async def dies(self: CacheAside, k: str, recorded: RecordedWrite, *rest: Any) -> None:
        if self.name == namespace and k == key:
            committed.set()
            await never.wait()  # the process is gone: nothing after the commit runs
        await after_commit(self, k, recorded, *rest)

    async with serving(named(settings, "doomed")) as (_, client):
        await client.put(namespace, key, b"old")
        await client.get(namespace, key)  # cached (a fill, or the write itself)
        monkeypatch.setattr(strategy, "after_commit", dies)
        put = asyncio.create_task(client.put(namespace, key, b"new"))
        await asyncio.wait_for(committed.wait(), 5)
        put.cancel()
        await asyncio.gather(put, return_exceptions=True)
    monkeypatch.undo()


async def committed_version(dsn: str, namespace: str, key: str) -> tuple[bytes, int] | None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT e.value, v.version FROM cachecoord.entries e JOIN cachecoord.versions v "
            "USING (namespace, key) WHERE namespace = %s AND key = %s",
            (namespace, key),
        )
        row: Any = await cur.fetchone()
        return None if row is None else (bytes(row[0]), int(row[1]))


@pytest.mark.parametrize(
    ("namespace", "strategy"), [("blobs", CacheAside), ("sessions", WriteThrough)]
)
async def test_instance_dying_between_commit_and_cache_update_leaves_no_stale_read(
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path: Path,
    key: str,
    monkeypatch: pytest.MonkeyPatch,
    namespace: str,
    strategy: type[CacheAside],
) -> None:
    settings = settings_for(tmp_path, redis_server.url, postgres_server.dsn)

    await die_after_commit(settings, namespace, key, strategy, monkeypatch)
    row = await committed_version(postgres_server.dsn, namespace, key)
    stale = await cached_value(redis_server.url, KeySpace(namespace).value(key))
    pending = await outbox_rows(postgres_server.dsn, namespace, key)
    async with serving(named(settings, "recovered")) as (_, client):
        got = await poll(lambda: client.get(namespace, key), lambda g: g.value == b"new", within=8)

    assert row is not None
    assert row[0] == b"new"  # committed
    assert stale == b"old"  # and Redis still held the old copy: a stale read waiting
    assert pending == 1  # the invalidation was left in the outbox
    assert (got.value, got.version) == row


async def test_outbox_rows_are_left_to_the_instances_that_serve_the_namespace(
    app: App,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path: Path,
    key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new namespace is rolled out: ``app`` (the session's instance) still
    runs the old configuration, without it, beside the instances that serve it."""
    ns = unique_namespace("rollout")
    settings = settings_for(
        tmp_path,
        redis_server.url,
        postgres_server.dsn,
        namespaces=f'[namespaces.{ns}]\nkind = "managed"\n',
    )

    await die_after_commit(settings, ns, key, CacheAside, monkeypatch)
    # Time for the old-config instance's drainer to see the row (2 s grace).
    await poll(lambda: outbox_rows(postgres_server.dsn, ns, key), lambda n: n == 0, within=3.5)
    async with serving(named(settings, "recovered")) as (_, client):
        got = await poll(lambda: client.get(ns, key), lambda g: g.value == b"new", within=1.5)

    assert got.value == b"new"
