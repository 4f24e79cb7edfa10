"""Watch through real gRPC, real Redis and PostgreSQL (design 1 and 5).

A Watch stream starts with RESET(subscribed), then carries every change of
its namespaces made on any instance, a RESET whenever events may have been
missed (the instance's subscription was cut, or the client read too slowly),
and heartbeats when nothing happens. A slow reader costs the server a bounded
backlog, and streams opened and cancelled in bulk leave nothing behind.

Every test but the leak test runs twice: on a single Redis and on a Redis
Cluster (``backend``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio
from strategy_support import unique_namespace
from test_hold_lock import heap_in_use, settled_task_count
from watch_support import (
    CuttableLink,
    cut_subscriptions,
    instance,
    next_event,
    watchers,
)

from cachecoord.app import App
from cachecoord.config import Duration
from cachecoord.invalidation.watch import Watcher
from cachecoord_client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidArgument,
    NamespaceNotFound,
    Unavailable,
    WatchEvent,
    WatchEventKind,
)
from conftest import Backend

INVALIDATION, RESET, HEARTBEAT = (
    WatchEventKind.INVALIDATION,
    WatchEventKind.RESET,
    WatchEventKind.HEARTBEAT,
)
SUBSCRIBED = WatchEvent(RESET, reason="subscribed")


@pytest_asyncio.fixture(loop_scope="session")
async def writer(backend: Backend, tmp_path: Path) -> AsyncIterator[AsyncClient]:
    """A client of a second instance, named "writer", sharing backend_app's backends."""
    url, dsn, cluster = backend.url, backend.dsn, backend.cluster
    async with instance(tmp_path, url, dsn, "writer", cluster=cluster) as (_, client):
        yield client


def invalidation(key: str, version: int, reason: str, origin: str, ns: str = "blobs") -> WatchEvent:
    return WatchEvent(INVALIDATION, ns, key, False, version, reason, origin)


async def test_first_event_is_a_reset_saying_subscribed(backend_client: AsyncClient) -> None:
    async with backend_client.watch(["blobs", "users"]) as events:
        assert await next_event(events, heartbeats=True) == SUBSCRIBED


async def test_writes_on_another_instance_reach_the_watcher_with_their_details(
    backend_client: AsyncClient, writer: AsyncClient, key: str
) -> None:
    async with backend_client.watch(["blobs"], key_prefix=key) as events:
        assert await next_event(events) == SUBSCRIBED
        put = await writer.put("blobs", key, b"v1")
        deleted = await writer.delete("blobs", key)

        assert await next_event(events) == invalidation(key, put, "put", "writer")
        assert await next_event(events) == invalidation(key, deleted.version, "delete", "writer")
    assert deleted.version > put > 0


async def test_key_prefix_filters_keys_but_not_whole_namespace_invalidations(
    backend_client: AsyncClient, backend_app: App, key: str
) -> None:
    client, app = backend_client, backend_app
    async with client.watch(["short"], key_prefix=f"{key}-a") as events:
        assert await next_event(events) == SUBSCRIBED
        await client.put("short", f"{key}-b", b"not watched")
        version = await client.put("short", f"{key}-a1", b"watched")
        await client.invalidate("short", all=True)

        # The whole-namespace invalidation comes once per log partition (each
        # records it). In any order: on a cluster, the Put's message is
        # published by its key's shard and the namespace's by every shard.
        partitions = app.cache.strategy("short").log.partitions if app.cache else 0
        got = [await next_event(events) for _ in range(1 + partitions)]
        assert sorted(got, key=lambda e: e.all_keys) == [
            invalidation(f"{key}-a1", version, "put", app.origin, "short"),
            *[WatchEvent(INVALIDATION, "short", "", True, 0, "invalidate", app.origin)]
            * partitions,
        ]


@pytest.mark.parametrize(
    ("namespaces", "error", "says"),
    [
        pytest.param(["blobs", "nope"], NamespaceNotFound, "nope", id="unknown-namespace"),
        pytest.param([], InvalidArgument, "namespace", id="no-namespace"),
    ],
)
async def test_bad_watch_requests_fail_with_a_status_saying_why(
    backend_client: AsyncClient, namespaces: list[str], error: type[Exception], says: str
) -> None:
    with pytest.raises(error) as failed:
        async with backend_client.watch(namespaces) as events:
            await next_event(events)
    assert says in str(failed.value)


async def test_a_watch_given_a_timeout_ends_with_deadline_exceeded(
    backend_client: AsyncClient,
) -> None:
    async with backend_client.watch(["blobs"], timeout=0.3) as events:
        assert await next_event(events) == SUBSCRIBED
        with pytest.raises(DeadlineExceeded):
            await next_event(events)


async def test_cut_subscription_replays_what_was_missed_without_a_reset(
    own_backend: Backend, tmp_path: Path, key: str
) -> None:
    # A namespace of its own: on the cluster, own_backend is shared.
    ns = unique_namespace("watched")
    config = f'[namespaces.{ns}]\nkind = "managed"\n'
    url, dsn, cluster = own_backend.url, own_backend.dsn, own_backend.cluster
    async with (
        instance(tmp_path, url, dsn, "watched", cluster=cluster, namespaces=config) as (
            app,
            client,
        ),
        instance(tmp_path, url, dsn, "writer", cluster=cluster, namespaces=config) as (_, writer),
        client.watch([ns], key_prefix=key) as events,
    ):
        assert await next_event(events) == SUBSCRIBED
        async with cut_subscriptions(own_backend.kill_pubsub_connections, app):
            # Made while the instance cannot hear of them: replayed from the log.
            versions = [await writer.put(ns, f"{key}-{n}", b"while away") for n in range(3)]
        got = [await next_event(events) for _ in versions]
        # In order per key (per log partition), not across keys.
        assert sorted((e.kind, e.key, e.version) for e in got) == [
            (INVALIDATION, f"{key}-{n}", v) for n, v in enumerate(versions)
        ]
        version = await writer.put(ns, key, b"after the cut")
        assert await next_event(events) == invalidation(key, version, "put", "writer", ns)


async def test_cut_subscription_sends_reset_resubscribed_when_the_log_does_not_reach_back(
    own_backend: Backend, tmp_path: Path, key: str
) -> None:
    ns = unique_namespace("watched")
    # Every log entry older than 1 ms is trimmed at each append.
    config = f'[namespaces.{ns}]\nkind = "managed"\nlog_partitions = 1\nlog_max_age = "1ms"\n'
    url, dsn, cluster = own_backend.url, own_backend.dsn, own_backend.cluster
    async with (
        instance(tmp_path, url, dsn, "watched", cluster=cluster, namespaces=config) as (
            app,
            client,
        ),
        instance(tmp_path, url, dsn, "writer", cluster=cluster, namespaces=config) as (_, writer),
        client.watch([ns], key_prefix=key) as events,
    ):
        assert await next_event(events) == SUBSCRIBED
        async with cut_subscriptions(own_backend.kill_pubsub_connections, app):
            await asyncio.sleep(0.01)
            await writer.put(ns, f"{key}-1", b"while away")
            await writer.put(ns, f"{key}-2", b"while away")
        assert await next_event(events) == WatchEvent(RESET, reason="resubscribed")
        assert app.bus is not None
        await asyncio.wait_for(app.bus.subscribed.wait(), 5)
        version = await writer.put(ns, key, b"after the cut")
        assert await next_event(events) == invalidation(key, version, "put", "writer", ns)


async def test_a_broken_connection_ends_the_stream_on_both_sides(backend_app: App) -> None:
    app = backend_app
    baseline = watchers(app)
    async with (
        CuttableLink(app.port) as link,
        AsyncClient(f"127.0.0.1:{link.port}") as client,
        client.watch(["blobs"]) as events,
    ):
        assert await next_event(events) == SUBSCRIBED
        assert watchers(app) == baseline + 1

        link.cut()

        with pytest.raises(Unavailable):
            await next_event(events)
        with pytest.raises(StopAsyncIteration):
            await anext(events)  # ended for good: watch again for a new stream
        assert await _watchers_settle(app, baseline), "the server still serves the stream"


async def test_a_quiet_stream_gets_heartbeats(backend: Backend, tmp_path: Path) -> None:
    async with (
        instance(
            tmp_path, backend.url, backend.dsn, "beating", cluster=backend.cluster,
            watch_heartbeat=Duration(100),
        ) as (_, client),
        client.watch(["sessions"], key_prefix="nobody-writes-this-") as events,
    ):  # fmt: skip
        assert await next_event(events) == SUBSCRIBED
        started = time.monotonic()
        beats = [await next_event(events, within=1, heartbeats=True) for _ in range(3)]
        took = time.monotonic() - started

    assert beats == [WatchEvent(HEARTBEAT)] * 3
    assert 0.25 < took < 1.5, f"3 heartbeats 100 ms apart took {took:.2f} s"


async def test_sync_client_watches_until_closed_from_another_thread(
    backend_app: App, backend_client: AsyncClient, key: str
) -> None:
    app, client = backend_app, backend_client
    received: list[WatchEvent] = []
    subscribed, changed = threading.Event(), threading.Event()

    def watch(stream: Iterator[WatchEvent]) -> None:
        for event in stream:  # blocks between events; ends when closed
            received.append(event)
            (changed if subscribed.is_set() else subscribed).set()

    with Client(f"127.0.0.1:{app.port}") as sync:
        stream = sync.watch(["blobs"], key_prefix=key)
        reader = asyncio.create_task(asyncio.to_thread(watch, stream))
        assert await asyncio.to_thread(subscribed.wait, 5)
        version = await client.put("blobs", key, b"v")
        assert await asyncio.to_thread(changed.wait, 5)
        await asyncio.to_thread(stream.close)  # the thread is blocked in next()
        await asyncio.wait_for(reader, 5)

    assert [dataclasses.replace(e, resume_token="") for e in received] == [
        SUBSCRIBED,
        invalidation(key, version, "put", app.origin),
    ]
    assert await _watchers_settle(app, 0)


async def test_slow_reader_costs_a_bounded_backlog_then_gets_reset_overflow_and_resumes(
    backend: Backend,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    key: str,
) -> None:
    """The slow client stops reading; once its HTTP/2 window is full, the
    server holds at most `watch_backlog` events for it, then a RESET. A fast
    client of the same traffic keeps up and never gets RESET.

    The slow client turns BDP probing off, so that its window stays at
    HTTP/2's 64 KiB: with probing the window grows to about 4 MiB, some
    90,000 small events to publish before anything backs up on the server.
    """
    backlog = 100
    peaks: dict[str, int] = {}
    offer = Watcher.offer_change

    def measured_offer(watcher: Watcher, change: object) -> None:
        offer(watcher, change)  # type: ignore[arg-type]
        peaks[watcher.key_prefix] = max(peaks.get(watcher.key_prefix, 0), watcher.backlog)

    monkeypatch.setattr(Watcher, "offer_change", measured_offer)
    padding = "p" * 200  # bigger events fill the window sooner
    async with (
        instance(
            tmp_path,
            backend.url,
            backend.dsn,
            "bounded",
            cluster=backend.cluster,
            watch_backlog=backlog,
        ) as (app, fast_client),
        AsyncClient(f"127.0.0.1:{app.port}", options=[("grpc.http2.bdp_probe", 0)]) as slow_client,
        fast_client.watch(["blobs"], key_prefix=key) as fast,
        slow_client.watch(["blobs"], key_prefix=f"{key}-") as slow,
    ):
        assert await next_event(fast) == await next_event(slow) == SUBSCRIBED
        fast_got: list[WatchEvent] = []
        published, caught_up = 0, asyncio.Event()

        async def read_fast() -> None:
            async for event in fast:
                fast_got.append(event)
                if len(fast_got) >= published:
                    caught_up.set()

        async def publish() -> None:
            """Invalidate a batch smaller than the backlog, and wait until the
            fast client has read it: only a reader that stops falls behind."""
            nonlocal published
            batch = [f"{key}-{published + i}-{padding}" for i in range(50)]
            published += len(batch)
            caught_up.clear()
            await fast_client.invalidate("blobs", batch)
            await asyncio.wait_for(caught_up.wait(), 5)

        reader = asyncio.create_task(read_fast())
        while peaks.get(f"{key}-", 0) < backlog and published < 5_000:
            await publish()
        await publish()  # the slow stream's backlog is full: these overflow it
        reader.cancel()

        assert peaks[f"{key}-"] == backlog, f"{published} events published"
        assert peaks[key] < backlog
        assert [e for e in fast_got if e.kind is not INVALIDATION] == []
        # The slow client reads what was in flight, then the RESET...
        in_flight = 0
        while (event := await next_event(slow)).kind is INVALIDATION:
            in_flight += 1
        assert event == WatchEvent(RESET, reason="overflow")
        assert in_flight <= published - backlog, "the backlog's events were dropped"
        # ...and events resume after it.
        version = await fast_client.put("blobs", f"{key}-after", b"v")
        assert await next_event(slow) == invalidation(f"{key}-after", version, "put", "bounded")
    print(f"\nslow Watch reader: {published} events published, {in_flight} reached it before RESET")


async def test_a_reader_that_keeps_up_is_not_reset_by_two_bulk_invalidations(
    backend_client: AsyncClient, key: str
) -> None:
    client = backend_client
    got: list[WatchEvent] = []
    done = asyncio.Event()
    async with client.watch(["blobs"], key_prefix=key) as events:
        assert await next_event(events) == SUBSCRIBED

        async def read() -> None:
            async for event in events:
                got.append(event)
                if len(got) == 2_000 or event.kind is RESET:
                    done.set()

        reader = asyncio.create_task(read())
        for batch in range(2):
            await client.invalidate("blobs", [f"{key}-{batch}-{i}" for i in range(1_000)])
        await asyncio.wait_for(done.wait(), 5)
        reader.cancel()

    assert [e.reason for e in got if e.kind is RESET] == []
    assert len(got) == 2_000


# Leaks (design 10: grpc #43360, #43462).


# Single Redis only: it measures leaks of the gRPC layer, whatever Redis is behind,
# and on a cluster the flushers' per-shard reads are tasks that come and go (the
# parameter also runs it among the single-Redis tests, before cluster_app starts).
@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_a_thousand_watch_streams_opened_and_cancelled_leave_nothing_behind(
    backend_app: App, backend_client: AsyncClient
) -> None:
    app, client = backend_app, backend_client
    # Warm up at full size first, as the HoldLock leak test does: the first
    # 1000 streams grow malloc's arenas, which it keeps for reuse.
    await churn(app, client, streams=1_000)
    tasks_before = await settled_task_count(len(asyncio.all_tasks()))
    rss_before, heap_before = psutil.Process().memory_info().rss, heap_in_use()
    gc.collect()
    blocks_before = sys.getallocatedblocks()

    await churn(app, client, streams=1_000)

    tasks_after = await settled_task_count(tasks_before)
    rss_grown = (psutil.Process().memory_info().rss - rss_before) / 2**20
    heap_grown = heap_in_use() - heap_before
    gc.collect()
    blocks_grown = sys.getallocatedblocks() - blocks_before
    print(
        f"\n1000 Watch streams: tasks {tasks_before} -> {tasks_after}, RSS {rss_grown:+.1f} MiB,"
        f" malloc heap in use {heap_grown / 1000:+.0f} B, Python objects {blocks_grown / 1000:+.1f}"
        " per stream"
    )
    assert tasks_after <= tasks_before, [t.get_name() for t in asyncio.all_tasks()]
    # Memory is judged by what is still allocated, by malloc (C) and by Python's
    # own allocator (objects): RSS also moves with what earlier tests left in the
    # arenas (seen: +31 MiB after the behaviour suites, -33 MiB after others,
    # with both flat), so it is shown only.
    assert heap_grown < 1_000 * 1_000, f"{heap_grown / 1000:.0f} B per stream still in use"
    assert blocks_grown < 1_000 * 5, f"{blocks_grown / 1000:.1f} Python objects per stream left"


async def churn(app: App, client: AsyncClient, streams: int) -> None:
    """Open *streams* Watch streams, all subscribed at once, and stop them
    the ways a consumer can: half leave an ``async with`` block, a quarter
    are tasks cancelled while waiting for an event, and a quarter break out
    of a bare ``async for`` (the dropped stream cancels its call). The
    server must end up serving none of them."""
    await _watchers_settle(app, 0)  # streams of earlier tests end asynchronously
    baseline = watchers(app)
    subscribed = [asyncio.Event() for _ in range(streams)]
    leave = asyncio.Event()

    async def in_block(ready: asyncio.Event) -> None:
        async with client.watch(["blobs"]) as events:
            assert (await anext(events)).reason == SUBSCRIBED.reason
            ready.set()
            await leave.wait()

    async def waiting(ready: asyncio.Event) -> None:
        async with client.watch(["blobs"], key_prefix="nobody-writes-this-") as events:
            await anext(events)
            ready.set()
            await anext(events)  # cancelled here

    async def bare(ready: asyncio.Event) -> None:
        async for _ in client.watch(["blobs"]):
            ready.set()
            await leave.wait()
            break

    kinds = [in_block, in_block, waiting, bare]
    tasks = [
        asyncio.create_task(kinds[i % 4](ready), name=f"watch-{i}")
        for i, ready in enumerate(subscribed)
    ]
    async with asyncio.timeout(20):
        await asyncio.gather(*(ready.wait() for ready in subscribed))
    assert watchers(app) == baseline + streams
    for task in tasks[2::4]:
        task.cancel()
    leave.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert await _watchers_settle(app, baseline), f"{watchers(app) - baseline} streams left"


async def _watchers_settle(app: App, count: int, within: float = 5.0) -> bool:
    """Whether the instance's Watch stream count comes down to *count* in time."""
    deadline = time.monotonic() + within
    while True:
        if watchers(app) <= count or time.monotonic() > deadline:
            return watchers(app) == count
        await asyncio.sleep(0.02)
