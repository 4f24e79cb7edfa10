"""Tags (issue 21 item 4): InvalidateTags hides every value carrying one of
its tags on every instance, without scanning keys, and nothing else.

Every test runs on a Redis and a database of its own (``own_backend``), once
on a single Redis and once on the session's Redis Cluster (namespaces of
their own there). Values are changed in PostgreSQL behind cachecoord's back
(no invalidation): an instance that still answers the old value serves its
cached copy, and one that answers the new value reloaded."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg import AsyncConnection
from strategy_support import poll, serving, unique_namespace
from watch_support import next_event

from cachecoord.app import App
from cachecoord.config import ConfigError
from cachecoord.model import Row
from cachecoord.storage.keys import KeySpace
from cachecoord_client import (
    AsyncClient,
    InvalidArgument,
    Layer,
    NamespaceNotFound,
    WatchEventKind,
)
from conftest import Backend

NAMESPACES = """
[namespaces.{ca}]
kind = "managed"
strategy = "cache-aside"
near_cache_entries = 100
near_cache_ttl = "60s"

[namespaces.{wt}]
kind = "managed"
strategy = "write-through"
near_cache_entries = 100
near_cache_ttl = "60s"

[namespaces.{ver}]
kind = "managed"
strategy = "cache-aside"
invalidation = "version"
near_cache_entries = 100
near_cache_ttl = "60s"

[namespaces.{bare}]
kind = "managed"
strategy = "write-through"

[namespaces.{users}]
kind = "mapped"
table = "users"
key_column = "id"
tags = ["karma:{{karma}}", "team"]
near_cache_entries = 100
near_cache_ttl = "60s"

[namespaces.{profiles}]
kind = "mapped"
table = "profiles"
key_column = "id"
strategy = "write-behind"
flush_interval = "50ms"
tags = ["score:{{score}}"]

[namespaces.{queued}]
kind = "managed"
strategy = "write-behind"
flush_interval = "50ms"
"""

Start = Callable[[], Awaitable[tuple[App, AsyncClient]]]


@pytest.fixture
def names() -> dict[str, str]:
    return {
        n: unique_namespace(n) for n in ("ca", "wt", "ver", "bare", "users", "profiles", "queued")
    }


@pytest_asyncio.fixture(loop_scope="session")
async def start(
    own_backend: Backend, names: dict[str, str], tmp_path: Path
) -> AsyncIterator[Start]:
    running: list[tuple[App, AsyncClient]] = []

    async def start_one() -> tuple[App, AsyncClient]:
        app = App(own_backend.settings(tmp_path, namespaces=NAMESPACES.format(**names)))
        await app.start()
        client = AsyncClient(f"127.0.0.1:{app.port}")
        running.append((app, client))
        return app, client

    yield start_one
    for app, client in running:
        await client.close()
        await app.stop()


async def behind_the_back(dsn: str, namespace: str, key: str, value: bytes) -> None:
    """Change a managed value in PostgreSQL without telling cachecoord."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "UPDATE cachecoord.entries SET value = %s WHERE namespace = %s AND key = %s",
            (value, namespace, key),
        )


async def near(client: AsyncClient, namespace: str, key: str) -> None:
    """Read until *client*'s instance serves *key* from its near cache (a
    read in flight when the key's Put message arrives is not kept; on a
    cluster the message may come late)."""
    got = await poll(lambda: client.get(namespace, key), lambda v: v.layer is Layer.NEAR, within=3)
    assert got.layer is Layer.NEAR


async def values(clients: Sequence[AsyncClient], namespace: str, key: str) -> list[bytes | None]:
    return [(await c.get(namespace, key)).value for c in clients]


@pytest.mark.parametrize("strategy", ["ca", "wt", "ver"])
async def test_invalidate_tags_hides_tagged_values_on_every_instance_and_keeps_the_others(
    start: Start, own_backend: Backend, names: dict[str, str], strategy: str
) -> None:
    ns = names[strategy]
    clients = [(await start())[1] for _ in range(3)]
    await clients[0].put(ns, "a", b"a1", tags=["t1"])
    await clients[0].put(ns, "b", b"b1", tags=["t2", "t1"])
    await clients[0].put(ns, "c", b"c1", tags=["t2"])
    await clients[0].put(ns, "u", b"u1")
    for key in "abcu":  # cached in Redis and in every near cache
        for client in clients:
            await near(client, ns, key)
    for key in "abcu":
        await behind_the_back(own_backend.dsn, ns, key, key.encode() + b"2")

    await clients[1].invalidate_tags(ns, ["t1"])

    # The invalidating instance at once; the others once its message arrived.
    assert await values([clients[1]], ns, "a") == [b"a2"]
    for key in "ab":
        reloaded = [key.encode() + b"2"] * 3
        got = await poll(partial(values, clients, ns, key), reloaded.__eq__, within=3.0)
        assert got == reloaded
    for key in "cu":  # other tags and untagged values stay cached: no reload
        assert await values(clients, ns, key) == [key.encode() + b"1"] * 3
        assert {(await c.get(ns, key)).layer for c in clients} == {Layer.NEAR}


async def test_redis_hides_tagged_values_at_once_for_every_instance(
    start: Start, own_backend: Backend, names: dict[str, str]
) -> None:
    """Without near caches, no instance serves a hidden value even once after
    InvalidateTags answered: the tag clock is read with every value."""
    ns = names["bare"]
    clients = [(await start())[1] for _ in range(2)]
    await clients[0].put(ns, "a", b"a1", tags=["t"])
    await clients[0].put(ns, "u", b"u1")
    await behind_the_back(own_backend.dsn, ns, "a", b"a2")
    await behind_the_back(own_backend.dsn, ns, "u", b"u2")

    await clients[0].invalidate_tags(ns, ["t"])

    assert await values(clients, ns, "a") == [b"a2", b"a2"]
    assert [(await c.get(ns, "a")).layer for c in clients] == [Layer.REDIS, Layer.REDIS]
    assert await values(clients, ns, "u") == [b"u1", b"u1"]


async def test_batch_get_hides_tagged_values_and_serves_the_others_from_redis(
    start: Start, own_backend: Backend, names: dict[str, str]
) -> None:
    ns = names["bare"]
    _, client = await start()
    _, other = await start()
    for key, tags in (("a", ["t"]), ("b", ["t", "s"]), ("c", ["s"]), ("u", [])):
        await client.put(ns, key, key.encode() + b"1", tags=tags)
        await behind_the_back(own_backend.dsn, ns, key, key.encode() + b"2")

    await other.invalidate_tags(ns, ["t"])

    for reader in (client, other):
        got = await reader.batch_get(ns, ["a", "b", "c", "u"])
        assert [g.value for g in got] == [b"a2", b"b2", b"c1", b"u1"]
        assert [g.layer for g in got][2:] == [Layer.REDIS, Layer.REDIS]


@pytest.mark.parametrize("lost", ["marks", "clock"])
async def test_tag_state_lost_by_redis_hides_tagged_values_rather_than_resurrect_them(
    start: Start, own_backend: Backend, names: dict[str, str], lost: str
) -> None:
    """Eviction (under allkeys-*) or a flush may take the marks hash or the
    clock: a tagged value then counts as invalid, never as valid again."""
    ns = names["bare"]
    _, client = await start()
    await client.put(ns, "a", b"a1", tags=["t"])
    await client.put(ns, "u", b"u1")
    await behind_the_back(own_backend.dsn, ns, "a", b"a2")
    await behind_the_back(own_backend.dsn, ns, "u", b"u2")
    await client.invalidate_tags(ns, ["t"])
    keys = KeySpace(ns)
    async with own_backend.client() as redis:
        await redis.delete(keys.tags if lost == "marks" else keys.tag_clock)
    assert await values([client], ns, "a") == [b"a2"]
    assert await values([client], ns, "u") == [b"u1"]  # untagged: untouched


@pytest.mark.parametrize("strategy", ["ca", "wt"])
async def test_a_put_after_invalidate_tags_survives_it(
    start: Start, names: dict[str, str], strategy: str
) -> None:
    ns = names[strategy]
    _, client = await start()
    await client.put(ns, "k", b"old", tags=["t"])
    await client.invalidate_tags(ns, ["t"])
    await client.put(ns, "k", b"new", tags=["t"])
    await client.get(ns, "k")
    got = await client.get(ns, "k")  # cached: not hidden by the earlier invalidation
    assert (got.value, got.layer in (Layer.REDIS, Layer.NEAR)) == (b"new", True)
    assert got.tags == ("t",)  # answered with its tags, from every layer
    await client.invalidate_tags(ns, ["other"])
    assert (await client.get(ns, "k")).layer is not Layer.DATABASE


async def test_a_fill_racing_invalidate_tags_does_not_bring_the_old_value_back(
    start: Start, own_backend: Backend, names: dict[str, str]
) -> None:
    """The reader reads the tag clock, then the row; InvalidateTags comes
    between the row's read and the fill. The fill is accepted (no write took
    the lease), but the value it cached is hidden from its first read. (No
    near cache: another instance's may keep the value until the tag's
    message arrives, as for any invalidation.)"""
    ns = names["bare"]
    app, client = await start()
    _, other = await start()
    await client.put(ns, "k", b"old", tags=["t"])
    await client.invalidate(ns, ["k"])  # the next Get misses, loads and fills
    assert app.cache is not None, "started"
    table = app.cache.strategy(ns).table
    load = table.load
    read, go_on = asyncio.Event(), asyncio.Event()

    async def slow_load(conn: AsyncConnection, keys: Sequence[str]) -> dict[str, Row]:
        rows = await load(conn, keys)
        read.set()
        await asyncio.wait_for(go_on.wait(), 10)
        return rows

    table.load = slow_load  # type: ignore[method-assign]
    try:
        getting = asyncio.create_task(client.get(ns, "k"))
        await asyncio.wait_for(read.wait(), 10)
        await behind_the_back(own_backend.dsn, ns, "k", b"new")
        await other.invalidate_tags(ns, ["t"])
        go_on.set()
        assert (await getting).value == b"old"  # read before: its answer is fine
    finally:
        table.load = load  # type: ignore[method-assign]
    assert await values([client, other], ns, "k") == [b"new", b"new"]


async def test_mapped_namespace_tags_come_from_columns(
    start: Start, names: dict[str, str], own_backend: Backend
) -> None:
    ns = names["users"]
    _, client = await start()
    _, other = await start()
    await client.put(ns, "1", json.dumps({"karma": 7}).encode())
    await client.put(ns, "2", json.dumps({"karma": 8}).encode())
    for c in (client, other):
        for key in "12":
            await c.get(ns, key)
    async with await psycopg.AsyncConnection.connect(own_backend.dsn) as conn:
        await conn.execute("SELECT set_config('cachecoord.writer', 'on', true)")
        await conn.execute("UPDATE users SET name = name || '!' WHERE id IN (1, 2)")

    await client.invalidate_tags(ns, ["karma:7"])

    def name(got: Any) -> str:
        return str(json.loads(got.value)["name"])

    async def names_of(key: str) -> list[str]:
        return [name(await c.get(ns, key)) for c in (client, other)]

    renamed = await poll(lambda: names_of("1"), lambda n: all(x.endswith("!") for x in n), within=3)
    assert all(x.endswith("!") for x in renamed)
    assert not any(x.endswith("!") for x in await names_of("2"))  # karma:8: still cached
    await client.invalidate_tags(ns, ["team"])  # a template without columns: every row
    renamed = await poll(lambda: names_of("2"), lambda n: all(x.endswith("!") for x in n), within=3)
    assert all(x.endswith("!") for x in renamed)


async def flushed(dsn: str, namespace: str, key: str) -> tuple[bytes, list[str]] | None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT value, tags FROM cachecoord.entries WHERE namespace = %s AND key = %s",
            (namespace, key),
        )
        row = await cur.fetchone()
    return None if row is None else (bytes(row[0]), list(row[1]))


async def test_write_behind_tags_reach_postgresql_and_hide_the_value_once_flushed(
    start: Start, own_backend: Backend, names: dict[str, str]
) -> None:
    ns = names["queued"]
    _, client = await start()
    _, other = await start()
    await client.put(ns, "k", b"v1", tags=["t"])
    await client.put(ns, "u", b"u1")
    row = await poll(partial(flushed, own_backend.dsn, ns, "k"), lambda r: r is not None, within=5)
    assert row == (b"v1", ["t"])  # the flusher writes the tags with the row
    await poll(partial(flushed, own_backend.dsn, ns, "u"), lambda r: r is not None, within=5)
    await behind_the_back(own_backend.dsn, ns, "k", b"v2")
    await behind_the_back(own_backend.dsn, ns, "u", b"u2")

    await other.invalidate_tags(ns, ["t"])

    reloaded = await poll(
        partial(values, [client, other], ns, "k"), [b"v2", b"v2"].__eq__, within=3
    )
    assert reloaded == [b"v2", b"v2"]
    assert await values([client, other], ns, "u") == [b"u1", b"u1"]


async def test_mapped_write_behind_tags_come_from_the_merged_row(
    start: Start, names: dict[str, str], own_backend: Backend
) -> None:
    ns = names["profiles"]
    _, client = await start()
    _, other = await start()
    await client.put(ns, "1", json.dumps({"name": "a", "score": 5}).encode())
    await client.put(ns, "2", json.dumps({"name": "b", "score": 6}).encode())
    last = await client.put(ns, "1", json.dumps({"name": "a"}).encode())  # score stays 5

    async def flushed_version() -> int:
        async with await psycopg.AsyncConnection.connect(own_backend.dsn) as conn:
            cur = await conn.execute(
                "SELECT version FROM cachecoord.versions WHERE namespace = %s AND key = '1'",
                (ns,),
            )
            row = await cur.fetchone()
        return 0 if row is None else int(row[0])

    assert await poll(flushed_version, last.__eq__, within=5) == last  # every write flushed
    got = await client.get(ns, "1")
    assert got.tags == ("score:5",)
    async with await psycopg.AsyncConnection.connect(own_backend.dsn) as conn:
        await conn.execute("SELECT set_config('cachecoord.writer', 'on', true)")
        await conn.execute("UPDATE profiles SET name = name || '!'")

    await other.invalidate_tags(ns, ["score:5"])

    async def name_of(key: str) -> str:
        return str(json.loads((await client.get(ns, key)).value)["name"])

    assert await poll(partial(name_of, "1"), "a!".__eq__, within=3) == "a!"
    assert await name_of("2") == "b"  # score:6, still cached


async def test_an_unflushed_write_behind_value_is_not_hidden(
    start: Start, own_backend: Backend, names: dict[str, str]
) -> None:
    """PostgreSQL is behind it: hiding it would serve an older row (as
    Invalidate, InvalidateTags never drops a value not flushed yet)."""
    ns = names["queued"]
    _, client = await start()
    async with await psycopg.AsyncConnection.connect(own_backend.dsn) as conn:
        # The flush waits for this lock: the value stays unflushed meanwhile.
        await conn.execute("LOCK TABLE cachecoord.entries IN EXCLUSIVE MODE")
        version = await client.put(ns, "k", b"v1", tags=["t"])
        await client.invalidate_tags(ns, ["t"])
        got = await client.get(ns, "k")
    assert (got.value, got.version, got.layer) == (b"v1", version, Layer.REDIS)


async def test_watch_gets_one_event_per_tag(start: Start, names: dict[str, str]) -> None:
    ns = names["wt"]
    _, watcher = await start()
    _, writer = await start()
    async with watcher.watch([ns], key_prefix="no-key-has-this-prefix") as events:
        assert (await next_event(events)).kind is WatchEventKind.RESET
        await writer.invalidate_tags(ns, ["t1", "t2"])
        got = [await next_event(events), await next_event(events)]
    assert sorted(e.tag for e in got) == ["t1", "t2"]
    # all_keys too: a client that does not know tags drops the whole namespace.
    assert {(e.kind, e.namespace, e.key, e.all_keys, e.reason) for e in got} == {
        (WatchEventKind.INVALIDATION, ns, "", True, "tags")
    }


async def test_bad_tag_input_is_refused_with_its_status(
    start: Start, names: dict[str, str]
) -> None:
    _, client = await start()
    ns = names["wt"]
    refused: list[Awaitable[object]] = [
        client.invalidate_tags(ns, []),
        client.invalidate_tags(ns, [f"t{i}" for i in range(101)]),
        client.invalidate_tags(ns, ["x" * 129]),
        client.invalidate_tags(ns, [""]),
        client.put(ns, "k", b"v", tags=[f"t{i}" for i in range(17)]),
        client.put(ns, "k", b"v", tags=["é" * 65]),  # 130 bytes
        client.put(names["users"], "1", b"{}", tags=["t"]),  # mapped: tags come from columns
    ]
    for call in refused:
        with pytest.raises(InvalidArgument):
            await call
    with pytest.raises(NamespaceNotFound):
        await client.invalidate_tags("no-such-namespace", ["t"])
    await client.invalidate_tags(ns, ["x" * 128, *[f"t{i}" for i in range(99)]])
    await client.put(ns, "k", b"v", tags=[f"t{i}" for i in range(16)])


async def test_a_tag_template_naming_an_unknown_column_stops_start_up(
    own_backend: Backend, tmp_path: Path
) -> None:
    namespaces = NAMESPACES.format(
        ca="a", wt="b", ver="v", bare="c", users=unique_namespace("users"), profiles="p", queued="q"
    ).replace("karma:{karma}", "tenant:{tenant_id}")
    with pytest.raises(ConfigError) as refused:
        async with serving(own_backend.settings(tmp_path, namespaces=namespaces)):
            pass
    assert ".tags" in str(refused.value)
    assert "tenant_id" in str(refused.value)
