"""LocalCache: a client's own in-process cache, kept coherent by Watch.

Hot keys are read from the client's memory without an RPC; a change made on
any instance evicts them once its event arrives, a RESET flushes everything,
and while the Watch stream is down nothing is served from memory. A Get that
was in flight while its key changed is not kept. Real servers throughout;
the only spies count, or hold back, the Gets that reach an instance.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import pytest_asyncio
from strategy_support import FAST_RECONNECT, poll
from watch_support import CuttableLink, cut_subscriptions, instance, kill_pubsub_connections

from cachecoord.app import App
from cachecoord.model import Entry
from cachecoord_client import AsyncClient, LocalCache, NamespaceNotFound, Unavailable, Value
from local_servers import PostgresServer, RedisServer

Get = Callable[..., Awaitable[Entry]]


def count_gets(app: App, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count, per key, the Gets that reach *app* (the spy wraps its Cache.get)."""
    assert app.cache is not None
    counts: Counter[str] = Counter()
    get: Get = app.cache.get

    async def counted(namespace: str, key: str, *, min_version: int = 0) -> Entry:
        counts[key] += 1
        return await get(namespace, key, min_version=min_version)

    monkeypatch.setattr(app.cache, "get", counted)
    return counts


@pytest.fixture
def gets(app: App, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Gets reaching the session instance, per key."""
    return count_gets(app, monkeypatch)


@pytest_asyncio.fixture(loop_scope="session")
async def writer(
    redis_server: RedisServer, postgres_server: PostgresServer, tmp_path: Path
) -> AsyncIterator[AsyncClient]:
    """A client of a second instance sharing the session's backends."""
    async with instance(tmp_path, redis_server.url, postgres_server.dsn, "writer") as (_, client):
        yield client


async def until(condition: Callable[[], bool], within: float = 5.0) -> bool:
    """Whether *condition* holds within *within* seconds (polled)."""

    async def check() -> bool:
        return condition()

    return await poll(check, bool, within=within)


async def served(local: LocalCache, key: str, *, at_least: int, within: float = 2.0) -> Value:
    """The first value of blobs *key* that *local* serves at *at_least* or later
    (or the last one read, after *within* seconds)."""
    return await poll(
        lambda: local.get("blobs", key), lambda v: v.version >= at_least, within=within
    )


async def test_repeated_reads_are_served_from_memory(
    client: AsyncClient, gets: Counter[str], key: str
) -> None:
    await client.put("blobs", key, b"hot")
    await client.put("sessions", key, b"not cached here")
    async with LocalCache(client, namespaces=["blobs"]) as local:
        values = [await local.get("blobs", key) for _ in range(5)]
        for _ in range(3):
            await local.get("sessions", key)

    assert {v.value for v in values} == {b"hot"}
    assert gets[key] == 1 + 3, "blobs read once; the namespace not cached read every time"


async def test_a_missing_key_is_remembered_too(
    client: AsyncClient, gets: Counter[str], key: str
) -> None:
    async with LocalCache(client, namespaces=["blobs"]) as local:
        assert not (await local.get("blobs", key)).found
        assert not (await local.get("blobs", key)).found
        assert gets[key] == 1
        await client.put("blobs", key, b"now it exists")  # not through the local cache
        found = await poll(lambda: local.get("blobs", key), lambda v: v.found, within=2)
    assert found.value == b"now it exists"


async def test_a_put_on_another_instance_is_not_served_stale_once_its_event_arrived(
    client: AsyncClient, writer: AsyncClient, gets: Counter[str], key: str
) -> None:
    await writer.put("blobs", key, b"old")
    async with LocalCache(client, namespaces=["blobs"]) as local:
        assert (await local.get("blobs", key)).value == b"old"
        version = await writer.put("blobs", key, b"new")

        fresh = await poll(lambda: local.get("blobs", key), lambda v: v.value == b"new", within=2)
        after = [await local.get("blobs", key) for _ in range(3)]

    assert fresh.version == version
    assert all(v == fresh for v in after)
    assert gets[key] == 2, "read once before the put, once after its event, then from memory"


async def test_a_tag_invalidated_on_another_instance_drops_the_values_carrying_it(
    client: AsyncClient, writer: AsyncClient, gets: Counter[str], key: str
) -> None:
    """Values come with their tags: a tag event drops those carrying it, and
    the others stay in memory."""
    await writer.put("blobs", key, b"tagged", tags=[f"t-{key}"])
    await writer.put("blobs", f"{key}-u", b"untagged")
    async with LocalCache(client, namespaces=["blobs"]) as local:
        for k in (key, f"{key}-u"):
            await local.get("blobs", k)
        await writer.invalidate_tags("blobs", [f"t-{key}"])
        await poll(lambda: local.get("blobs", key), lambda _: gets[key] == 2, within=2)
        assert (await local.get("blobs", f"{key}-u")).value == b"untagged"
        assert (await local.get("blobs", key)).value == b"tagged"
    assert gets[key] == 2, "read once before the tag event, once after it, then from memory"
    assert gets[f"{key}-u"] == 1, "untagged: served from memory throughout"


async def test_no_stale_read_after_a_put_on_another_instance(
    client: AsyncClient, writer: AsyncClient, key: str
) -> None:
    """Readers hammer the local cache while another instance writes. Once the
    local cache has served a version, no read that starts later returns an
    older one: not from memory, not from a Get that raced with the write."""
    confirmed = await writer.put("blobs", key, b"0")
    stale: list[tuple[int, int]] = []
    stop = asyncio.Event()

    async with LocalCache(client, namespaces=["blobs"]) as local:

        async def read() -> None:
            while not stop.is_set():
                floor = confirmed
                got = await local.get("blobs", key)
                if got.version < floor:
                    stale.append((got.version, floor))
                await asyncio.sleep(0)

        readers = [asyncio.create_task(read()) for _ in range(4)]
        try:
            for i in range(1, 31):
                version = await writer.put("blobs", key, str(i).encode())
                assert (await served(local, key, at_least=version)).version == version
                confirmed = version
        finally:
            stop.set()
            await asyncio.gather(*readers)

    assert stale == [], "(version served, version already served before)"


async def test_a_get_in_flight_while_its_key_changes_is_not_kept(
    app: App,
    client: AsyncClient,
    writer: AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    key: str,
) -> None:
    """The Get reads "old", the key changes and its event arrives, then the
    Get's answer comes back: it goes to its caller, but not into memory."""
    assert app.cache is not None
    get: Get = app.cache.get
    has_read, answer = asyncio.Event(), asyncio.Event()

    async def slow_get(namespace: str, k: str, *, min_version: int = 0) -> Entry:
        entry = await get(namespace, k, min_version=min_version)
        if k == key:
            has_read.set()
            await answer.wait()
        return entry

    monkeypatch.setattr(app.cache, "get", slow_get)
    await writer.put("blobs", key, b"old")
    await writer.put("blobs", f"{key}-marker", b"marker")
    async with LocalCache(client, namespaces=["blobs"]) as local:
        await local.get("blobs", f"{key}-marker")
        assert len(local) == 1
        reading = asyncio.create_task(local.get("blobs", key))
        await asyncio.wait_for(has_read.wait(), 5)

        new = await writer.put("blobs", key, b"new")
        await writer.put("blobs", f"{key}-marker", b"changed")
        # Events arrive in order: once the marker is evicted, so was the key.
        assert await until(lambda: len(local) == 0)
        answer.set()
        late = await reading

        assert late.value == b"old"
        assert len(local) == 0, "the late answer was kept"
        assert (await local.get("blobs", key)).version == new


async def test_an_entry_counts_its_age_from_when_its_get_began(
    app: App, client: AsyncClient, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    """max_age is 300 ms; the Get's answer takes 400 ms to come back. It is
    answered, but not kept: it was read longer than max_age ago."""
    assert app.cache is not None
    get: Get = app.cache.get
    release = asyncio.Event()

    async def slow_get(namespace: str, k: str, *, min_version: int = 0) -> Entry:
        entry = await get(namespace, k, min_version=min_version)
        if k == key:
            await release.wait()
        return entry

    monkeypatch.setattr(app.cache, "get", slow_get)
    await client.put("blobs", key, b"v")
    async with LocalCache(client, namespaces=["blobs"], max_age=0.3) as local:
        reading = asyncio.create_task(local.get("blobs", key))
        await asyncio.sleep(0.4)
        release.set()
        assert (await reading).value == b"v"
        assert len(local) == 0, "kept past max_age after its read began"


async def test_local_writes_drop_the_key_at_once(client: AsyncClient, key: str) -> None:
    async with LocalCache(client, namespaces=["blobs"]) as local:
        await local.put("blobs", key, b"v1")
        assert (await local.get("blobs", key)).value == b"v1"
        version = await local.put("blobs", key, b"v2")
        assert (await local.get("blobs", key)).version == version
        await local.delete("blobs", key)
        assert not (await local.get("blobs", key)).found


async def test_entries_are_bounded_in_number_and_age(
    client: AsyncClient, gets: Counter[str], key: str
) -> None:
    keys = [f"{key}-{i}" for i in range(3)]
    async with LocalCache(client, namespaces=["blobs"], max_entries=2, max_age=0.3) as local:
        for k in keys:
            await local.get("blobs", k)
        assert len(local) == 2
        await local.get("blobs", keys[0])  # the least recently used went first
        assert gets[keys[0]] == 2

        async def refetched() -> int:
            await local.get("blobs", keys[2])
            return gets[keys[2]]

        assert await poll(refetched, lambda n: n == 2, within=2) == 2  # once older than max_age


async def test_unknown_namespace_fails_at_open(client: AsyncClient) -> None:
    with pytest.raises(NamespaceNotFound):
        async with LocalCache(client, namespaces=["blobs", "nope"]):
            pytest.fail("opened")


# Resets and outages, on instances of their own.


@pytest_asyncio.fixture(loop_scope="session")
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.stop)


async def test_reset_flushes_everything(
    own_redis: RedisServer,
    own_database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    key: str,
) -> None:
    # The server sends RESET when it missed changes its invalidation log
    # cannot replay: here every entry older than 1 ms is trimmed at each append.
    log = 'log_partitions = 1\nlog_max_age = "1ms"\n'
    namespaces = (
        f'[namespaces.blobs]\nkind = "managed"\n{log}'
        f'[namespaces.sessions]\nkind = "managed"\nstrategy = "write-through"\n{log}'
    )
    async with instance(tmp_path, own_redis.url, own_database, "reset", namespaces=namespaces) as (
        app,
        client,
    ):
        gets = count_gets(app, monkeypatch)
        async with LocalCache(client, namespaces=["blobs", "sessions"]) as local:
            await local.get("blobs", key)
            await local.get("sessions", key)
            assert len(local) == 2

            async with cut_subscriptions(partial(kill_pubsub_connections, own_redis.url), app):
                await asyncio.sleep(0.01)
                await client.invalidate("blobs", [f"{key}-1"])
                await client.invalidate("blobs", [f"{key}-2"])

            assert await until(lambda: len(local) == 0)
            await local.get("blobs", key)
            assert gets[key] == 3, "read from the server again after the RESET"


async def test_memory_is_kept_across_a_cut_server_subscription_the_log_replays(
    own_redis: RedisServer,
    own_database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    key: str,
) -> None:
    url = own_redis.url
    async with (
        instance(tmp_path, url, own_database, "served") as (app, client),
        instance(tmp_path, url, own_database, "writer") as (_, writer),
    ):
        gets = count_gets(app, monkeypatch)
        async with LocalCache(client, namespaces=["blobs"]) as local:
            await writer.put("blobs", f"{key}-kept", b"kept")
            await writer.put("blobs", f"{key}-changed", b"old")
            await local.get("blobs", f"{key}-kept")
            await local.get("blobs", f"{key}-changed")
            async with cut_subscriptions(partial(kill_pubsub_connections, url), app):
                await writer.put("blobs", f"{key}-changed", b"new")
            # The change is replayed from the log: that key is evicted...
            assert await until(lambda: len(local) == 1)
            assert (await local.get("blobs", f"{key}-changed")).value == b"new"
            # ...and the other one still read from memory.
            assert (await local.get("blobs", f"{key}-kept")).value == b"kept"
            assert gets[f"{key}-kept"] == 1


async def test_a_lost_stream_bypasses_memory_until_the_watch_has_resumed_then_keeps_it(
    app: App, gets: Counter[str], key: str, writer: AsyncClient
) -> None:
    kept, changed = f"{key}-kept", f"{key}-changed"
    async with (
        CuttableLink(app.port) as link,
        AsyncClient(f"127.0.0.1:{link.port}", options=FAST_RECONNECT) as client,
        LocalCache(client, namespaces=["blobs"], max_backoff=0.2) as local,
    ):
        for held, k in enumerate((kept, changed), start=1):
            await local.put("blobs", k, b"v1")

            def read(k: str = k) -> Awaitable[Value]:
                return local.get("blobs", k)

            def is_held(_: Value, n: int = held) -> bool:
                return len(local) == n

            # A Get in flight when the Put's own event arrives is not kept:
            # read until one is.
            await poll(read, is_held, within=2)
        assert len(local) == 2
        before = gets[kept]

        link.cut()  # the stream breaks

        assert await until(lambda: not local.watching)
        assert len(local) == 2, "memory is kept while the stream is down"
        with pytest.raises(Unavailable):
            await local.get("blobs", kept)  # not from memory: an event may be late
        # Changed on another instance while this client cannot hear of it.
        version = await writer.put("blobs", changed, b"v2")
        link.restore()
        assert await until(lambda: local.watching)
        served = [await local.get("blobs", kept) for _ in range(3)]
        fresh = await local.get("blobs", changed)

    assert {v.value for v in served} == {b"v1"}
    assert gets[kept] == before, "served from the memory kept across the cut"
    assert (fresh.value, fresh.version) == (b"v2", version), "the replayed event evicted it"
