"""Near caches, and changes made to PostgreSQL by other programs.

Every test runs on a Redis and a database of its own (``own_backend``), once
on a single Redis and once on the session's Redis Cluster. The cluster is
shared, so each test maps the ``users`` table under a namespace of its own:
cached rows of other tests' databases are never in the way."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio
from strategy_support import serving, unique_namespace
from watch_support import cut_subscriptions

from cachecoord.app import App, change_triggers
from cachecoord.config import Duration
from cachecoord.storage.keys import KeySpace
from cachecoord_client import AsyncClient, Layer
from conftest import Backend

NEAR = """
[namespaces.{users}]
kind = "mapped"
table = "users"
key_column = "id"
ttl = "5m"
near_cache_entries = 100
near_cache_ttl = "60s"
"""

Start = Callable[[], Awaitable[tuple[App, AsyncClient]]]


@pytest.fixture
def users() -> str:
    """This test's namespace of the ``users`` table."""
    return unique_namespace("users")


@pytest_asyncio.fixture(loop_scope="session")
async def start(own_backend: Backend, users: str, tmp_path: Path) -> AsyncIterator[Start]:
    """Starts instances sharing one Redis and one database; stops them after."""
    running: list[tuple[App, AsyncClient]] = []

    async def start_one() -> tuple[App, AsyncClient]:
        app = App(own_backend.settings(tmp_path, namespaces=NEAR.format(users=users)))
        await app.start()
        client = AsyncClient(f"127.0.0.1:{app.port}")
        running.append((app, client))
        return app, client

    yield start_one
    for app, client in running:
        await client.close()
        await app.stop()


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.02)):
        if await check():
            return True
        await asyncio.sleep(0.02)
    return False


async def name_of(client: AsyncClient, users: str, user: str) -> str:
    got = await client.get(users, user)
    return str(json.loads(got.value)["name"])


async def test_near_cache_serves_repeated_reads_and_reports_its_layer(
    start: Start, users: str
) -> None:
    _, client = await start()
    layers = [(await client.get(users, "2")).layer for _ in range(3)]
    assert layers == [Layer.DATABASE, Layer.NEAR, Layer.NEAR]


async def test_put_on_one_instance_evicts_the_near_cache_of_another(
    start: Start, users: str
) -> None:
    _, reader = await start()
    _, writer = await start()
    await reader.get(users, "3")
    assert (await reader.get(users, "3")).layer is Layer.NEAR
    await writer.put(users, "3", json.dumps({"name": "Rear Admiral Hopper"}).encode())

    async def sees_new_name() -> bool:
        return await name_of(reader, users, "3") == "Rear Admiral Hopper"

    assert await eventually(sees_new_name, seconds=2.0)


async def test_put_here_is_read_back_here_at_once(start: Start, users: str) -> None:
    _, client = await start()
    await client.get(users, "2")
    assert (await client.get(users, "2")).layer is Layer.NEAR
    await client.put(users, "2", json.dumps({"name": "Alan M. Turing"}).encode())
    assert await name_of(client, users, "2") == "Alan M. Turing"


async def test_near_cache_entries_expire_after_near_cache_ttl(
    own_backend: Backend, users: str, tmp_path: Path
) -> None:
    short = NEAR.format(users=users).replace('near_cache_ttl = "60s"', 'near_cache_ttl = "300ms"')
    async with serving(own_backend.settings(tmp_path, namespaces=short)) as (_, client):
        await client.get(users, "1")
        assert (await client.get(users, "1")).layer is Layer.NEAR
        await asyncio.sleep(0.4)  # no invalidation meanwhile: only the TTL
        assert (await client.get(users, "1")).layer is Layer.REDIS


async def test_killed_subscription_keeps_near_cache_entries_not_changed_meanwhile(
    start: Start, users: str, own_backend: Backend
) -> None:
    app, client = await start()
    _, writer = await start()
    for user in ("1", "2"):
        await client.get(users, user)
        assert (await client.get(users, user)).layer is Layer.NEAR

    async with cut_subscriptions(own_backend.kill_pubsub_connections, app):
        # Changed while the instance cannot hear of it: never served from its
        # near cache, neither now nor once it has caught up from the log.
        await writer.put(users, "2", json.dumps({"name": "Changed While Away"}).encode())
        assert await name_of(client, users, "2") == "Changed While Away"
        # While it has not caught up, the near cache serves nothing.
        assert (await client.get(users, "1")).layer is Layer.REDIS
    assert app.bus is not None
    await asyncio.wait_for(app.bus.subscribed.wait(), 5.0)
    changed = await client.get(users, "2")
    assert json.loads(changed.value)["name"] == "Changed While Away"
    # Not changed: still in the near cache, served from it again.
    assert (await client.get(users, "1")).layer is Layer.NEAR


async def test_killed_subscription_flushes_the_near_cache_when_the_log_does_not_reach_back(
    own_backend: Backend, users: str, tmp_path: Path
) -> None:
    # Every entry older than 1 ms is trimmed at each append: the write made
    # while the instance is away removes the entry of its position.
    short = NEAR.format(users=users) + 'log_partitions = 1\nlog_max_age = "1ms"\n'
    async with (
        serving(own_backend.settings(tmp_path, namespaces=short)) as (app, client),
        serving(own_backend.settings(tmp_path, namespaces=short)) as (_, writer),
    ):
        await client.get(users, "1")
        assert (await client.get(users, "1")).layer is Layer.NEAR
        near = app.cache.strategy(users).reader.near if app.cache else None
        assert near is not None
        epoch = near.epoch
        async with cut_subscriptions(own_backend.kill_pubsub_connections, app):
            await asyncio.sleep(0.01)
            await writer.put(users, "2", json.dumps({"name": "Rear Admiral Hopper"}).encode())
            await writer.put(users, "3", json.dumps({"name": "Rear Admiral Hopper"}).encode())
        assert app.bus is not None
        await asyncio.wait_for(app.bus.subscribed.wait(), 5.0)
        assert near.epoch > epoch
        assert len(near) == 0
        assert (await client.get(users, "1")).layer is Layer.REDIS


async def test_update_in_sql_is_invalidated_while_instances_listen(
    start: Start, users: str, own_backend: Backend
) -> None:
    app, client = await start()
    await change_triggers(app.settings, users, "install")
    await client.get(users, "2")
    async with await psycopg.AsyncConnection.connect(own_backend.dsn, autocommit=True) as conn:
        await conn.execute("UPDATE users SET name = 'Alan Turing (SQL)' WHERE id = 2")

    async def sees_sql_update() -> bool:
        return await name_of(client, users, "2") == "Alan Turing (SQL)"

    assert await eventually(sees_sql_update, seconds=2.0)


async def test_update_in_sql_after_the_listener_lost_its_connection_is_invalidated_on_notify(
    own_backend: Backend, users: str, tmp_path: Path
) -> None:
    settings = own_backend.settings(tmp_path, namespaces=NEAR.format(users=users))
    # The drainer's own rounds a minute apart: only a notification can be quick.
    settings = dataclasses.replace(
        settings, postgres=dataclasses.replace(settings.postgres, outbox_interval=Duration(60_000))
    )
    async with serving(settings) as (app, client):
        listener = app.listener
        assert listener is not None
        await asyncio.wait_for(listener.listening.wait(), 5)
        await change_triggers(app.settings, users, "install")

        async def lost() -> bool:
            return not listener.listening.is_set()

        async def listening_again() -> bool:
            return listener.listening.is_set()

        await client.get(users, "2")
        async with await psycopg.AsyncConnection.connect(own_backend.dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query = 'LISTEN cachecoord_outbox'"
            )
            assert [row[0] for row in await cur.fetchall()] == [True]
            # The listener notices the loss, then connects and listens again.
            assert await eventually(lost)
            assert await eventually(listening_again)
            await conn.execute("UPDATE users SET name = 'Alan Turing (relisten)' WHERE id = 2")

        async def sees_sql_update() -> bool:
            return await name_of(client, users, "2") == "Alan Turing (relisten)"

        assert await eventually(sees_sql_update, seconds=2.0)


async def test_update_in_sql_while_every_instance_is_stopped_is_invalidated_at_start(
    start: Start, users: str, own_backend: Backend
) -> None:
    app, client = await start()
    await change_triggers(app.settings, users, "install")
    before = await client.get(users, "1")
    await client.close()
    await app.stop()
    async with await psycopg.AsyncConnection.connect(own_backend.dsn, autocommit=True) as conn:
        await conn.execute("UPDATE users SET name = 'Ada, Countess of Lovelace' WHERE id = 1")
    cached = KeySpace(users).value("1")
    async with own_backend.client() as r:
        assert await r.exists(cached)  # stale, nobody listened

        async def dropped() -> bool:
            return not await r.exists(cached)

        _, client = await start()
        assert await eventually(dropped)
    after = await client.get(users, "1")
    assert json.loads(after.value)["name"] == "Ada, Countess of Lovelace"
    assert after.version > before.version


async def test_writes_through_cachecoord_are_not_recorded_twice(
    start: Start, users: str, own_backend: Backend
) -> None:
    app, client = await start()
    await change_triggers(app.settings, users, "install")
    await client.put(users, "3", json.dumps({"name": "G. Hopper"}).encode())
    async with await psycopg.AsyncConnection.connect(own_backend.dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM cachecoord.outbox WHERE reason = 'db_change'"
        )
        assert await cur.fetchone() == (0,)


async def _a_backend_waits_for_a_lock(dsn: str, seconds: float = 10.0) -> None:
    """Until another session of the database waits for a row lock."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(int(seconds / 0.01)):
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            )
            row = await cur.fetchone()
            if row is not None and row[0] > 0:
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f"no session waited for a lock within {seconds} s")


async def test_a_put_and_an_sql_update_of_one_row_do_not_deadlock(
    start: Start, users: str, own_backend: Backend
) -> None:
    # Another program's UPDATE locks the row, then its trigger locks the key's
    # version row. A Put that took the version row first, then waited for the
    # row, deadlocked with it (PostgreSQL cancelled one of the two).
    app, client = await start()
    await change_triggers(app.settings, users, "install")
    before = await client.get(users, "3")
    async with await psycopg.AsyncConnection.connect(own_backend.dsn) as other:
        await other.execute("SELECT 1 FROM users WHERE id = 3 FOR UPDATE")
        put = asyncio.create_task(client.put(users, "3", json.dumps({"karma": 7}).encode()))
        await _a_backend_waits_for_a_lock(own_backend.dsn)
        await other.execute("UPDATE users SET name = 'Grace Hopper (SQL)' WHERE id = 3")
        await other.commit()
    version = await asyncio.wait_for(put, 10)
    assert version > before.version + 1  # after the SQL change's version

    async def both_changes() -> bool:
        got = json.loads((await client.get(users, "3")).value)
        return bool(got["karma"] == 7 and got["name"] == "Grace Hopper (SQL)")

    assert await eventually(both_changes, seconds=2.0)
