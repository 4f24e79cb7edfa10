"""The near cache reports each entry it drops to make room (the
cachecoord.near_cache.evictions metric), and only those."""

from __future__ import annotations

import time

from cachecoord.invalidation.near_cache import NearCache
from cachecoord.model import Entry, Layer


def test_only_entries_dropped_for_room_are_reported() -> None:
    evicted: list[None] = []
    near = NearCache(2, 60_000, on_evict=lambda: evicted.append(None))
    for key in ("a", "b", "c"):
        began = near.begin(key)
        near.finish(key, began, Entry(key, b"v", 1, Layer.REDIS, False, 0), time.monotonic())
    assert len(near) == 2
    assert len(evicted) == 1
    near.invalidate("b", 0)  # an invalidation is not an eviction
    near.flush()
    assert len(evicted) == 1
