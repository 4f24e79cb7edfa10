"""Replaying the invalidation log, without servers: the resume_token codec,
the rule that says whether the log still reaches back to a position, a Watch
stream resumed from a token (replayed changes, then Resumed, then live ones,
none twice), and an instance's feed catching up after its subscription
dropped. The log is a list in memory (FakeLog), trimmed as the test says."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Sequence

import pytest

from cachecoord.invalidation import resume_token
from cachecoord.invalidation.feed import Feed
from cachecoord.invalidation.messages import Invalidation
from cachecoord.invalidation.positions import is_newer, reaches_back
from cachecoord.invalidation.watch import (
    HEARTBEAT,
    OVERFLOW,
    RESUBSCRIBED,
    SUBSCRIBED,
    TOO_OLD,
    EventKind,
    Watcher,
    WatchEvent,
    WatchHub,
)
from cachecoord.storage.invalidation_log import LogEntry, PartitionState


class FakeLog:
    """A log of *partitions* partitions in memory; positions are ``<n>-0``."""

    def __init__(self, namespace: str = "ns", partitions: int = 2) -> None:
        self.namespace = namespace
        self.partitions = partitions
        self.entries: list[list[tuple[str, Invalidation]]] = [[] for _ in range(partitions)]
        self.last = [f"{p + 1}-0" for p in range(partitions)]  # a marker per partition
        self.trimmed_to = ["0-0"] * partitions  # entries up to this one are gone
        self._clock = 100

    def append(self, key: str | None, version: int = 1) -> Invalidation:
        """A change of *key*, logged; returns its message as published."""
        partition = 0 if key is None else zlib.crc32(key.encode()) % self.partitions
        self._clock += 1
        position = f"{self._clock}-0"
        message = Invalidation(self.namespace, key, version, "put", "elsewhere", at=0.0)
        self.entries[partition].append((position, message))
        self.last[partition] = position
        return message.at_position(partition, position)

    def trim(self, partition: int) -> None:
        """Drop every entry of *partition* (its last-generated id stays)."""
        self.trimmed_to[partition] = self.last[partition]
        self.entries[partition].clear()

    async def positions(self) -> list[str]:
        return list(self.last)

    async def state(self, partition: int, position: str) -> PartitionState:
        held = any(p == position for p, _ in self.entries[partition]) or (
            position == f"{partition + 1}-0" and self.trimmed_to[partition] == "0-0"
        )
        return PartitionState(True, self.last[partition], held)

    async def read_after(
        self, partition: int, after: str, upto: str = "+", *, chunk: int = 500
    ) -> AsyncIterator[LogEntry]:
        for position, message in list(self.entries[partition]):
            if is_newer(position, after) and (upto == "+" or not is_newer(position, upto)):
                yield LogEntry(partition, position, message.encode())


class Source:
    """A feed's view for the hub: positions and log."""

    def __init__(self, log: FakeLog, positions: Sequence[str]) -> None:
        self.log = log
        self.positions = list(positions)


async def pending(watcher: Watcher) -> list[WatchEvent]:
    events = []
    while (event := await watcher.next(0)) is not HEARTBEAT:
        events.append(event)
    return events


def keys(events: list[WatchEvent]) -> list[str | None]:
    return [e.change.key if e.change else e.kind.value for e in events]


# -- the token codec -----------------------------------------------------------


def test_a_token_round_trips_its_positions() -> None:
    positions = {"users": ["1-0", "", "1796538143288-12"], "orders": ["7-0"]}
    token = resume_token.encode(positions)
    assert resume_token.decode(token, {"users": 3, "orders": 1}) == {
        "users": ("1-0", "", "1796538143288-12"),
        "orders": ("7-0",),
    }


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "v2.e30",
        "v1.!!!",
        resume_token.encode({"users": ["1-0"]}),  # other namespaces
        resume_token.encode({"ns": ["1-0"]}),  # one partition, not two
        resume_token.encode({"ns": ["1-0", "x-y"]}),  # not a position
        "v1." + "A" * 2_000_000,
    ],
)
def test_a_token_this_server_did_not_make_for_these_namespaces_is_refused(token: str) -> None:
    with pytest.raises(resume_token.InvalidToken):
        resume_token.decode(token, {"ns": 2})


# -- the too_old rule --------------------------------------------------------------


def test_the_log_reaches_back_to_a_position_whose_entry_is_still_there() -> None:
    assert reaches_back(PartitionState(True, "9-0", holds_position=True), "5-0")


def test_the_log_reaches_back_to_its_last_position_even_when_trimmed_by_age() -> None:
    assert reaches_back(PartitionState(True, "5-0", holds_position=False), "5-0")


@pytest.mark.parametrize(
    ("state", "position"),
    [
        (PartitionState(True, "9-0", holds_position=False), "5-0"),  # trimmed past it
        (PartitionState(False, "", holds_position=False), "5-0"),  # Redis lost the log
        (PartitionState(True, "4-0", holds_position=False), "5-0"),  # a replica behind it
        (PartitionState(True, "9-0", holds_position=True), ""),  # no position at all
    ],
    ids=["trimmed", "missing", "behind", "no-position"],
)
def test_the_log_is_too_short_otherwise(state: PartitionState, position: str) -> None:
    assert not reaches_back(state, position)


def test_positions_order_by_time_then_sequence() -> None:
    assert is_newer("10-0", "9-5")
    assert is_newer("9-6", "9-5")
    assert not is_newer("9-5", "9-5")
    assert is_newer("1-0", "")


# -- Watch streams resumed from a token -------------------------------------------


async def test_a_resumed_stream_gets_what_it_missed_then_resumed_then_live_changes() -> None:
    log = FakeLog()
    hub = WatchHub(max_backlog=100)
    source = Source(log, log.last)
    hub.add_source("ns", source)
    async with hub.watch(["ns"], "") as watcher:
        assert await pending(watcher) == [SUBSCRIBED]
        token = watcher.resume_token
    missed = [log.append(f"k{n}", n) for n in range(5)]
    source.positions = list(log.last)  # the instance applied them
    async with hub.watch(["ns"], "", token) as watcher:
        late = log.append("late")  # logged after the watcher registered
        hub.publish(late)
        hub.publish(missed[-1])  # received twice: never sent twice
        events = await pending(watcher)
    assert sorted(map(str, keys(events[:5]))) == [
        f"k{n}" for n in range(5)
    ]  # in order per partition
    assert events[5] == WatchEvent(EventKind.RESUMED, replayed=5)
    assert keys(events[6:]) == ["late"]


async def test_a_resumed_stream_skips_other_prefixes_but_its_token_moves_past_them() -> None:
    log = FakeLog(partitions=1)
    hub = WatchHub(max_backlog=100)
    source = Source(log, log.last)
    hub.add_source("ns", source)
    async with hub.watch(["ns"], "user:") as watcher:
        await pending(watcher)
        token = watcher.resume_token
    log.append("order:1")
    log.append("user:1")
    log.append("order:2")
    source.positions = list(log.last)
    async with hub.watch(["ns"], "user:", token) as watcher:
        events = await pending(watcher)
        assert keys(events) == ["user:1", "resumed"]
        assert resume_token.decode(watcher.resume_token, {"ns": 1}) == {"ns": (log.last[0],)}


async def test_a_token_the_log_no_longer_reaches_gets_too_old_then_live_changes() -> None:
    log = FakeLog()
    hub = WatchHub(max_backlog=100)
    source = Source(log, log.last)
    hub.add_source("ns", source)
    async with hub.watch(["ns"], "") as watcher:
        await pending(watcher)
        token = watcher.resume_token
    log.append("k1")
    log.append("k2")
    log.trim(0)
    log.trim(1)
    log.append("k3")
    source.positions = list(log.last)
    async with hub.watch(["ns"], "", token) as watcher:
        assert await pending(watcher) == [TOO_OLD]
        fresh = resume_token.decode(watcher.resume_token, {"ns": 2})
        assert fresh == {"ns": tuple(log.last)}
        hub.publish(log.append("k4"))
        assert keys(await pending(watcher)) == ["k4"]


async def test_a_reset_while_replaying_covers_the_replay() -> None:
    log = FakeLog()
    hub = WatchHub(max_backlog=100)
    source = Source(log, log.last)
    hub.add_source("ns", source)
    async with hub.watch(["ns"], "") as watcher:
        await pending(watcher)
        token = watcher.resume_token
    for n in range(3):
        log.append(f"k{n}")
    source.positions = list(log.last)
    async with hub.watch(["ns"], "", token) as watcher:
        first = await watcher.next(0)
        assert first.kind is EventKind.INVALIDATED
        hub.reset("ns")
        assert await pending(watcher) == [RESUBSCRIBED]


async def test_live_changes_beyond_the_backlog_while_replaying_overflow() -> None:
    log = FakeLog(partitions=1)
    hub = WatchHub(max_backlog=2)
    source = Source(log, log.last)
    hub.add_source("ns", source)
    async with hub.watch(["ns"], "") as watcher:
        await pending(watcher)
        token = watcher.resume_token
    log.append("k0")
    source.positions = list(log.last)
    async with hub.watch(["ns"], "", token) as watcher:
        for n in range(3):
            hub.publish(log.append(f"live{n}"))
        assert await pending(watcher) == [OVERFLOW]


# -- an instance catching up after its subscription dropped ------------------------


class Recorder:
    def __init__(self) -> None:
        self.applied: list[str | None] = []
        self.calls: list[str] = []

    def apply(self, message: Invalidation) -> None:
        self.applied.append(message.key)


def feed_of(log: FakeLog, recorder: Recorder) -> Feed:
    return Feed(
        "ns",
        log,
        [recorder.apply],
        on_suspend=lambda: recorder.calls.append("suspend"),
        on_resume=lambda: recorder.calls.append("resume"),
        on_lost=[lambda: recorder.calls.append("lost")],
    )


async def test_a_feed_without_positions_forgets_everything_then_takes_the_logs() -> None:
    log, recorder = FakeLog(), Recorder()
    feed = feed_of(log, recorder)
    assert await feed.catch_up() == -1
    assert recorder.calls == ["lost", "resume"]
    assert list(feed.positions) == log.last


async def test_a_feed_replays_what_it_missed_once_and_skips_it_live() -> None:
    log, recorder = FakeLog(), Recorder()
    feed = feed_of(log, recorder)
    await feed.catch_up()
    recorder.calls.clear()
    feed.receive(log.append("seen"))
    feed.suspend()
    missed = [log.append(f"k{n}") for n in range(4)]
    assert await feed.catch_up() == 4
    assert recorder.calls == ["suspend", "resume"]
    for message in missed:  # the live messages, arriving after the replay
        feed.receive(message)
    assert sorted(k or "" for k in recorder.applied) == sorted(["seen", "k0", "k1", "k2", "k3"])


async def test_a_feed_whose_log_was_trimmed_past_it_forgets_everything() -> None:
    log, recorder = FakeLog(), Recorder()
    feed = feed_of(log, recorder)
    await feed.catch_up()
    recorder.calls.clear()
    feed.suspend()
    log.append("k1")
    log.append("k2")
    log.trim(0)
    log.trim(1)
    assert await feed.catch_up() == -1
    assert recorder.calls == ["suspend", "lost", "resume"]
    assert recorder.applied == []
