"""What a `LocalCache` holds, and the rules for keeping it, apart from its
Watch stream and its reads (local_cache.py): the server's near cache rule
(cachecoord.invalidation.near_cache), per key, with an injected clock.

A read is :meth:`LocalMemory.begin` .. :meth:`LocalMemory.finish`. Its
answer is kept only if no invalidation of its key, of its namespace, nor a
RESET (:meth:`LocalMemory.forget_all`) came while it was in flight: it may
have read the value from before that change, whose event already went by. A
value with tags is not kept either if a tag of its namespace (any tag) was
invalidated meanwhile (:meth:`LocalMemory.drop_tag`).
It is then served for ``max_age`` (or its own TTL, if shorter) counted from
when the read began, never from when its answer came back.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cachecoord_client.types import Value

__all__ = ["LocalMemory", "Reading"]

_Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Reading:
    """A read in flight: the change number and the time it began at."""

    seq: int
    began: float


class LocalMemory:
    """A bounded LRU of values, each with a maximum age.

    Args:
        max_entries: Most entries held; the least recently used goes first.
        max_age: Seconds an entry is served at most, events or not.
        clock: Monotonic seconds (``time.monotonic`` by default).
    """

    def __init__(
        self, max_entries: int, max_age: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_entries, self._max_age, self._clock = max_entries, max_age, clock
        self._entries: OrderedDict[_Key, tuple[float, Value]] = OrderedDict()
        # Sequence numbers: every invalidation takes the next one. A read may
        # keep its answer only if nothing it could have missed is newer than
        # the number it began at.
        self._seq = 0
        self._flushed = 0  # the last RESET or stream failure
        self._dropped: dict[str, int] = {}  # namespace -> its last all_keys invalidation
        self._tag_dropped: dict[str, int] = {}  # namespace -> its last tag invalidation
        self._tagged: dict[tuple[str, str], set[_Key]] = {}  # (namespace, tag) -> keys held
        self._changed: dict[_Key, int] = {}  # keys with a read in flight only
        self._in_flight: Counter[_Key] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, k: _Key) -> Value | None:
        """The value held for *k*, if it is young enough."""
        held = self._entries.get(k)
        if held is None:
            return None
        if self._clock() < held[0]:
            self._entries.move_to_end(k)
            return held[1]
        self._drop(k)  # too old
        return None

    def holds(self, k: _Key) -> bool:
        """Whether :meth:`get` would answer *k* now (changes nothing)."""
        held = self._entries.get(k)
        return held is not None and self._clock() < held[0]

    def begin(self, k: _Key) -> Reading:
        """A read of *k* from the server begins."""
        self._in_flight[k] += 1
        return Reading(self._seq, self._clock())

    def finish(self, k: _Key, reading: Reading, value: Value | None) -> None:
        """The read *reading* of *k* ended with *value* (None: failed, or not
        to be kept); keep it if nothing it could have missed came meanwhile."""
        self._in_flight[k] -= 1
        missed = max(self._flushed, self._dropped.get(k[0], 0), self._changed.get(k, 0))
        if not self._in_flight[k]:
            del self._in_flight[k]
            self._changed.pop(k, None)
        if value is not None and value.tags and self._tag_dropped.get(k[0], 0) > reading.seq:
            return
        if value is not None and missed <= reading.seq:
            self._store(k, value, reading.began)

    def _store(self, k: _Key, value: Value, began: float) -> None:
        if value.stale:
            return  # served while the server could not refresh it: not worth keeping
        held = self._entries.get(k)
        if held is not None and not _same_or_newer(value, held[1]):
            # A slower read overtaken by a faster one: keep neither, rather
            # than let a reader see the older value after the newer one.
            self._drop(k)
            return
        age = self._max_age if value.ttl_ms <= 0 else min(self._max_age, value.ttl_ms / 1000)
        if began + age <= self._clock():
            return  # read too long ago already
        self._drop(k)
        self._entries[k] = (began + age, value)
        for tag in value.tags:
            self._tagged.setdefault((k[0], tag), set()).add(k)
        if len(self._entries) > self._max_entries:
            self._drop(next(iter(self._entries)))

    def invalidate(self, k: _Key, version: int) -> None:
        """*k* changed to *version* (0: unknown, e.g. this process wrote it)."""
        self._seq += 1
        if k in self._in_flight:
            self._changed[k] = self._seq
        held = self._entries.get(k)
        if held is not None and (version == 0 or not held[1].found or held[1].version < version):
            self._drop(k)

    def drop_namespace(self, namespace: str) -> None:
        """Every key of *namespace* was invalidated."""
        self._seq += 1
        self._dropped[namespace] = self._seq
        for k in [k for k in self._entries if k[0] == namespace]:
            self._drop(k)

    def drop_tag(self, namespace: str, tag: str) -> None:
        """Every value of *namespace* carrying *tag* was invalidated."""
        self._seq += 1
        self._tag_dropped[namespace] = self._seq
        for k in self._tagged.pop((namespace, tag), set()):
            self._drop(k)

    def forget_all(self) -> None:
        """Events may have been missed: forget everything, and keep nothing
        read before now."""
        self._seq += 1
        self._flushed = self._seq
        self._entries.clear()
        self._tagged.clear()

    def _drop(self, k: _Key) -> None:
        held = self._entries.pop(k, None)
        if held is None:
            return
        for tag in held[1].tags:
            keys = self._tagged.get((k[0], tag))
            if keys is not None:
                keys.discard(k)
                if not keys:
                    del self._tagged[(k[0], tag)]


def _same_or_newer(new: Value, old: Value) -> bool:
    """Whether *new* may replace *old*: a not-found answer has no version to compare."""
    if new.found and old.found:
        return new.version >= old.version
    return not new.found and not old.found
