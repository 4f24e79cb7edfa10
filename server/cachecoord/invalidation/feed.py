"""One namespace's invalidations as this instance applies them: live from
pub/sub, and replayed from the invalidation log after the subscription
dropped.

The feed remembers, per partition of the namespace's log, the position of
the last change it applied. While the subscription is down the namespace's
near cache is suspended (it serves and keeps nothing, but holds its
entries). Once subscribed again, :meth:`Feed.catch_up` replays each
partition's log after its position through the same handlers as live
messages (strategy, then Watch), merged by position (replay.py), then
resumes the near cache. A
change received twice (replayed, then live) is applied once: live messages
at or before a partition's position are skipped. Only when the log no
longer reaches back to a position (or the feed never had one) does it fall
back to forgetting everything: the near cache is flushed and the Watch
streams get RESET(resubscribed); it then takes the log's current positions.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from cachecoord import instruments
from cachecoord.invalidation.messages import Invalidation
from cachecoord.invalidation.positions import NONE, is_newer, reaches_back
from cachecoord.invalidation.replay import LogReader, changes_after, merged

log = logging.getLogger(__name__)

_NAMESPACE, _OUTCOME = "cache.namespace", "cache.outcome"

Handler = Callable[[Invalidation], None]


class Log(LogReader, Protocol):
    """A namespace's log (storage/invalidation_log.py)."""

    @property
    def partitions(self) -> int: ...

    def positions(self) -> Awaitable[list[str]]: ...


class Feed:
    """The changes of one namespace, in the order of each log partition."""

    def __init__(
        self,
        namespace: str,
        log: Log,
        handlers: Sequence[Handler],
        *,
        on_suspend: Callable[[], None],
        on_resume: Callable[[], None],
        on_lost: Sequence[Callable[[], None]],
    ) -> None:
        self.namespace = namespace
        self._log = log
        self._handlers = list(handlers)
        self._on_suspend = on_suspend
        self._on_resume = on_resume
        self._on_lost = list(on_lost)
        self._positions = [NONE] * log.partitions

    @property
    def positions(self) -> Sequence[str]:
        """The position of the last change applied here, per partition."""
        return self._positions

    @property
    def log(self) -> Log:
        return self._log

    def receive(self, message: Invalidation) -> None:
        """Apply *message* (live or replayed), unless already applied."""
        partition = message.partition
        if message.position and 0 <= partition < len(self._positions):
            if not is_newer(message.position, self._positions[partition]):
                return
            self._positions[partition] = message.position
        for handler in self._handlers:
            handler(message)

    def suspend(self) -> None:
        """The subscription dropped: changes are being missed."""
        self._on_suspend()

    async def catch_up(self) -> int:
        """Subscribed again: apply what was missed, from the log, then resume
        the near cache. Returns how many changes were replayed, or -1 if the
        log did not reach back (everything was forgotten instead). Raises
        RedisError if the log cannot be read (the feed stays suspended)."""
        lost = False
        for partition, position in enumerate(self._positions):
            if not reaches_back(await self._log.state(partition, position), position):
                lost = True
                break
        if lost:
            positioned = any(self._positions)  # else: the first subscription
            self._positions = list(await self._log.positions())
            for forget in self._on_lost:
                forget()
            self._on_resume()
            # At the first subscription, start both series at 0 (alerts see them).
            for outcome, count in (("replayed", 0), ("too_old", int(positioned))):
                instruments.catch_ups.add(count, {_NAMESPACE: self.namespace, _OUTCOME: outcome})
            if positioned:
                log.warning(
                    "namespace %s: the invalidation log no longer reaches back to the last "
                    "change applied here; near cache flushed, Watch streams reset",
                    self.namespace,
                )
            return -1
        replayed = 0
        partitions = [
            changes_after(self._log, partition, position)
            for partition, position in enumerate(self._positions)
        ]
        async for change in merged(partitions):
            self.receive(change)
            replayed += 1
        self._on_resume()
        attributes = {_NAMESPACE: self.namespace}
        instruments.catch_ups.add(1, {**attributes, _OUTCOME: "replayed"})
        instruments.replayed_changes.add(replayed, attributes)
        if replayed:
            log.info(
                "namespace %s: replayed %d missed changes from its log", self.namespace, replayed
            )
        return replayed
