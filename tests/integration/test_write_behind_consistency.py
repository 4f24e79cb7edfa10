"""Write-behind never answers older than an acknowledged write: not while
Redis is frozen (PostgreSQL is behind it), and not after a write PostgreSQL
rejects is dead-lettered (the key's version never goes back).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar, cast

import psycopg
import pytest
import pytest_asyncio
from strategy_support import (
    managed_rows,
    poll,
    redis_client,
    serving,
    unique_namespace,
    write_behind,
)
from watch_support import next_event

from cachecoord_client import (
    AsyncClient,
    CacheCoordError,
    Layer,
    LocalCache,
    Unavailable,
    VersionConflict,
    WatchEvent,
    WatchEventKind,
)
from conftest import settings_for
from local_servers import PostgresServer, RedisServer

T = TypeVar("T")

# -- a frozen Redis ----------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def frozen_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A Redis this test may freeze (SIGSTOP)."""
    server = RedisServer(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.stop)


@contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """Stop the redis-server process (it keeps its connections, and answers
    nothing) for the block: a stall, not a crash."""
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_write_behind_reads_while_redis_is_frozen_never_answer_postgres_older_row(
    frozen_redis: RedisServer, own_database: str, tmp_path: Path
) -> None:
    """Puts acknowledged but not flushed: PostgreSQL holds the rows from
    before them. With Redis frozen, Get and BatchGet answer UNAVAILABLE
    (PostgreSQL cannot tell which keys have unflushed writes), never the old
    row as fresh; once Redis answers, the acknowledged values come back."""
    ns = unique_namespace("views")
    settings = settings_for(tmp_path, frozen_redis.url, own_database, namespaces=write_behind(ns))
    keys = [f"page-{i}" for i in range(3)]
    async with serving(settings) as (app, client):
        old = {key: await client.put(ns, key, b"old") for key in keys}
        flushed = await poll(
            lambda: managed_rows(own_database, ns),
            lambda rows: rows == {key: (b"old", v) for key, v in old.items()},
            within=5,
        )
        assert flushed == {key: (b"old", v) for key, v in old.items()}
        for flusher in app.flushers:
            await flusher.close(0)  # the new values stay unflushed
        new = {key: await client.put(ns, key, b"new") for key in keys}

        answers: list[object] = []
        with frozen(frozen_redis):
            for key in [*keys, *keys]:  # past the breaker's threshold too
                answers.append(await answer(client.get(ns, key)))
            answers.append(await answer(client.batch_get(ns, keys)))

        assert all(isinstance(a, Unavailable) for a in answers), answers
        after = await poll(
            lambda: answer(client.batch_get(ns, keys)),
            lambda got: not isinstance(got, CacheCoordError),
            within=5,
        )
        assert not isinstance(after, CacheCoordError), after
        assert [(v.value, v.version, v.stale) for v in after] == [
            (b"new", new[key], False) for key in keys
        ]
        for key in keys:
            got = await client.get(ns, key)
            assert (got.value, got.version, got.stale) == (b"new", new[key], False)


async def answer(call: Awaitable[T]) -> T | CacheCoordError:
    """The call's result, or the CacheCoordError it raised."""
    try:
        return await call
    except CacheCoordError as err:
        return err


# -- a write PostgreSQL rejects -------------------------------------------------


async def test_dead_lettered_write_moves_the_key_to_a_higher_version_of_the_database_row(
    client: AsyncClient,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    new_user_id: Callable[[], str],
) -> None:
    """profiles.score has CHECK (score >= 0): a Put of -1 is acknowledged at
    V2, then rejected at every flush and dead-lettered. The key must not fall
    back to V1: it moves to V3 > V2 holding PostgreSQL's row, announced to
    Watch (and LocalCache) with reason `rejected`; a compare-and-set with V2 fails naming V3,
    and PostgreSQL's version of the key follows to V3."""
    key = new_user_id()
    v1 = await client.put("profiles", key, b'{"name": "kept", "score": 1}')
    assert (
        await poll(lambda: profile_version(postgres_server.dsn, key), lambda v: v == v1, within=5)
        == v1
    )

    async with (
        client.watch(["profiles"], key_prefix=key) as events,
        LocalCache(client, namespaces=["profiles"]) as local,
    ):
        assert (await next_event(events)).kind is WatchEventKind.RESET
        v2 = await client.put("profiles", key, b'{"score": -1}')
        served = await local.get("profiles", key)  # and kept in memory
        dead = await poll(lambda: dead_letters(redis_server.url, "profiles", key), bool, within=10)
        got = await client.get("profiles", key)
        rejected = await event_with_reason(events, key, "rejected")
        remembered = await poll(
            lambda: local.get("profiles", key), lambda v: v.version != v2, within=2
        )

    assert (served.version, json.loads(served.value)["score"]) == (v2, -1)
    assert [int(entry[b"v"]) for entry in dead] == [v2]
    assert got.version > v2, f"version went back from {v2} to {got.version}"
    assert json.loads(got.value) == {"id": int(key), "name": "kept", "score": 1}
    assert rejected is not None, "no Watch event with reason rejected"
    assert rejected.version == got.version
    assert (remembered.version, remembered.value) == (got.version, got.value)
    with pytest.raises(VersionConflict) as conflict:
        await client.put("profiles", key, b'{"score": 2}', expected_version=v2)
    assert str(got.version) in conflict.value.details
    assert (
        await poll(
            lambda: profile_version(postgres_server.dsn, key), lambda v: v == got.version, within=5
        )
        == got.version
    )
    await client.invalidate("profiles", [key])
    reloaded = await client.get("profiles", key)
    assert (reloaded.version, reloaded.value) == (got.version, got.value)
    assert reloaded.layer in (Layer.DATABASE, Layer.REDIS)


async def event_with_reason(
    events: AsyncIterator[WatchEvent], key: str, reason: str
) -> WatchEvent | None:
    """The first event of *key* with *reason* within 3 s, or None."""
    try:
        async with asyncio.timeout(3):
            while True:
                event = await next_event(events, within=3)
                if event.key == key and event.reason == reason:
                    return event
    except TimeoutError:
        return None


async def profile_version(dsn: str, key: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT version FROM cachecoord.versions WHERE namespace = 'profiles' AND key = %s",
            (key,),
        )
        row = await cur.fetchone()
    return 0 if row is None else int(row[0])


async def dead_letters(url: str, namespace: str, key: str) -> list[dict[bytes, bytes]]:
    async with redis_client(url) as redis:
        entries = cast(
            "list[tuple[bytes, dict[bytes, bytes]]]",
            await redis.xrange(f"cc:wb:{{{namespace}}}:dead"),
        )
    return [fields for _, fields in entries if fields.get(b"k") == key.encode()]
