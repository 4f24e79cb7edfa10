"""The consistency observer's rules, without servers: what is a violation,
which changes are sampled, and which version a layer is held to."""

from __future__ import annotations

import asyncio
import math

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from cachecoord.consistency import Observer, Versions, Violation, nines, violations
from cachecoord.invalidation.messages import Invalidation


class Layers:
    """One namespace's layers as a test sets them."""

    def __init__(self, versions: Versions, *, lag: bool = False) -> None:
        self.held = versions
        self.lag = lag
        self.database_reads = 0
        self.fail: Exception | None = None

    @property
    def postgres_may_lag(self) -> bool:
        return self.lag

    async def versions(self, key: str) -> Versions:
        if self.fail is not None:
            raise self.fail
        return self.held

    async def database_version(self, key: str) -> int:
        self.database_reads += 1
        return self.held.database


class Counts:
    def __init__(self) -> None:
        self.recorded: list[tuple[str, int, int]] = []

    async def record(self, namespace: str, checks: int, violations: int) -> None:
        self.recorded.append((namespace, checks, violations))


def change(version: int, reason: str = "put", key: str | None = "k") -> Invalidation:
    return Invalidation("ns", key, version, reason, "elsewhere")


async def observe(
    layers: Layers, *changes: Invalidation, rolls: list[float] | None = None
) -> tuple[Counts, list[Violation]]:
    counts, found = Counts(), list[Violation]()
    rng = iter(rolls or [0.0] * len(changes))
    observer = Observer(
        {"ns": layers},
        counts,
        fraction=0.5,
        delay=0,
        rng=lambda: next(rng),
        on_violation=found.append,
    )
    for item in changes:
        observer.saw(item)
    for _ in range(10):
        await asyncio.sleep(0)
    await observer.close()
    return counts, found


def test_an_older_version_in_a_cache_layer_is_a_violation() -> None:
    held = Versions(near=3, redis=4, database=5)
    assert violations(held, 5, check_database=True) == [("near", 3), ("redis", 4)]
    assert violations(held, 4, check_database=True) == [("near", 3)]
    assert violations(held, 3, check_database=True) == []


def test_an_empty_layer_is_not_a_violation_and_newer_versions_are_fine() -> None:
    assert violations(Versions(None, None, 9), 7, check_database=True) == []


def test_postgres_behind_is_a_violation_unless_it_may_lag() -> None:
    held = Versions(None, 8, 7)
    assert violations(held, 8, check_database=True) == [("database", 7)]
    assert violations(held, 8, check_database=False) == []


def test_nines() -> None:
    assert nines(1000, 1) == pytest.approx(3.0)
    assert nines(10**6, 0) == pytest.approx(6.0)  # what a million clean checks show
    assert nines(0, 0) == 0.0
    assert math.isclose(nines(100, 100), 0.0)


async def test_a_sampled_change_left_behind_is_reported_with_its_layer_and_path() -> None:
    counts, found = await observe(Layers(Versions(None, 4, 5)), change(5))
    assert found == [Violation("ns", "k", "redis", "write", 4, 5)]
    assert counts.recorded == [("ns", 1, 1)]


async def test_paths_follow_the_reason() -> None:
    layers = Layers(Versions(1, None, 5))
    _, found = await observe(layers, change(5, "db_change"), change(5, "invalidate"))
    assert sorted(v.path for v in found) == ["database", "invalidation"]


async def test_only_the_sampled_fraction_is_checked() -> None:
    layers = Layers(Versions(None, 1, 1))
    counts, _ = await observe(layers, change(1), change(1), rolls=[0.49, 0.5])
    assert counts.recorded == [("ns", 1, 0)]


async def test_fill_notices_and_whole_namespace_changes_are_not_checked() -> None:
    counts, _ = await observe(Layers(Versions(None, 1, 1)), change(1, "fill"), change(0, key=None))
    assert counts.recorded == []


async def test_a_plain_invalidate_is_held_to_what_postgres_had_when_it_was_sampled() -> None:
    layers = Layers(Versions(None, 6, 7))
    _, found = await observe(layers, change(0, "invalidate"))
    assert layers.database_reads == 1
    assert found == [Violation("ns", "k", "redis", "invalidation", 6, 7)]


async def test_a_check_whose_layer_cannot_be_read_is_skipped_not_counted() -> None:
    layers = Layers(Versions(None, 1, 5))
    layers.fail = RedisConnectionError("down")
    counts, found = await observe(layers, change(5))
    assert counts.recorded == []
    assert found == []
