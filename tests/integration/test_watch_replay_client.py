"""The Python client's replaying Watch (``watch(resume=True, replay=True)``):
when its stream breaks it says INTERRUPTED at once, opens a new stream from
the last event's resume token, and yields the events missed meanwhile (made
on another instance), then RESUMED, then live events. Real servers; the
break is a cut TCP link, as a network failure would make it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from strategy_support import FAST_RECONNECT
from watch_support import CuttableLink, instance

from cachecoord.app import App
from cachecoord_client import AsyncClient, WatchEvent, WatchEventKind
from conftest import Backend


@pytest_asyncio.fixture(loop_scope="session")
async def writer(backend: Backend, tmp_path: Path) -> AsyncIterator[AsyncClient]:
    """A client of a second instance sharing backend_app's backends."""
    url, dsn, cluster = backend.url, backend.dsn, backend.cluster
    async with instance(tmp_path, url, dsn, "writer", cluster=cluster) as (_, client):
        yield client


async def next_event(events: object) -> WatchEvent:
    """The next event that is not a heartbeat."""
    while True:
        event: WatchEvent = await anext(events)  # type: ignore[call-overload]
        if event.kind is not WatchEventKind.HEARTBEAT:
            return event


async def test_a_replaying_watch_yields_what_it_missed_then_resumed(
    backend_app: App, writer: AsyncClient, key: str
) -> None:
    keys = [f"{key}-{i}" for i in range(5)]
    async with (
        CuttableLink(backend_app.port) as link,
        AsyncClient(f"127.0.0.1:{link.port}", options=FAST_RECONNECT) as client,
        client.watch(["blobs"], key_prefix=key, resume=True, replay=True) as events,
    ):
        first = await next_event(events)
        assert (first.kind, first.reason) == (WatchEventKind.RESET, "subscribed")
        assert first.resume_token

        link.cut()
        interrupted = await next_event(events)
        assert interrupted.kind is WatchEventKind.INTERRUPTED
        versions = {k: await writer.put("blobs", k, b"x") for k in keys}
        link.restore()

        replayed = [await next_event(events) for _ in keys]
        resumed = await next_event(events)
        live_version = await writer.put("blobs", keys[0], b"y")
        live = await next_event(events)

    # In order per key (per log partition), not across keys.
    assert sorted((e.kind, e.key, e.version) for e in replayed) == [
        (WatchEventKind.INVALIDATION, k, versions[k]) for k in keys
    ]
    assert (resumed.kind, resumed.replayed) == (WatchEventKind.RESUMED, len(keys))
    assert (live.kind, live.key, live.version) == (
        WatchEventKind.INVALIDATION,
        keys[0],
        live_version,
    )
    assert all(e.resume_token for e in [*replayed, resumed, live])


async def test_without_replay_a_resuming_watch_still_says_reset(
    backend_app: App, writer: AsyncClient, key: str
) -> None:
    async with (
        CuttableLink(backend_app.port) as link,
        AsyncClient(f"127.0.0.1:{link.port}", options=FAST_RECONNECT) as client,
        client.watch(["blobs"], key_prefix=key, resume=True) as events,
    ):
        await next_event(events)
        link.cut()
        broke = await next_event(events)
        link.restore()
        restarted = await next_event(events)

    assert (broke.kind, broke.reason) == (WatchEventKind.RESET, "reconnecting")
    assert (restarted.kind, restarted.reason) == (WatchEventKind.RESET, "subscribed")
