"""The near cache: a small in-process LRU in front of Redis, per namespace.

Entries are dropped by invalidation messages from any instance and expire
after ``near_cache_ttl`` whatever happens. When the pub/sub subscription
drops (messages sent meanwhile are lost), the cache is *suspended*: it
serves and keeps nothing, but holds its entries, until the instance has
replayed what it missed from the invalidation log (feed.py), which evicts
the keys that changed meanwhile; then it is *resumed*. Only when the log no
longer reaches back is it flushed (Redis' client-side caching rule).

What may be kept, and for how long:

- only a value that Redis confirmed current: read from Redis, or loaded from
  PostgreSQL and filled under a lease that was still there (the fill's
  compare-and-set proves no write came between the lease and the fill). A
  row whose fill was refused, or that was never filled (Redis down, lease
  wait given up), is answered but not kept;
- only if no invalidation of its key (nor a flush) arrived since its read
  began (:meth:`begin` .. :meth:`finish`, per key): a slow read cannot put
  back a value that was invalidated under it, and a message that arrives
  while the read is in flight cannot be overtaken by it;
- a value with tags, only if no tag invalidation (of any tag) arrived since
  its read began: a read in flight when InvalidateTags' message arrives may
  have read the value before it (tags are few and their invalidations rare,
  so the rule does not track which tags);
- for ``near_cache_ttl`` (or the value's own TTL, if shorter) counted from
  when its read *began*, not from when it was kept: a value is never served
  longer than ``near_cache_ttl`` after it was read.

Invalidations are applied here before they are passed on to Watch streams
(see app.py), so an event tells that this instance no longer answers the
older version.

Time is read from the injected *clock* (``time.monotonic`` by default), so
every rule above is unit-tested by moving a clock, not by sleeping.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable

from cachecoord.model import Entry, Layer


class NearCache:
    """Bounded LRU of entries with a maximum age."""

    def __init__(
        self,
        max_entries: int,
        max_ttl_ms: int,
        on_evict: Callable[[], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock  # monotonic seconds: what read_at is measured in
        self._max_entries = max_entries
        self._on_evict = on_evict  # an entry was dropped to make room
        self._max_ttl = max_ttl_ms / 1000
        self._entries: OrderedDict[str, tuple[float, Entry]] = OrderedDict()
        # Every invalidation and flush takes the next sequence number. A read
        # may keep its answer only if nothing concerning its key is newer than
        # the number it began at.
        self._seq = 0
        self._flushed = 0  # the last flush, whole-namespace invalidation, suspension or resumption
        self._suspended = False
        self._reading: Counter[str] = Counter()  # keys with a read in flight
        self._changed: dict[str, int] = {}  # their last invalidation
        self._tag_changed = 0  # the last tag invalidation
        self._tagged: dict[str, set[str]] = {}  # tag -> the keys kept here that carry it

    def get(self, key: str) -> Entry | None:
        if self._suspended:
            return None
        item = self._entries.get(key)
        if item is None:
            return None
        expires, entry = item
        if self._clock() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    @property
    def epoch(self) -> int:
        """Changes on every invalidation and flush."""
        return self._seq

    def begin(self, key: str) -> int:
        """A read of *key* begins; returns the number :meth:`finish` takes."""
        self._reading[key] += 1
        return self._seq

    def finish(self, key: str, began: int, entry: Entry | None, read_at: float | None) -> None:
        """The read of *key* begun at *began* ended with *entry*, confirmed
        current by Redis at monotonic time *read_at* (None: not confirmed, or
        the read failed). Keep it if nothing invalidated the key meanwhile."""
        missed = max(self._flushed, self._changed.get(key, 0))
        self._reading[key] -= 1
        if not self._reading[key]:
            del self._reading[key]
            self._changed.pop(key, None)
        if entry is None or read_at is None or entry.stale or missed > began or self._suspended:
            return
        if entry.tags and self._tag_changed > began:
            return
        ttl = self._max_ttl if entry.ttl_ms <= 0 else min(self._max_ttl, entry.ttl_ms / 1000)
        expires = read_at + ttl
        if expires <= self._clock():
            return
        near = Entry(
            entry.key, entry.value, entry.version, Layer.NEAR, False, entry.ttl_ms, tags=entry.tags
        )
        self._drop(entry.key)
        self._entries[entry.key] = (expires, near)
        for tag in near.tags:
            self._tagged.setdefault(tag, set()).add(near.key)
        if len(self._entries) > self._max_entries:
            self._drop(next(iter(self._entries)))
            if self._on_evict is not None:
                self._on_evict()

    def invalidate(self, key: str | None, version: int) -> None:
        """A change of *key* (None: every key) to *version* happened somewhere."""
        self._seq += 1
        if key is None:
            self._flushed = self._seq
            self._clear()
            return
        if key in self._reading:
            self._changed[key] = self._seq
        item = self._entries.get(key)
        if item is not None and (version == 0 or item[1].version < version):
            self._drop(key)

    def invalidate_tag(self, tag: str) -> None:
        """Every value carrying *tag* was invalidated somewhere."""
        self._seq += 1
        self._tag_changed = self._seq
        for key in self._tagged.pop(tag, ()):
            self._drop(key)

    def flush(self) -> None:
        """Forget everything: invalidations may have been missed."""
        self._seq += 1
        self._flushed = self._seq
        self._clear()

    def _drop(self, key: str) -> None:
        item = self._entries.pop(key, None)
        if item is None:
            return
        for tag in item[1].tags:
            keys = self._tagged.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._tagged[tag]

    def _clear(self) -> None:
        self._entries.clear()
        self._tagged.clear()

    def suspend(self) -> None:
        """Invalidations may be missing until :meth:`resume`: serve nothing,
        keep nothing (no read in flight either), but hold the entries."""
        self._seq += 1
        self._flushed = self._seq
        self._suspended = True

    def resume(self) -> None:
        """Every invalidation missed meanwhile was applied: serve again. A
        read that began before now keeps nothing."""
        self._seq += 1
        self._flushed = self._seq
        self._suspended = False

    def __len__(self) -> int:
        return len(self._entries)
