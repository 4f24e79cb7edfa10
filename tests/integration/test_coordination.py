"""Coordination under concurrency (design 4.1, 4.2): leases against the
stale-set race, single-flight, waiting for another instance's fill, serving
stale while revalidating, and XFetch early refresh.

Interleavings are forced with hooks, not sleeps: a namespace's table object
gets its ``load`` wrapped so that a load can be held right after its SQL read
returned, and released when the test says so. Where time is the subject (a
TTL, the fallback poll of a waiter), the test waits for deadlines read from the
entries or the poll schedule, a few hundred milliseconds at most. Every test
runs its instances on a Redis and a database of its own (``own_backend``),
once on a single Redis and once on the session's Redis Cluster (shared there:
every test's keys are its own).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
import pytest_asyncio
from psycopg import AsyncConnection
from strategy_support import Start, instances, poll

from cachecoord.app import App
from cachecoord.model import Row
from cachecoord.storage import envelope
from cachecoord.storage.keys import KeySpace
from cachecoord.storage.tables import Table
from cachecoord.strategies import Strategy, reads
from cachecoord_client import AsyncClient, Layer, Value
from conftest import Backend

NAMESPACES = """
[namespaces.plain]
kind = "managed"
ttl = "5m"

[namespaces.swr]
kind = "managed"
ttl = "200ms"
ttl_jitter = 0
stale_window = "10s"
early_refresh_beta = 0

[namespaces.xfetch]
kind = "managed"
ttl = "1s"
ttl_jitter = 0
early_refresh_beta = 6
"""

Load = Callable[[AsyncConnection, Sequence[str]], Awaitable[dict[str, Row]]]


@pytest_asyncio.fixture(loop_scope="session")
async def start(own_backend: Backend, tmp_path: Path) -> AsyncIterator[Start]:
    """Starts instances sharing one Redis and one database; stops them after."""
    async with instances(own_backend, tmp_path, NAMESPACES, "coordination") as start_one:
        yield start_one


@pytest.fixture
def loads_of(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], int]:
    """How many load queries of cachecoord.entries named a key: a spy on every
    SQL statement the in-process servers execute, not a fake."""
    seen: list[tuple[str, Any]] = []
    original = psycopg.AsyncCursor.execute

    async def execute(
        self: psycopg.AsyncCursor[Any], query: Any, params: Any = None, **kw: Any
    ) -> Any:
        text = query if isinstance(query, str) else query.as_string(None)
        seen.append((text, params))
        return await original(self, query, params, **kw)

    monkeypatch.setattr(psycopg.AsyncCursor, "execute", execute)

    def count(key: str) -> int:
        return sum(
            "unnest" in text
            and "cachecoord.entries" in text
            and isinstance(params, dict)
            and key in params.get("keys", ())
            for text, params in seen
        )

    return count


def strategy(app: App, namespace: str) -> Strategy:
    assert app.cache is not None, "started"
    return app.cache.strategy(namespace)


class HeldLoad:
    """Wraps a table's ``load``: the first call is held right after its SQL read
    returned, until :attr:`release` is set; later calls pass through."""

    def __init__(self, table: Table) -> None:
        self._load: Load = table.load
        self.calls = 0
        self.loaded = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, conn: AsyncConnection, keys: Sequence[str]) -> dict[str, Row]:
        rows = await self._load(conn, keys)
        self.calls += 1
        if self.calls == 1:
            self.loaded.set()
            await self.release.wait()
        return rows


async def cached_raw(backend: Backend, namespace: str, key: str) -> bytes | None:
    """The entry's envelope in Redis (storage/keys.py)."""
    async with backend.client() as client:
        return cast("bytes | None", await client.get(KeySpace(namespace).value(key)))


async def fresh_until_ms(backend: Backend, namespace: str, key: str) -> int:
    raw = await cached_raw(backend, namespace, key)
    assert raw is not None, f"{namespace}/{key} is not cached"
    return envelope.decode(raw).fresh_until_ms


def now_ms() -> float:
    return time.time() * 1000


# -- the stale-set race (design 3.1, 4.1) --------------------------------------


async def race_a_fill_against_a_write(
    app: App, client: AsyncClient, key: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[Value, int, int]:
    """A reader misses, takes the lease and reads the old row from PostgreSQL;
    it is held right there while a writer commits a new one and invalidates;
    then it fills. Returns the reader's answer and both versions."""
    ns = strategy(app, "plain")
    old = await client.put("plain", key, b"old")
    held = HeldLoad(ns.table)
    monkeypatch.setattr(ns.table, "load", held)
    reader = asyncio.create_task(client.get("plain", key))
    await asyncio.wait_for(held.loaded.wait(), 5)
    new = await client.put("plain", key, b"new")
    held.release.set()
    return await asyncio.wait_for(reader, 5), old, new


async def test_fill_after_concurrent_write_is_rejected(
    start: Start, own_backend: Backend, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, client = await start()
    store = strategy(app, "plain").store
    fills: list[dict[str, bool]] = []
    fill_many = store.fill_many

    async def recorded_fill(batch: dict[str, tuple[str, bytes, int, bytes]]) -> dict[str, bool]:
        fills.append(await fill_many(batch))
        return fills[-1]

    monkeypatch.setattr(store, "fill_many", recorded_fill)
    answer, old, new = await race_a_fill_against_a_write(app, client, key, monkeypatch)
    # The reader answers what it read: the value current when its read began.
    assert (answer.value, answer.version) == (b"old", old)
    # Its fill came after the write and was refused: the old row is not cached.
    assert fills == [{key: False}]
    assert await cached_raw(own_backend, "plain", key) is None
    after = await client.get("plain", key)
    assert (after.value, after.version, after.layer) == (b"new", new, Layer.DATABASE)


async def test_without_the_lease_check_the_same_interleaving_caches_the_stale_value(
    start: Start, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the lease prevents: a fill that ignores it (a plain SET, as the
    seed's cache-aside does) stores the old row after the write, stale until
    its TTL ends."""
    app, client = await start()
    store = strategy(app, "plain").store

    async def fill_ignoring_the_lease(
        batch: dict[str, tuple[str, bytes, int, bytes]],
    ) -> dict[str, bool]:
        for name, (_token, stored, px, _notice) in batch.items():
            await store.client.set(store.keys.value(name), stored, px=px)
        return dict.fromkeys(batch, True)

    monkeypatch.setattr(store, "fill_many", fill_ignoring_the_lease)
    _, old, new = await race_a_fill_against_a_write(app, client, key, monkeypatch)
    after = await client.get("plain", key)
    assert new > old
    assert (after.value, after.version, after.layer) == (b"old", old, Layer.REDIS)


# -- stampedes (design 4.2) ----------------------------------------------------


async def test_concurrent_misses_in_one_instance_share_one_load(
    start: Start, key: str, monkeypatch: pytest.MonkeyPatch, loads_of: Callable[[str], int]
) -> None:
    callers = 200
    app, client = await start()
    ns = strategy(app, "plain")
    await client.put("plain", key, b"v")
    # The load is held until every Get has missed Redis, so all of them overlap.
    missed, all_missed = 0, asyncio.Event()
    read, take_leases, load = ns.store.read, ns.store.take_leases, ns.table.load
    lease_requests = 0

    async def counted_read(name: str) -> tuple[bytes | None, int]:
        nonlocal missed
        raw, clock = await read(name)
        missed += raw is None
        if missed >= callers:
            all_missed.set()
        return raw, clock

    async def counted_take_leases(
        tokens: dict[str, str], lease_ms: int, **options: Any
    ) -> dict[str, bytes | bool]:
        nonlocal lease_requests
        lease_requests += 1
        return await take_leases(tokens, lease_ms, **options)

    async def held_load(conn: AsyncConnection, keys: Sequence[str]) -> dict[str, Row]:
        await asyncio.wait_for(all_missed.wait(), 10)
        return await load(conn, keys)

    monkeypatch.setattr(ns.store, "read", counted_read)
    monkeypatch.setattr(ns.store, "take_leases", counted_take_leases)
    monkeypatch.setattr(ns.table, "load", held_load)
    answers = await asyncio.gather(*(client.get("plain", key) for _ in range(callers)))
    assert {(a.value, a.version) for a in answers} == {(b"v", answers[0].version)}
    assert loads_of(key) == 1
    assert lease_requests == 1  # one Redis lease request too: the others never left the process
    assert missed == callers


async def test_concurrent_misses_across_instances_share_one_load_and_wake_on_its_fill(
    start: Start, key: str, monkeypatch: pytest.MonkeyPatch, loads_of: Callable[[str], int]
) -> None:
    """300 Gets over 3 instances: one load. The lease holder's load is held
    until every instance has asked for the lease, then for *hold* more, so
    the fill lands between two fallback polls of the waiters: with the poll's
    back-off capped at 160 ms they poll 10, 30, 70, 150 and 310 ms into a
    wait, and the fill comes about 70 ms after the 150 ms poll and 80 ms
    (less the spread of the asks) before the next. The waiting instances
    answer after the fill's notice reached them, not at an earlier poll. (One
    event loop runs the three instances and the 300 calls, too busy to time
    the wake-up itself: the next test does.)"""
    monkeypatch.setattr(reads, "_MAX_POLL", 0.16)
    hold = 0.22
    instances = [await start() for _ in range(3)]
    await instances[0][1].put("plain", key, b"v")
    asked, all_asked, all_asked_at = 0, asyncio.Event(), 0.0
    filled_by: list[int] = []  # the instances whose fill wrote the value
    noticed_at: dict[int, float] = {}
    calls: dict[int, list[tuple[float, float]]] = {n: [] for n in range(3)}  # (start, end)

    for number, (app, _) in enumerate(instances):
        ns = strategy(app, "plain")
        reader = ns.reader
        take_leases, fill_many, load = ns.store.take_leases, ns.store.fill_many, ns.table.load
        on_fill, reader_get = reader.on_fill, reader.get

        async def asking(
            tokens: dict[str, str], lease_ms: int, take_leases: Any = take_leases, **options: Any
        ) -> dict[str, bytes | bool]:
            nonlocal asked, all_asked_at
            granted: dict[str, bytes | bool] = await take_leases(tokens, lease_ms, **options)
            asked += 1
            if asked == len(instances):
                all_asked_at = time.monotonic()
                all_asked.set()
            return granted

        async def held(
            conn: AsyncConnection, keys: Sequence[str], load: Load = load
        ) -> dict[str, Row]:
            rows = await load(conn, keys)
            await asyncio.wait_for(all_asked.wait(), 10)
            await asyncio.sleep(hold)
            return rows

        async def filling(
            batch: dict[str, tuple[str, bytes, int, bytes]],
            number: int = number,
            fill_many: Any = fill_many,
        ) -> dict[str, bool]:
            done: dict[str, bool] = await fill_many(batch)
            if any(done.values()):
                filled_by.append(number)
            return done

        def noticing(name: str, number: int = number, on_fill: Any = on_fill) -> None:
            noticed_at.setdefault(number, time.monotonic())
            on_fill(name)

        async def answering(
            name: str, number: int = number, get: Any = reader_get, *, min_version: int = 0
        ) -> Any:
            started = time.monotonic()
            entry = await get(name, min_version=min_version)
            calls[number].append((started, time.monotonic()))
            return entry

        monkeypatch.setattr(ns.store, "take_leases", asking)
        monkeypatch.setattr(ns.store, "fill_many", filling)
        monkeypatch.setattr(ns.table, "load", held)
        monkeypatch.setattr(reader, "on_fill", noticing)
        monkeypatch.setattr(reader, "get", answering)

    answers = await asyncio.gather(
        *(instances[i % 3][1].get("plain", key) for i in range(300)), return_exceptions=True
    )
    bad = [(i, a) for i, a in enumerate(answers) if not (isinstance(a, Value) and a.value == b"v")]
    assert not bad, (len(bad), bad[:5])
    assert loads_of(key) == 1
    assert len(filled_by) == 1
    [holder] = filled_by
    waiters = [n for n in range(3) if n != holder]
    assert set(waiters) <= set(noticed_at), f"fill notices reached instances {set(noticed_at)}"
    for number in waiters:
        # The calls that had started when the last instance asked for the
        # lease (*hold* before the fill) were all waiting when the fill came
        # (a call that started later may have found the value already filled
        # before the notice arrived). They share one wait, so the first of
        # them to be answered shows when that wait ended.
        woken = min(end for start, end in calls[number] if start < all_asked_at)
        noticed = noticed_at[number]
        assert noticed <= woken, (number, woken - noticed)


class WakeAttempt:
    """The moments of one attempt of the wake-up test."""

    def __init__(self) -> None:
        self.leased = asyncio.Event()
        self.refused = asyncio.Event()
        self.waiting = self.filling = self.answered = 0.0


async def test_an_instance_waiting_for_a_fill_is_woken_by_its_notice_not_by_its_poll(
    start: Start, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One Get on each of two instances. The waiter polls Redis 10, 30, 70,
    150, 250, 350 ms into its wait (reads.py); the holder's fill is timed for
    300 ms into it. Woken by the fill's notice, the waiter answers within
    milliseconds; by its poll, at 350 ms at the earliest. An attempt whose fill
    came late (a busy machine) does not count; up to three are made."""
    fill_at, late, quick = 0.3, 0.02, 0.015
    (holder, holder_client), (waiter, waiter_client) = await start(), await start()
    holder_ns, waiter_ns = strategy(holder, "plain"), strategy(waiter, "plain")
    holder_take, waiter_take = holder_ns.store.take_leases, waiter_ns.store.take_leases
    load, fill_many = holder_ns.table.load, holder_ns.store.fill_many
    waiter_get = waiter_ns.reader.get
    now = WakeAttempt()

    async def holder_leases(
        tokens: dict[str, str], lease_ms: int, **options: Any
    ) -> dict[str, bytes | bool]:
        granted = await holder_take(tokens, lease_ms, **options)
        now.leased.set()
        return granted

    async def waiter_leases(
        tokens: dict[str, str], lease_ms: int, **options: Any
    ) -> dict[str, bytes | bool]:
        granted = await waiter_take(tokens, lease_ms, **options)
        now.waiting = time.monotonic()  # refused: its wait starts now
        now.refused.set()
        return granted

    async def timed_load(conn: AsyncConnection, keys: Sequence[str]) -> dict[str, Row]:
        rows = await load(conn, keys)
        await asyncio.wait_for(now.refused.wait(), 5)
        await asyncio.sleep(now.waiting + fill_at - time.monotonic())
        return rows

    async def timed_fill(batch: dict[str, tuple[str, bytes, int, bytes]]) -> dict[str, bool]:
        now.filling = time.monotonic()
        return await fill_many(batch)

    async def answered(name: str, *, min_version: int = 0) -> Any:
        entry = await waiter_get(name, min_version=min_version)
        now.answered = time.monotonic()
        return entry

    monkeypatch.setattr(holder_ns.store, "take_leases", holder_leases)
    monkeypatch.setattr(waiter_ns.store, "take_leases", waiter_leases)
    monkeypatch.setattr(holder_ns.table, "load", timed_load)
    monkeypatch.setattr(holder_ns.store, "fill_many", timed_fill)
    monkeypatch.setattr(waiter_ns.reader, "get", answered)
    lags: list[float] = []
    for attempt in range(3):
        name, now = f"{key}-{attempt}", WakeAttempt()
        await holder_client.put("plain", name, b"v")
        first = asyncio.create_task(holder_client.get("plain", name))
        await asyncio.wait_for(now.leased.wait(), 5)
        second = await waiter_client.get("plain", name)
        assert ((await first).layer, second.layer) == (Layer.DATABASE, Layer.REDIS)
        if now.filling - now.waiting <= fill_at + late:
            lags.append(now.answered - now.filling)
            if lags[-1] <= quick:
                break
    assert lags, "every fill came late: the machine is too busy to time this"
    assert min(lags) <= quick, lags


async def test_a_reader_that_missed_just_before_another_instances_fill_does_not_load_again(
    start: Start, key: str, monkeypatch: pytest.MonkeyPatch, loads_of: Callable[[str], int]
) -> None:
    (first, first_client), (late, late_client) = await start(), await start()
    await first_client.put("plain", key, b"v")
    late_missed, first_filled = asyncio.Event(), asyncio.Event()
    late_store, first_store = strategy(late, "plain").store, strategy(first, "plain").store
    take_leases, fill_many = late_store.take_leases, first_store.fill_many

    async def after_the_fill(
        tokens: dict[str, str], lease_ms: int, **options: Any
    ) -> dict[str, bytes | bool]:
        late_missed.set()  # its GET found nothing
        await asyncio.wait_for(first_filled.wait(), 5)
        return await take_leases(tokens, lease_ms, **options)

    async def filling(batch: dict[str, tuple[str, bytes, int, bytes]]) -> dict[str, bool]:
        done = await fill_many(batch)
        first_filled.set()
        return done

    monkeypatch.setattr(late_store, "take_leases", after_the_fill)
    monkeypatch.setattr(first_store, "fill_many", filling)
    late_get = asyncio.create_task(late_client.get("plain", key))
    await asyncio.wait_for(late_missed.wait(), 5)
    assert (await first_client.get("plain", key)).layer is Layer.DATABASE
    assert (await late_get).value == b"v"
    assert loads_of(key) == 1


async def test_batch_get_answers_every_key_when_one_waits_for_another_instances_fill(
    start: Start, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A BatchGet of two missing keys: by the time it asks for their leases,
    one was filled (its value comes back instead of a lease) and the other is
    leased by another instance, whose fill it then waits for. Both keys are
    answered (the one found was once dropped: INTERNAL, a KeyError)."""
    (a, client_a), (b, client_b) = await start(), await start()
    found, waited = f"{key}-found", f"{key}-waited"
    await client_b.put("plain", found, b"f")
    await client_b.put("plain", waited, b"w")
    held = HeldLoad(strategy(b, "plain").table)
    monkeypatch.setattr(strategy(b, "plain").table, "load", held)
    loading = asyncio.create_task(client_b.get("plain", waited))
    await asyncio.wait_for(held.loaded.wait(), 5)  # b holds the lease of *waited*

    store = strategy(a, "plain").store
    take_leases, asked = store.take_leases, asyncio.Event()

    async def after_a_fill(
        tokens: dict[str, str], lease_ms: int, **options: Any
    ) -> dict[str, bytes | bool]:
        if len(tokens) == 2:
            await client_a.get("plain", found)  # fills *found* meanwhile
        granted = await take_leases(tokens, lease_ms, **options)
        if len(tokens) == 2:
            asked.set()
        return granted

    monkeypatch.setattr(store, "take_leases", after_a_fill)
    batch = asyncio.create_task(client_a.batch_get("plain", [found, waited]))
    await asyncio.wait_for(asked.wait(), 5)
    held.release.set()
    answers = await asyncio.wait_for(batch, 5)
    assert [(e.key, e.value) for e in answers] == [(found, b"f"), (waited, b"w")]
    assert (await loading).value == b"w"


async def test_stale_value_is_served_at_once_while_one_reader_refreshes_it(
    start: Start, own_backend: Backend, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, client = await start()
    ns = strategy(app, "swr")
    version = await client.put("swr", key, b"v1")
    assert (await client.get("swr", key)).layer is Layer.DATABASE
    stale_from = await fresh_until_ms(own_backend, "swr", key)
    await asyncio.sleep(max(0.0, stale_from - now_ms()) / 1000 + 0.01)
    # Refreshes are held after their SQL read: nothing can be filled until the
    # stale answers are in, so none of them waited for a load.
    held = HeldLoad(ns.table)
    monkeypatch.setattr(ns.table, "load", held)
    stale = await asyncio.gather(*(client.get("swr", key) for _ in range(20)))
    assert {(s.value, s.version, s.layer, s.stale) for s in stale} == {
        (b"v1", version, Layer.REDIS, True)
    }
    await asyncio.wait_for(held.loaded.wait(), 5)  # the background refresh
    held.release.set()
    fresh = await poll(lambda: client.get("swr", key), lambda v: not v.stale, within=5)
    assert (fresh.value, fresh.layer, fresh.stale) == (b"v1", Layer.REDIS, False)
    assert fresh.version >= version
    assert held.calls == 1  # one refresh for twenty stale reads
    assert await fresh_until_ms(own_backend, "swr", key) > stale_from


async def test_a_refresh_decided_before_another_instances_refresh_does_not_load_again(
    start: Start, own_backend: Backend, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (first, first_client), (late, late_client) = await start(), await start()
    first_ns, late_ns = strategy(first, "swr"), strategy(late, "swr")
    await first_client.put("swr", key, b"v")
    await first_client.get("swr", key)
    stale_from = await fresh_until_ms(own_backend, "swr", key)
    await asyncio.sleep(max(0.0, stale_from - now_ms()) / 1000 + 0.01)
    deciding, first_refreshed, decided = asyncio.Event(), asyncio.Event(), asyncio.Event()
    late_take, first_fill, load = (
        late_ns.store.take_leases,
        first_ns.store.fill_many,
        late_ns.table.load,
    )
    granted: list[bytes | bool] = []
    late_loads: list[Sequence[str]] = []
    late_loaded = asyncio.Event()

    async def after_the_other_refresh(
        tokens: dict[str, str], lease_ms: int, **options: Any
    ) -> dict[str, bytes | bool]:
        deciding.set()  # it read the stale entry and chose to refresh it
        await asyncio.wait_for(first_refreshed.wait(), 5)
        result = await late_take(tokens, lease_ms, **options)
        granted.append(result[key])
        decided.set()
        return result

    async def filling(batch: dict[str, tuple[str, bytes, int, bytes]]) -> dict[str, bool]:
        done = await first_fill(batch)
        first_refreshed.set()
        return done

    async def counted_load(conn: AsyncConnection, keys: Sequence[str]) -> dict[str, Row]:
        late_loads.append(keys)
        late_loaded.set()
        return await load(conn, keys)

    monkeypatch.setattr(late_ns.store, "take_leases", after_the_other_refresh)
    monkeypatch.setattr(first_ns.store, "fill_many", filling)
    monkeypatch.setattr(late_ns.table, "load", counted_load)
    assert (await late_client.get("swr", key)).stale
    await asyncio.wait_for(deciding.wait(), 5)
    assert (await first_client.get("swr", key)).stale  # its refresh runs and fills
    await asyncio.wait_for(decided.wait(), 5)
    for _ in range(250):  # until its refresh has finished, whatever it decided
        if not len(late_ns.reader._refreshes):
            break
        await asyncio.sleep(0.02)
    assert late_loads == []


async def test_hot_key_is_refreshed_before_it_expires_and_a_cold_key_is_not(
    start: Start, own_backend: Backend, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """XFetch with ttl 1 s, beta 6 and loads of 50 ms: each read of a key
    refreshes it early with chance exp(-remaining / 300 ms), so a key read
    every ~10 ms is all but certain to be refreshed, and the new value
    stored, before it expires; a key read once is never refreshed (XFetch acts
    on reads), so it expires."""
    app, client = await start()
    ns = strategy(app, "xfetch")
    hot, cold = f"{key}-hot", f"{key}-cold"
    for name in (hot, cold):
        await client.put("xfetch", name, b"v")
    loads: list[tuple[str, float]] = []
    fills: list[tuple[str, float]] = []
    load, fill_many = ns.table.load, ns.store.fill_many

    async def slow_load(conn: AsyncConnection, keys: Sequence[str]) -> dict[str, Row]:
        loads.extend((name, now_ms()) for name in keys)
        await asyncio.sleep(0.05)  # XFetch's delta: how long a load takes
        return await load(conn, keys)

    async def timed_fill(batch: dict[str, tuple[str, bytes, int, bytes]]) -> dict[str, bool]:
        done = await fill_many(batch)
        fills.extend((name, now_ms()) for name, ok in done.items() if ok)
        return done

    monkeypatch.setattr(ns.table, "load", slow_load)
    monkeypatch.setattr(ns.store, "fill_many", timed_fill)
    await asyncio.gather(client.get("xfetch", hot), client.get("xfetch", cold))
    hot_until = await fresh_until_ms(own_backend, "xfetch", hot)
    cold_until = await fresh_until_ms(own_backend, "xfetch", cold)
    loads.clear()
    fills.clear()
    answers = []
    while now_ms() < max(hot_until, cold_until) + 20:
        answers.append(await client.get("xfetch", hot))
        await asyncio.sleep(0.01)
    hot_loads = [at for name, at in loads if name == hot]
    hot_fills = [at for name, at in fills if name == hot]
    assert hot_loads, "the hot key was not refreshed"
    assert hot_fills[0] < hot_until, f"refreshed {hot_fills[0] - hot_until:.0f} ms after expiry"
    assert {(a.layer, a.stale) for a in answers} == {(Layer.REDIS, False)}
    assert [name for name, _ in loads if name == cold] == []
    assert (await client.get("xfetch", cold)).layer is Layer.DATABASE  # it expired
