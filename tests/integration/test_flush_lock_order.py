"""The write-behind flusher takes a mapped row's lock before its version row's,
as a Put and other programs' change triggers do: the other way round, a flush
and an UPDATE of the same row made in SQL meanwhile deadlocked."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest_asyncio
from strategy_support import named, poll, serving

from cachecoord.app import change_triggers
from conftest import settings_for
from local_servers import RedisServer


@pytest_asyncio.fixture(loop_scope="session")
async def redis_of_test(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.stop)


async def test_flush_and_an_sql_update_of_the_same_row_do_not_deadlock(
    own_database: str, redis_of_test: RedisServer, tmp_path: Path
) -> None:
    """Another program holds a row (SELECT ... FOR UPDATE) while a flush of
    that row waits for it, then updates the row (its change trigger bumps the
    version row). The flush must not hold the version row meanwhile: the
    UPDATE goes through, and the flush writes the row once it is let go.

    The program's session detects deadlocks after 10 ms, the flusher's after
    PostgreSQL's default second, so a deadlock fails the UPDATE, not the flush."""
    ns = f"scores_{uuid.uuid4().hex[:10]}"
    async with await psycopg.AsyncConnection.connect(own_database, autocommit=True) as conn:
        await conn.execute(
            f"CREATE TABLE {ns} (id bigint PRIMARY KEY, name text NOT NULL,"
            " score integer NOT NULL DEFAULT 0)"
        )
    namespaces = f"""
[namespaces.{ns}]
kind = "mapped"
table = "{ns}"
key_column = "id"
strategy = "write-behind"
flush_interval = "50ms"
retry_after = "100ms"
"""
    settings = settings_for(tmp_path, redis_of_test.url, own_database, namespaces=namespaces)
    async with serving(named(settings, ns)) as (app, client):
        await change_triggers(app.settings, ns, "install")
        await client.put(ns, "1", b'{"name": "first"}')
        first = await poll(lambda: name_of(own_database, ns), lambda n: n == "first", within=5)
        assert first == "first"

        async with await psycopg.AsyncConnection.connect(own_database) as program:
            await program.execute("SET deadlock_timeout = '10ms'")
            await program.execute(f"SELECT 1 FROM {ns} WHERE id = 1 FOR UPDATE")
            await client.put(ns, "1", b'{"name": "flushed"}')
            assert await poll(lambda: flush_waiting_for_lock(own_database, ns), bool, within=5), (
                "the flush never reached the row"
            )
            await program.execute(f"UPDATE {ns} SET score = 7 WHERE id = 1")
            await program.commit()

        flushed = await poll(lambda: name_of(own_database, ns), lambda n: n == "flushed", within=5)
        assert flushed == "flushed"


async def name_of(dsn: str, ns: str) -> str | None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(f"SELECT row_to_json(t)::text FROM {ns} t WHERE id = 1")
        row = await cur.fetchone()
    return None if row is None else str(json.loads(row[0])["name"])


async def flush_waiting_for_lock(dsn: str, ns: str) -> bool:
    """Whether a session (the flusher's) waits for a lock on a statement of *ns*."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND position(%s in query) > 0",
            (ns,),
        )
        row = await cur.fetchone()
    return bool(row and row[0])
