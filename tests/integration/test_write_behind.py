"""Write-behind's own guarantees (design 3.4): Put answers before PostgreSQL
has the write; writes to a key coalesce; versions survive Redis losing its
data; start-up refuses eviction that could drop unflushed writes; a full
queue pushes back; Redis down fails fast; shutdown drains; a poison entry is
dead-lettered without blocking the queue.

Most tests run an instance of their own with a namespace nobody else serves,
so that they can stop its flushers (``App.flushers``) without another
instance flushing the queue behind their back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql
from strategy_support import (
    entries_locked,
    managed_row,
    managed_rows,
    named,
    poll,
    queue_depth,
    redis_client,
    serving,
    unique_namespace,
    write_behind,
)

from cachecoord.app import App, StartupError
from cachecoord.config import Settings
from cachecoord.strategies.flusher import Flusher
from cachecoord_client import AsyncClient, CacheCoordError, Layer, QueueFull, Unavailable
from conftest import settings_for
from local_servers import PostgresServer, RedisServer


async def pause_flushers(app: App) -> None:
    """Stop the instance's flushers at once, without draining."""
    for flusher in app.flushers:
        await flusher.close(0)


class Instance:
    """An in-process instance serving one write-behind namespace of its own."""

    def __init__(self, settings: Settings, app: App, client: AsyncClient, dsn: str) -> None:
        self.settings = settings
        self.app = app
        self.client = client
        (self.namespace,) = settings.namespaces
        self.dsn = dsn

    def sibling(self) -> AbstractAsyncContextManager[tuple[App, AsyncClient]]:
        """Another instance of the same configuration (its flushers take over)."""
        return serving(named(self.settings, f"{self.namespace}-sibling"))

    async def put(self, key: str, value: bytes) -> int:
        return await self.client.put(self.namespace, key, value)

    async def row(self, key: str) -> tuple[bytes, int] | None:
        return await managed_row(self.dsn, self.namespace, key)

    async def flushed(self, key: str, value: bytes, version: int) -> tuple[bytes, int] | None:
        """The key's row once PostgreSQL holds (value, version), or what it holds after 5 s."""
        return await poll(lambda: self.row(key), lambda row: row == (value, version), within=5)


@pytest_asyncio.fixture(loop_scope="session")
async def own(
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Instance]:
    """An instance with a write-behind namespace of its own; parametrize it
    indirectly with a dict to add namespace settings."""
    options: dict[str, Any] = getattr(request, "param", {})
    ns = unique_namespace("wb")
    settings = settings_for(
        tmp_path, redis_server.url, postgres_server.dsn, namespaces=write_behind(ns, **options)
    )
    settings = named(settings, ns)
    async with serving(settings) as (app, client):
        yield Instance(settings, app, client, postgres_server.dsn)


async def test_put_answers_before_postgres_has_the_write(own: Instance, key: str) -> None:
    await pause_flushers(own.app)

    version = await own.put(key, b"v1")
    got = await own.client.get(own.namespace, key)
    in_postgres = await own.row(key)
    async with own.sibling():  # a flusher again
        flushed = await own.flushed(key, b"v1", version)

    assert (got.value, got.version, got.layer) == (b"v1", version, Layer.REDIS)
    assert in_postgres is None
    assert flushed == (b"v1", version)


async def test_many_puts_to_few_keys_coalesce_into_few_row_writes(
    own: Instance, key: str, postgres_server: PostgresServer
) -> None:
    """1,000 Puts over 10 keys while the flushers are behind: PostgreSQL sees
    one row write per key per flush, not one per Put, and the newest values."""
    keys = [f"{key}-{i}" for i in range(10)]
    await pause_flushers(own.app)

    async def write(k: str) -> int:
        return [await own.put(k, b"%d" % n) for n in range(100)][-1]

    last = dict(zip(keys, await asyncio.gather(*map(write, keys)), strict=True))
    expected = {k: (b"99", v) for k, v in last.items()}
    async with (
        row_writes_counted(postgres_server.dsn, own.namespace) as row_writes,
        own.sibling() as (sibling, _),
    ):
        rows = await poll(
            lambda: managed_rows(own.dsn, own.namespace), lambda rows: rows == expected, within=10
        )
        writes = await row_writes()
        flushed_rows = sum(f.flushed_rows for f in sibling.flushers)

    assert rows == expected
    assert 10 <= writes <= 50, f"{writes} row writes for 1,000 Puts over 10 keys"
    assert flushed_rows == writes


@pytest.mark.parametrize("own", [{"partitions": 1, "max_queue": 2}], indirect=True)
async def test_full_queue_answers_resource_exhausted(own: Instance, key: str) -> None:
    await pause_flushers(own.app)
    await own.put(f"{key}-1", b"1")
    await own.put(f"{key}-2", b"2")

    with pytest.raises(CacheCoordError) as refused:
        await own.put(f"{key}-3", b"3")

    assert isinstance(refused.value, QueueFull), str(refused.value)
    assert own.namespace in refused.value.details
    async with own.sibling():  # drains the queue: Puts are taken again
        version = await poll(lambda: put_or_zero(own, f"{key}-3", b"3"), bool, within=5)
    assert version > 0


@pytest.mark.parametrize(
    "own", [{"partitions": 1, "max_queue": 2, "on_queue_full": "write-through"}], indirect=True
)
async def test_full_queue_can_fall_back_to_writing_through(
    own: Instance, redis_server: RedisServer, key: str
) -> None:
    await pause_flushers(own.app)
    await own.put(f"{key}-a", b"a1")
    b1 = await own.put(f"{key}-b", b"b1")

    version = await own.put(f"{key}-a", b"a2")  # the queue is full
    in_postgres = await own.row(f"{key}-a")
    got = await own.client.get(own.namespace, f"{key}-a")
    async with own.sibling():
        # The queued a1 is flushed after a2 was written, and loses to its version.
        drained = await poll(
            lambda: queue_depth(redis_server.url, own.namespace, 1), lambda d: d == (0, 0), within=5
        )

    assert in_postgres == (b"a2", version)  # already when the Put answered
    assert (got.value, got.version) == (b"a2", version)
    assert drained == (0, 0)
    assert await own.row(f"{key}-a") == (b"a2", version)
    assert await own.row(f"{key}-b") == (b"b1", b1)


async def test_stop_drains_the_queue(
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path: Path,
    key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Writes still queued when the instance is asked to stop reach PostgreSQL
    before it exits. PostgreSQL is held up (a lock) until the flushers are
    being closed, so the writes are certainly still queued then."""
    closing = asyncio.Event()
    close = Flusher.close

    async def spy(self: Flusher, grace: float) -> None:
        closing.set()
        await close(self, grace)

    monkeypatch.setattr(Flusher, "close", spy)  # before the App binds it
    ns = unique_namespace("wb")
    settings = settings_for(
        tmp_path, redis_server.url, postgres_server.dsn, namespaces=write_behind(ns)
    )
    keys = [f"{key}-{i}" for i in range(50)]
    async with serving(settings) as (app, client):
        async with entries_locked(postgres_server.dsn):
            versions = {k: await client.put(ns, k, k.encode()) for k in keys}
            stopping = asyncio.create_task(app.stop())
            await asyncio.wait_for(closing.wait(), 5)
            queued, _ = await queue_depth(redis_server.url, ns, 4)
        await stopping

    assert queued == len(keys), "the writes were not queued when the stop began"
    rows = await managed_rows(postgres_server.dsn, ns)
    assert rows == {k: (k.encode(), v) for k, v in versions.items()}


async def test_poison_entry_is_dead_lettered_and_later_writes_still_flush(
    client: AsyncClient,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    new_user_id: Any,
) -> None:
    """profiles.score has CHECK (score >= 0): -1 is valid JSON for the Put but
    PostgreSQL refuses it at flush time. After max_attempts (3) it goes to the
    dead-letter stream with its error; writes after it are not held up."""
    poison, after, later = new_user_id(), new_user_id(), new_user_id()
    version = await client.put("profiles", poison, b'{"name": "bad", "score": -1}')
    await client.put("profiles", after, b'{"name": "after", "score": 1}')

    flushed_while_retrying = await poll(
        lambda: profile_names(postgres_server.dsn, [after]),
        lambda names: names == {after: "after"},
        within=5,
    )
    still_retrying = await dead_letters(redis_server.url, "profiles", poison)
    dead = await poll(
        lambda: dead_letters(redis_server.url, "profiles", poison),
        lambda entries: bool(entries),
        within=10,
    )
    await client.put("profiles", later, b'{"name": "later", "score": 2}')
    flushed_after = await poll(
        lambda: profile_names(postgres_server.dsn, [poison, later]),
        lambda names: later in names,
        within=5,
    )

    assert flushed_while_retrying == {after: "after"}
    assert still_retrying == []  # it was flushed past the poison, not after it
    assert len(dead) == 1, dead
    entry = dead[0]
    assert (entry[b"k"], int(entry[b"v"]), entry[b"t"]) == (poison.encode(), version, b"v")
    assert json.loads(entry[b"p"])["score"] == -1
    assert b"profiles_score_check" in entry[b"error"], entry[b"error"]
    assert flushed_after == {later: "later"}  # and never the poison row


async def test_value_unflushed_past_its_ttl_is_still_served(own: Instance, key: str) -> None:
    """A write not yet flushed (PostgreSQL slow, flushers behind) past its
    fresh time must still be what reads see: it is the newest value there is."""
    v1 = await own.client.put(own.namespace, key, b"old", ttl_ms=200)
    assert await own.flushed(key, b"old", v1) == (b"old", v1)
    await pause_flushers(own.app)
    v2 = await own.client.put(own.namespace, key, b"new", ttl_ms=200)

    await asyncio.sleep(0.3)  # past the new value's fresh time, still unflushed
    seen = await poll(
        lambda: own.client.get(own.namespace, key), lambda g: g.value != b"new", within=0.5
    )

    assert (seen.value, seen.version) == (b"new", v2)


async def test_partial_put_after_an_unflushed_one_keeps_its_columns(
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path: Path,
    new_user_id: Any,
) -> None:
    ns = unique_namespace("wb")
    mapped = write_behind(ns, kind="mapped", table="profiles", key_column="id")
    settings = named(
        settings_for(tmp_path, redis_server.url, postgres_server.dsn, namespaces=mapped), ns
    )
    user = new_user_id()
    async with serving(settings) as (app, client):
        await client.put(ns, user, b'{"name": "A", "score": 1}', ttl_ms=200)
        await poll(
            lambda: profile_names(postgres_server.dsn, [user]),
            lambda names: names == {user: "A"},
            within=5,
        )
        await pause_flushers(app)
        await client.put(ns, user, b'{"name": "B"}', ttl_ms=200)  # acknowledged, queued
        await asyncio.sleep(0.3)  # past its fresh time, still unflushed
        await poll(lambda: client.get(ns, user), lambda g: b'"A"' in g.value, within=0.5)
        await client.put(ns, user, b'{"score": 5}')
        async with serving(named(settings, f"{ns}-sibling")):
            names = await poll(
                lambda: profile_names(postgres_server.dsn, [user]),
                lambda names: names == {user: "B"},
                within=2,
            )

    assert names == {user: "B"}


async def test_startup_refuses_write_behind_under_allkeys_eviction(
    tmp_path: Path, own_database: str
) -> None:
    lru = RedisServer(tmp_path / "redis", extra_args=["--maxmemory-policy", "allkeys-lru"])
    await asyncio.to_thread(lru.start)
    try:
        ns = unique_namespace("wb")
        refused = App(settings_for(tmp_path, lru.url, own_database, namespaces=write_behind(ns)))
        with pytest.raises(StartupError) as error:
            await refused.start()
        cache_aside_only = settings_for(
            tmp_path, lru.url, own_database, namespaces='[namespaces.c]\nkind = "managed"\n'
        )
        async with serving(cache_aside_only):
            pass  # starts: evicting cache-aside entries loses nothing
    finally:
        await asyncio.to_thread(lru.stop)

    assert ns in str(error.value)
    assert "allkeys-lru" in str(error.value)


async def test_values_waiting_for_postgresql_survive_eviction_under_memory_pressure(
    tmp_path: Path, own_database: str
) -> None:
    """Under a volatile-* policy Redis evicts only keys that have a TTL. A
    value still waiting for PostgreSQL has none, so memory pressure evicts
    other keys but never an acknowledged write."""
    small = RedisServer(
        tmp_path / "redis",
        extra_args=["--maxmemory", "8mb", "--maxmemory-policy", "volatile-lru"],
    )
    await asyncio.to_thread(small.start)
    ns = unique_namespace("wb")
    values = {f"k{i}": f"value {i}".encode() * 100 for i in range(50)}
    try:
        settings = settings_for(tmp_path, small.url, own_database, namespaces=write_behind(ns))
        async with (
            serving(settings) as (_, client),
            entries_locked(own_database),  # nothing is flushed: every value stays waiting
            redis_client(small.url) as r,
        ):
            for key, value in values.items():
                await client.put(ns, key, value)
            filler = b"x" * 10_000
            for i in range(2_000):  # 20 MB of keys with a TTL into 8 MB
                await r.set(f"filler:{i}", filler, ex=3600)
            stats = await r.info("stats")
            assert stats["evicted_keys"] > 1_000
            for key, value in values.items():
                got = await client.get(ns, key)
                assert (got.found, got.value, got.layer) == (True, value, Layer.REDIS), key
    finally:
        await asyncio.to_thread(small.stop)


# -- with a Redis of the test's own ------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A Redis this test may kill (no persistence: a restart loses everything)."""
    server = RedisServer(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.stop)


@pytest_asyncio.fixture(loop_scope="session")
async def alone(
    own_redis: RedisServer, own_database: str, tmp_path: Path
) -> AsyncIterator[Instance]:
    """An instance on its own Redis and database."""
    ns = unique_namespace("wb")
    settings = settings_for(tmp_path, own_redis.url, own_database, namespaces=write_behind(ns))
    async with serving(settings) as (app, client):
        yield Instance(settings, app, client, own_database)


async def test_versions_never_go_backwards_after_redis_loses_its_data(
    alone: Instance, own_redis: RedisServer, key: str
) -> None:
    before = await alone.put(key, b"before")
    assert await alone.flushed(key, b"before", before) == (b"before", before)

    await asyncio.to_thread(own_redis.kill)
    await asyncio.to_thread(own_redis.restart)  # empty: no persistence
    after = await put_once_redis_answers(alone, key, b"after")

    assert after > before
    assert await alone.flushed(key, b"after", after) == (b"after", after)
    got = await alone.client.get(alone.namespace, key)
    assert (got.value, got.version) == (b"after", after)


async def test_put_fails_fast_with_unavailable_while_redis_is_down(
    alone: Instance, own_redis: RedisServer, key: str
) -> None:
    await alone.put(key, b"up")
    await asyncio.to_thread(own_redis.kill)

    started = time.monotonic()
    with pytest.raises(CacheCoordError) as failed:
        await alone.client.put(alone.namespace, key, b"down", timeout=10)
    took = time.monotonic() - started

    assert isinstance(failed.value, Unavailable), failed.value
    assert took < 2, f"took {took:.1f} s to fail"


# -- helpers -----------------------------------------------------------------


async def put_or_zero(instance: Instance, key: str, value: bytes) -> int:
    """Put; 0 if the queue is still full."""
    try:
        return await instance.put(key, value)
    except CacheCoordError:
        return 0


async def put_once_redis_answers(instance: Instance, key: str, value: bytes) -> int:
    """Put, retrying UNAVAILABLE for up to 5 s (Redis just came back)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return await instance.put(key, value)
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


@asynccontextmanager
async def row_writes_counted(
    dsn: str, namespace: str
) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """Count the INSERTs and UPDATEs of *namespace*'s cachecoord.entries rows
    with a trigger, while the block runs; yields the function that reads the count."""
    trigger = sql.Identifier(f"count_{namespace}")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS test_row_writes (namespace text, key text)")
        await conn.execute(
            """CREATE OR REPLACE FUNCTION test_count_row_write() RETURNS trigger
               LANGUAGE plpgsql AS $$ BEGIN
                 INSERT INTO test_row_writes VALUES (NEW.namespace, NEW.key);
                 RETURN NEW;
               END $$"""
        )
        await conn.execute(
            sql.SQL(
                "CREATE TRIGGER {} AFTER INSERT OR UPDATE ON cachecoord.entries FOR EACH ROW "
                "WHEN (NEW.namespace = {}) EXECUTE FUNCTION test_count_row_write()"
            ).format(trigger, sql.Literal(namespace))
        )

        async def count() -> int:
            cur = await conn.execute(
                "SELECT count(*) FROM test_row_writes WHERE namespace = %s", (namespace,)
            )
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

        try:
            yield count
        finally:
            await conn.execute(sql.SQL("DROP TRIGGER {} ON cachecoord.entries").format(trigger))


async def profile_names(dsn: str, ids: list[str]) -> dict[str, str]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT id::text, name FROM profiles WHERE id = ANY(%s::bigint[])", (ids,)
        )
        return {id_: name async for id_, name in cur}


async def dead_letters(url: str, namespace: str, key: str) -> list[dict[bytes, bytes]]:
    """The dead-letter stream's entries for *key*."""
    async with redis_client(url) as client:
        entries = cast(
            "list[tuple[bytes, dict[bytes, bytes]]]",
            await client.xrange(f"cc:wb:{{{namespace}}}:dead"),
        )
    return [fields for _, fields in entries if fields.get(b"k") == key.encode()]
