"""How an instance makes its own changes known."""

from __future__ import annotations

from cachecoord import instruments, telemetry
from cachecoord.invalidation.messages import TAGS, Invalidation
from cachecoord.strategies.reads import Reader


class Changes:
    """The invalidation messages of one namespace's changes made here, and
    this instance's own near cache, which forgets a change at once."""

    def __init__(self, name: str, origin: str, reader: Reader) -> None:
        self.name = name
        self.origin = origin
        self._reader = reader

    def message(self, key: str | None, version: int, reason: str) -> Invalidation:
        return Invalidation(self.name, key, version, reason, self.origin)

    def tag_message(self, tag: str) -> Invalidation:
        return Invalidation(self.name, None, 0, TAGS, self.origin, tag=tag)

    def tag_made_here(self, tag: str) -> None:
        """This instance invalidated *tag* (Redis has it): forget it locally now."""
        self._reader.forget_tag(tag)
        if telemetry.METRICS:
            instruments.invalidations_published.add(1, {"cache.namespace": self.name})

    def made_here(self, key: str | None, version: int) -> None:
        """This instance changed *key* (None: every key; Redis has the change):
        forget it locally now, not when our own message comes back, so a Get
        right after a Put here sees the Put. Called after the Redis update, so
        that a Get that read the old copy from Redis before it cannot keep it
        here."""
        self._reader.forget(key, version)
        if telemetry.METRICS:
            instruments.invalidations_published.add(1, {"cache.namespace": self.name})
