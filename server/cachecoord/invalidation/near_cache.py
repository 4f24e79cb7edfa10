"""The near cache: a small in-process LRU in front of Redis, per namespace.

Entries are dropped by invalidation messages from any instance, expire after
``near_cache_ttl`` whatever happens, and the whole cache is flushed whenever
the pub/sub subscription drops (messages sent meanwhile are lost: Redis'
client-side caching rule). A value read from Redis is only kept if no
invalidation arrived while it was being read, so a slow reader cannot put back
a value that was invalidated under it.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from cachecoord.model import Entry, Layer


class NearCache:
    """Bounded LRU of entries with a maximum age."""

    def __init__(self, max_entries: int, max_ttl_ms: int) -> None:
        self._max_entries = max_entries
        self._max_ttl = max_ttl_ms / 1000
        self._entries: OrderedDict[str, tuple[float, Entry]] = OrderedDict()
        self.epoch = 0
        """Changes on every invalidation and flush; see :meth:`put`."""

    def get(self, key: str) -> Entry | None:
        item = self._entries.get(key)
        if item is None:
            return None
        expires, entry = item
        if time.monotonic() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, entry: Entry, epoch: int) -> None:
        """Keep *entry* (read from Redis or PostgreSQL when :attr:`epoch` was
        *epoch*) unless something was invalidated since, or it is stale."""
        if epoch != self.epoch or entry.stale:
            return
        ttl = self._max_ttl if entry.ttl_ms <= 0 else min(self._max_ttl, entry.ttl_ms / 1000)
        near = Entry(entry.key, entry.value, entry.version, Layer.NEAR, False, entry.ttl_ms)
        self._entries[entry.key] = (time.monotonic() + ttl, near)
        self._entries.move_to_end(entry.key)
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def invalidate(self, key: str | None, version: int) -> None:
        """A change of *key* (None: every key) to *version* happened somewhere."""
        self.epoch += 1
        if key is None:
            self._entries.clear()
            return
        item = self._entries.get(key)
        if item is not None and (version == 0 or item[1].version < version):
            del self._entries[key]

    def flush(self) -> None:
        """Forget everything: invalidations may have been missed."""
        self.epoch += 1
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
