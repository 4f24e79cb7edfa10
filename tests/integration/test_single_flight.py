"""No read that starts after an acknowledged write answers what was there before it.

Three ways such a read used to get the old value (issue 17, scenarios 1-3),
each forced with hooks, not sleeps. Instance A starts loading a key; its
load has read the old row in PostgreSQL and is held there. A Put of the
key on instance B is acknowledged, and its event reaches A. Then a Get on A
starts, misses Redis and finds A's load still running:

1. it must not take that load's row (single-flight join);
2. the near cache must not keep that row either, nor keep anything past
   ``near_cache_ttl`` after its read began;
3. a LocalCache on A, whose Get started after the event arrived, must not
   get the old row, nor keep it in memory.

Every test runs on a Redis and a database of its own, on a single Redis and
on the session's Redis Cluster (keys are the test's own there).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest
import pytest_asyncio
from psycopg import AsyncConnection
from strategy_support import Instance, Start, instances, poll

from cachecoord.app import App
from cachecoord.model import Row
from cachecoord.strategies import Strategy
from cachecoord_client import Layer, LocalCache, Value, WatchEventKind
from conftest import Backend

NAMESPACES = """
[namespaces.plain]
kind = "managed"
strategy = "cache-aside"
ttl = "5m"

[namespaces.near]
kind = "managed"
ttl = "5m"
near_cache_entries = 100
near_cache_ttl = "60s"

[namespaces.near_short]
kind = "managed"
ttl = "5m"
near_cache_entries = 100
near_cache_ttl = "300ms"
"""

Load = Callable[[AsyncConnection, Sequence[str]], Awaitable[dict[str, Row]]]


@pytest_asyncio.fixture(loop_scope="session")
async def start(own_backend: Backend, tmp_path: Path) -> AsyncIterator[Start]:
    """Starts instances sharing one Redis and one database; stops them after."""
    async with instances(own_backend, tmp_path, NAMESPACES, "single-flight") as start_one:
        yield start_one


def strategy(app: App, namespace: str) -> Strategy:
    assert app.cache is not None, "started"
    return app.cache.strategy(namespace)


class HeldLoad:
    """Wraps a table's ``load``: the first call is held right after its SQL read
    returned, until :attr:`release` is set; later calls pass through."""

    def __init__(self, load: Load) -> None:
        self._load = load
        self.calls = 0
        self.loaded = asyncio.Event()
        self.release = asyncio.Event()
        self.loaded_at = 0.0

    async def __call__(self, conn: AsyncConnection, keys: Sequence[str]) -> dict[str, Row]:
        began = time.monotonic()
        rows = await self._load(conn, keys)
        self.calls += 1
        if self.calls == 1:
            self.loaded_at = began
            self.loaded.set()
            await self.release.wait()
        return rows


class Misses:
    """Wraps a store's ``read``: signals each Redis read of *key* that found nothing.
    The reader goes on synchronously from there to the single-flight, so once
    the test sees the signal, that reader has joined the running load."""

    def __init__(
        self, read: Callable[[str], Awaitable[tuple[bytes | None, int]]], key: str
    ) -> None:
        self._read = read
        self._key = key
        self.count = 0
        self.changed = asyncio.Event()

    async def __call__(self, name: str) -> tuple[bytes | None, int]:
        raw, clock = await self._read(name)
        if name == self._key and raw is None:
            self.count += 1
            self.changed.set()
        return raw, clock

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(5):
            while self.count < count:
                self.changed.clear()
                await self.changed.wait()


async def hold_a_load_then_write(
    a: Instance,
    b: Instance,
    namespace: str,
    key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[asyncio.Task[Value], HeldLoad, Misses, int, int]:
    """A's first Get of *key* reads the old row and is held; B's Put of a new
    one is acknowledged, and its event has reached A. Returns the held Get,
    the hooks, and the old and new versions."""
    (app_a, client_a), (_, client_b) = a, b
    ns = strategy(app_a, namespace)
    old = await client_b.put(namespace, key, b"old")
    held = HeldLoad(ns.table.load)
    misses = Misses(ns.store.read, key)
    monkeypatch.setattr(ns.table, "load", held)
    monkeypatch.setattr(ns.store, "read", misses)
    async with client_a.watch([namespace], key_prefix=key) as events:
        assert (await anext(events)).kind is WatchEventKind.RESET
        first = asyncio.create_task(client_a.get(namespace, key))
        await asyncio.wait_for(held.loaded.wait(), 5)
        new = await client_b.put(namespace, key, b"new")
        async with asyncio.timeout(5):
            while True:
                event = await anext(events)
                if event.kind is WatchEventKind.INVALIDATION and event.version == new:
                    break  # A has applied the Put: a Get starting now must see it
    return first, held, misses, old, new


@pytest.mark.parametrize("writer", ["another instance", "the same instance"])
async def test_a_get_after_a_put_does_not_join_an_older_load(
    start: Start, writer: str, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Write-through is not at risk here: its Put caches the new value, so
    the later Get is a Redis hit and joins nothing.)"""
    namespace = "plain"
    a = await start()
    b = await start() if writer == "another instance" else a
    first, held, misses, old, new = await hold_a_load_then_write(a, b, namespace, key, monkeypatch)
    second = asyncio.create_task(a[1].get(namespace, key))
    await misses.wait_for(2)  # missed Redis, found A's load running
    held.release.set()

    # The first Get began before the Put: it answers what its read found.
    assert (await first).version == old
    answer = await second
    assert (answer.value, answer.version) == (b"new", new), (answer, old)
    assert (await a[1].get(namespace, key)).version == new


async def test_the_near_cache_does_not_keep_the_row_of_an_older_load(
    start: Start, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await start(), await start()
    first, held, misses, old, new = await hold_a_load_then_write(a, b, "near", key, monkeypatch)
    second = asyncio.create_task(a[1].get("near", key))
    await misses.wait_for(2)
    held.release.set()
    await first
    await second

    after = [await a[1].get("near", key) for _ in range(3)]
    assert [(v.value, v.version) for v in after] == [(b"new", new)] * 3, old
    near = strategy(a[0], "near").reader.near
    assert near is not None
    kept = near.get(key)
    assert kept is None or kept.version == new


async def test_a_near_cache_entry_counts_its_age_from_when_its_load_began(
    start: Start, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """near_cache_ttl is 300 ms; the load that reads the row is held 400 ms
    after its read (a slow answer). Its row is answered, and filled into
    Redis, but the near cache does not serve it: it was read too long ago."""
    app, client = await start()
    ns = strategy(app, "near_short")
    await client.put("near_short", key, b"v")
    held = HeldLoad(ns.table.load)
    monkeypatch.setattr(ns.table, "load", held)
    reading = asyncio.create_task(client.get("near_short", key))
    await asyncio.wait_for(held.loaded.wait(), 5)
    await asyncio.sleep(held.loaded_at + 0.4 - time.monotonic())
    held.release.set()
    assert (await reading).layer is Layer.DATABASE

    again = await client.get("near_short", key)
    assert again.layer is Layer.REDIS, "kept past near_cache_ttl after its read"


async def test_a_row_whose_fill_was_refused_is_not_kept_by_the_near_cache(
    start: Start, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Put on B lands while A's load of the key is held: the load's fill is
    refused (the Put deleted its lease). The Put's message to A is held back
    (a slow subscription), so nothing on A knows of the Put but Redis. The
    load's Get answers its old row (it began before the Put), but the near
    cache does not keep it: a row is kept only from a fill Redis accepted."""
    (app_a, client_a), (_, client_b) = await start(), await start()
    ns = strategy(app_a, "near")
    near = ns.reader.near
    assert near is not None
    old = await client_b.put("near", key, b"old")
    held = HeldLoad(ns.table.load)
    monkeypatch.setattr(ns.table, "load", held)
    invalidate, late = near.invalidate, asyncio.Event()

    def held_back(name: str | None, version: int) -> None:
        if name == key and not late.is_set():
            return  # arrives later
        invalidate(name, version)

    monkeypatch.setattr(near, "invalidate", held_back)
    reading = asyncio.create_task(client_a.get("near", key))
    await asyncio.wait_for(held.loaded.wait(), 5)
    new = await client_b.put("near", key, b"new")
    held.release.set()
    assert (await reading).version == old
    assert near.get(key) is None, "the row of a refused fill was kept"
    after = await client_a.get("near", key)
    assert (after.value, after.version) == (b"new", new)
    late.set()


async def test_a_local_cache_read_after_an_event_gets_the_new_value_and_keeps_it(
    start: Start, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 17, scenario 3: the LocalCache read starts after the Put's event
    arrived (a marker key written after it has been evicted too: events come
    in order), while A is still loading the key for another client."""
    (app_a, client_a), (_, client_b) = await start(), await start()
    ns = strategy(app_a, "plain")
    marker = f"{key}-marker"
    old = await client_b.put("plain", key, b"old")
    await client_b.put("plain", marker, b"m")
    held = HeldLoad(ns.table.load)
    misses = Misses(ns.store.read, key)
    async with LocalCache(client_a, namespaces=["plain"]) as local:
        await poll(lambda: local.get("plain", marker), lambda _: len(local) == 1, within=2)
        monkeypatch.setattr(ns.table, "load", held)
        monkeypatch.setattr(ns.store, "read", misses)
        first = asyncio.create_task(client_a.get("plain", key))  # another client of A
        await asyncio.wait_for(held.loaded.wait(), 5)
        new = await client_b.put("plain", key, b"new")
        await client_b.put("plain", marker, b"m2")

        async def evicted() -> int:
            return len(local)

        assert await poll(evicted, lambda n: n == 0, within=5) == 0, "events did not arrive"
        reading = asyncio.create_task(local.get("plain", key))
        await misses.wait_for(2)
        held.release.set()
        assert (await first).version == old

        answer = await reading
        assert (answer.value, answer.version) == (b"new", new), (answer, old)
        later = [await local.get("plain", key) for _ in range(3)]
        assert {(v.value, v.version) for v in later} == {(b"new", new)}
