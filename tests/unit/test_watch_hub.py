"""The Watch hub (invalidation/watch.py) without servers: which watcher gets
which event, RESET on subscription, on a dropped subscription and on
overflow, and the bounded backlog. ``next(0)`` answers HEARTBEAT at once
when nothing is pending, so no test waits."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from cachecoord.invalidation.messages import Invalidation
from cachecoord.invalidation.watch import (
    HEARTBEAT,
    OVERFLOW,
    RESUBSCRIBED,
    SUBSCRIBED,
    Backlog,
    EventKind,
    Watcher,
    WatchEvent,
    WatchHub,
)


def change(
    namespace: str = "ns", key: str | None = "k", version: int = 1, reason: str = "put"
) -> Invalidation:
    return Invalidation(namespace, key, version, reason, "origin", at=0.0)


def event(namespace: str = "ns", key: str | None = "k", version: int = 1) -> WatchEvent:
    return WatchEvent(EventKind.INVALIDATED, change(namespace, key, version))


async def pending(watcher: Watcher) -> list[WatchEvent]:
    """Everything the watcher would read now."""
    events = []
    while (next_event := await watcher.next(0)) is not HEARTBEAT:
        events.append(next_event)
    return events


@pytest.fixture
async def hub() -> AsyncIterator[WatchHub]:
    hub = WatchHub(max_backlog=3)
    yield hub
    assert len(hub) == 0, "every watcher left"


async def test_a_watch_starts_with_a_reset(hub: WatchHub) -> None:
    async with hub.watch(["ns"], "") as watcher:
        assert await pending(watcher) == [SUBSCRIBED]


async def test_a_watcher_gets_the_changes_of_its_namespaces_and_prefix_only(hub: WatchHub) -> None:
    async with hub.watch(["ns", "other"], "user:") as watcher:
        await pending(watcher)
        hub.publish(change("ns", "user:1", 2))
        hub.publish(change("ns", "order:1", 3))
        hub.publish(change("unwatched", "user:1", 4))
        hub.publish(change("other", "user:2", 5))
        assert await pending(watcher) == [event("ns", "user:1", 2), event("other", "user:2", 5)]


async def test_a_whole_namespace_invalidation_reaches_every_prefix(hub: WatchHub) -> None:
    async with hub.watch(["ns"], "user:") as watcher:
        await pending(watcher)
        hub.publish(change("ns", None, 0, "invalidate"))
        whole = change("ns", None, 0, "invalidate")
        assert await pending(watcher) == [WatchEvent(EventKind.INVALIDATED, whole)]


async def test_a_fill_notice_is_not_a_change(hub: WatchHub) -> None:
    async with hub.watch(["ns"], "") as watcher:
        await pending(watcher)
        hub.publish(change(reason="fill"))
        assert await pending(watcher) == []


async def test_events_the_log_cannot_replay_reset_every_watcher_of_the_namespace_once(
    hub: WatchHub,
) -> None:
    async with (
        hub.watch(["ns", "other"], "") as both,
        hub.watch(["ns"], "") as one,
        hub.watch(["other"], "") as other,
    ):
        await pending(both)
        await pending(one)
        await pending(other)
        hub.publish(change())
        hub.reset("ns")
        assert await pending(other) == []
        hub.publish(change(version=2))  # covered by the RESET, not read yet
        assert await pending(both) == [RESUBSCRIBED]
        hub.publish(change(version=3))  # both has read its RESET; one has not
        assert await pending(both) == [event(version=3)]
        assert await pending(one) == [RESUBSCRIBED]


async def test_a_slow_reader_gets_one_overflow_reset_then_events_resume(hub: WatchHub) -> None:
    async with hub.watch(["ns"], "") as watcher:
        await pending(watcher)
        for version in range(1, 5):  # one more than the backlog holds
            hub.publish(change(version=version))
        assert watcher.backlog == 1
        hub.publish(change(version=5))  # covered by the RESET
        assert await pending(watcher) == [OVERFLOW]
        hub.publish(change(version=6))
        assert await pending(watcher) == [event(version=6)]


async def test_a_watcher_that_left_gets_nothing(hub: WatchHub) -> None:
    async with hub.watch(["ns"], "") as watcher:
        pass
    hub.publish(change())
    hub.reset("ns")
    assert watcher.backlog == 1  # only its SUBSCRIBED, never read


def test_a_backlog_holds_up_to_its_bound() -> None:
    backlog = Backlog(2)
    backlog.offer(event(version=1))
    backlog.offer(event(version=2))
    assert [backlog.take(), backlog.take(), backlog.take()] == [
        event(version=1),
        event(version=2),
        None,
    ]


def test_a_reset_replaces_what_is_pending_and_covers_what_follows_until_read() -> None:
    backlog = Backlog(5)
    backlog.offer(event(version=1))
    backlog.offer(RESUBSCRIBED)
    backlog.offer(event(version=2))
    assert len(backlog) == 1
    assert backlog.take() == RESUBSCRIBED
    backlog.offer(event(version=3))
    assert backlog.take() == event(version=3)


def test_an_overflow_is_a_reset_of_its_own() -> None:
    backlog = Backlog(1)
    backlog.offer(event(version=1))
    backlog.offer(event(version=2))
    assert backlog.take() == OVERFLOW
    assert backlog.take() is None
