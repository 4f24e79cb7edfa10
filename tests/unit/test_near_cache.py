"""What the near cache (invalidation/near_cache.py) keeps, and for how long,
driven by a manual clock: issue 17 scenario 2 and its neighbours pinned
without servers. A read is ``begin`` .. ``finish``; what it ends with is kept
only if Redis confirmed it, nothing invalidated its key meanwhile, and its
age, counted from when the read began, is below the near cache's TTL."""

from __future__ import annotations

from manual_clock import ManualClock

from cachecoord.invalidation.near_cache import NearCache
from cachecoord.model import Entry, Layer
from cachecoord.strategies.read_decisions import loaded_read

# About a millisecond, exact in binary: the clock lands on expiries exactly.
MS = 1 / 1024


def entry(key: str = "k", version: int = 1, *, ttl_ms: int = 0, stale: bool = False) -> Entry:
    return Entry(key, b"v%d" % version, version, Layer.REDIS, stale, ttl_ms)


def near_cache(clock: ManualClock, *, max_entries: int = 10, ttl_ms: int = 1000) -> NearCache:
    return NearCache(max_entries, ttl_ms, clock=clock.monotonic)


def read(near: NearCache, clock: ManualClock, value: Entry, took: float = 0.0) -> None:
    """A read of *value* that Redis confirmed, taking *took* seconds."""
    began, read_at = near.begin(value.key), clock.monotonic()
    clock.advance(took)
    near.finish(value.key, began, value, read_at)


def test_a_confirmed_value_is_served_from_memory_as_a_fresh_near_hit() -> None:
    clock = ManualClock()
    near = near_cache(clock)
    read(near, clock, entry(version=3, stale=False))
    assert near.get("k") == Entry("k", b"v3", 3, Layer.NEAR, False, 0)


def test_an_entry_is_served_for_near_cache_ttl_counted_from_when_its_read_began() -> None:
    clock = ManualClock()
    near = near_cache(clock, ttl_ms=1000)
    read(near, clock, entry(), took=0.375)
    clock.advance(0.625 - MS)
    assert near.get("k") is not None
    clock.advance(MS)
    assert near.get("k") is None


def test_a_read_slower_than_near_cache_ttl_is_not_kept() -> None:
    clock = ManualClock()
    near = near_cache(clock, ttl_ms=300)
    read(near, clock, entry(), took=0.4)
    assert near.get("k") is None
    assert len(near) == 0


def test_an_entry_with_a_shorter_ttl_of_its_own_expires_with_it() -> None:
    clock = ManualClock()
    near = near_cache(clock, ttl_ms=1000)
    read(near, clock, entry(ttl_ms=250))
    clock.advance(0.25 - MS)
    assert near.get("k") is not None
    clock.advance(MS)
    assert near.get("k") is None


def test_a_row_whose_fill_was_refused_is_not_kept() -> None:
    """Issue 17, scenario 2: the refused fill says a write came after the
    lease; the row is answered to its reader but not kept."""
    clock = ManualClock()
    near = near_cache(clock)
    began = near.begin("k")
    row = Entry("k", b"old", 1, Layer.DATABASE, ttl_ms=10_000)
    answer = loaded_read(row, filled=False, query_as_of=3, fill_as_of=4, began=clock.monotonic())
    near.finish("k", began, answer.entry, answer.confirmed_at)
    assert near.get("k") is None


def test_a_row_whose_fill_was_accepted_is_kept_from_when_its_read_began() -> None:
    clock = ManualClock()
    near = near_cache(clock, ttl_ms=1000)
    began, started = near.begin("k"), clock.monotonic()
    clock.advance(0.25)  # the load and the fill
    row = Entry("k", b"v", 1, Layer.DATABASE, ttl_ms=10_000)
    answer = loaded_read(row, filled=True, query_as_of=3, fill_as_of=4, began=started)
    near.finish("k", began, answer.entry, answer.confirmed_at)
    assert near.get("k") is not None
    clock.advance(0.75)
    assert near.get("k") is None


def test_a_stale_value_is_not_kept() -> None:
    clock = ManualClock()
    near = near_cache(clock)
    read(near, clock, entry(stale=True))
    assert near.get("k") is None


def test_a_failed_read_keeps_nothing_and_leaves_no_trace() -> None:
    clock = ManualClock()
    near = near_cache(clock)
    began = near.begin("k")
    near.finish("k", began, None, None)
    read(near, clock, entry())
    assert near.get("k") is not None


def test_a_value_invalidated_while_it_was_being_read_is_not_kept() -> None:
    clock = ManualClock()
    near = near_cache(clock)
    began, read_at = near.begin("k"), clock.monotonic()
    near.invalidate("k", 2)  # the message of a write arrives mid-read
    near.finish("k", began, entry(version=1), read_at)
    assert near.get("k") is None


def test_an_invalidation_of_an_older_version_while_reading_still_counts() -> None:
    """The read may have begun before the change it reports reached Redis:
    a message arriving mid-read forbids keeping, whatever its version."""
    clock = ManualClock()
    near = near_cache(clock)
    began, read_at = near.begin("k"), clock.monotonic()
    near.invalidate("k", 1)
    near.finish("k", began, entry(version=5), read_at)
    assert near.get("k") is None


def test_a_flush_or_a_whole_namespace_invalidation_while_reading_forbids_keeping() -> None:
    clock = ManualClock()
    near = near_cache(clock)
    for change in (near.flush, lambda: near.invalidate(None, 0)):
        began, read_at = near.begin("k"), clock.monotonic()
        change()
        near.finish("k", began, entry(), read_at)
        assert near.get("k") is None


def test_an_invalidation_of_another_key_while_reading_does_not_matter() -> None:
    clock = ManualClock()
    near = near_cache(clock)
    began, read_at = near.begin("k"), clock.monotonic()
    near.invalidate("other", 2)
    near.finish("k", began, entry(), read_at)
    assert near.get("k") is not None


def test_a_read_begun_after_the_invalidation_keeps_its_value_while_an_older_one_does_not() -> None:
    clock = ManualClock()
    near = near_cache(clock)
    older, older_at = near.begin("k"), clock.monotonic()
    near.invalidate("k", 2)
    newer, newer_at = near.begin("k"), clock.monotonic()
    near.finish("k", older, entry(version=1), older_at)
    assert near.get("k") is None
    near.finish("k", newer, entry(version=2), newer_at)
    assert near.get("k") == Entry("k", b"v2", 2, Layer.NEAR, False, 0)


def test_an_invalidation_drops_older_versions_and_keeps_the_same_or_newer() -> None:
    clock = ManualClock()
    near = near_cache(clock)
    read(near, clock, entry(version=5))
    near.invalidate("k", 5)  # e.g. this instance's own write, already held
    assert near.get("k") is not None
    near.invalidate("k", 4)
    assert near.get("k") is not None
    near.invalidate("k", 6)
    assert near.get("k") is None
    read(near, clock, entry(version=6))
    near.invalidate("k", 0)  # an Invalidate: no version, always drops
    assert near.get("k") is None


def test_a_flush_forgets_everything() -> None:
    clock = ManualClock()
    near = near_cache(clock)
    for key in "abc":
        read(near, clock, entry(key))
    epoch = near.epoch
    near.flush()
    assert len(near) == 0
    assert near.epoch != epoch


def test_the_least_recently_used_entry_makes_room_and_only_that_is_reported() -> None:
    clock = ManualClock()
    evicted: list[None] = []
    near = NearCache(2, 60_000, on_evict=lambda: evicted.append(None), clock=clock.monotonic)
    read(near, clock, entry("a"))
    read(near, clock, entry("b"))
    assert near.get("a") is not None  # b is now the least recently used
    read(near, clock, entry("c"))
    assert [near.get(key) is not None for key in "abc"] == [True, False, True]
    assert len(evicted) == 1
    near.invalidate("a", 0)  # an invalidation is not an eviction
    near.flush()
    assert len(evicted) == 1
