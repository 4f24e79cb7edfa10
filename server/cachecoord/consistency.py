"""The consistency observer: cache consistency measured in production.

Like Meta's Polaris, an instance hears of every change as a cache server
does (the invalidation messages of every namespace: acknowledged writes,
Invalidate calls, changes other programs made in PostgreSQL) and follows up
a sample of them once the documented bound has passed: it reads the key
through its own layers (near cache, Redis) and from PostgreSQL, and a layer
that still holds a version older than the change's is a *violation*: logged
with the key, the versions, the layer and the path, and counted
(``cachecoord.consistency.checks`` / ``.violations``, and per minute in
Redis for ``cachecoord consistency report``).

The reference version is the one the change created, or, for a plain
Invalidate (version 0), the version PostgreSQL held when the message was
sampled. PostgreSQL itself is checked against it too, except in write-behind
namespaces, where it lags by design. A check whose layer cannot be read (a
Redis outage) is skipped, not counted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cachecoord import instruments, telemetry
from cachecoord.errors import Unavailable
from cachecoord.invalidation.messages import Invalidation
from cachecoord.storage.errors import RedisError

log = logging.getLogger(__name__)

PATHS = {"invalidate": "invalidation", "db_change": "database"}
"""The path of a change by its message's reason; every other reason but
``fill`` (not a change) is a write."""

_MAX_PENDING = 1000
"""Checks waiting for their bound at once; a sample beyond it is skipped."""


@dataclass(frozen=True, slots=True)
class Versions:
    """What each layer holds of a key (None: nothing there to compare)."""

    near: int | None
    redis: int | None
    database: int


class Layers(Protocol):
    """A namespace's layers, as the observer reads them."""

    @property
    def postgres_may_lag(self) -> bool: ...

    async def versions(self, key: str) -> Versions: ...

    async def database_version(self, key: str) -> int: ...


class Recorder(Protocol):
    """Where the per-minute counts go (storage/consistency_log.py)."""

    async def record(self, namespace: str, checks: int, violations: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Violation:
    namespace: str
    key: str
    layer: str
    path: str
    found: int
    expected: int


def violations(versions: Versions, expected: int, *, check_database: bool) -> list[tuple[str, int]]:
    """The layers of *versions* older than *expected*, with what they hold."""
    return [
        (layer, version)
        for layer, version in _checked(versions, check_database)
        if version is not None and version < expected
    ]


def _checked(versions: Versions, check_database: bool) -> list[tuple[str, int | None]]:
    layers = [("near", versions.near), ("redis", versions.redis)]
    if check_database:
        layers.append(("database", versions.database))
    return layers


def nines(checks: int, violations: int) -> float:
    """-log10 of the violation rate: 3.0 is 99.9 % consistent. With no
    violation, the bound that *checks* can show (log10 of it)."""
    if checks <= 0:
        return 0.0
    return -math.log10(max(violations, 1) / checks)


class Observer:
    """Samples changes and checks them after *delay* seconds."""

    def __init__(
        self,
        layers: Mapping[str, Layers],
        recorder: Recorder,
        *,
        fraction: float,
        delay: float,
        rng: Callable[[], float] = random.random,
        on_violation: Callable[[Violation], None] | None = None,
    ) -> None:
        self._layers = dict(layers)
        self._recorder = recorder
        self._fraction = fraction
        self._delay = delay
        self._rng = rng
        self._on_violation = on_violation
        self._pending: set[asyncio.Task[None]] = set()

    def saw(self, change: Invalidation) -> None:
        """A change message arrived (bus handler: must not block)."""
        if (
            change.key is None
            or change.reason == "fill"
            or self._rng() >= self._fraction
            or change.namespace not in self._layers
        ):
            return
        if len(self._pending) >= _MAX_PENDING:
            log.debug("consistency check of %s skipped: too many pending", change.key)
            return
        task = asyncio.create_task(self._follow_up(change), name="consistency-check")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def close(self) -> None:
        tasks = list(self._pending)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow_up(self, change: Invalidation) -> None:
        assert change.key is not None
        layers = self._layers[change.namespace]
        path = PATHS.get(change.reason, "write")
        deadline = time.monotonic() + self._delay
        try:
            expected = change.version or await layers.database_version(change.key)
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            versions = await layers.versions(change.key)
        except (RedisError, Unavailable, TimeoutError) as err:
            log.debug("consistency check of %r skipped: %s", change.key, err)
            return
        check_database = not layers.postgres_may_lag
        found = violations(versions, expected, check_database=check_database)
        for layer, version in found:
            violation = Violation(change.namespace, change.key, layer, path, version, expected)
            log.warning(
                "consistency violation: %s key %r: %s holds version %d, %.3f s after a %s "
                "change to version %d",
                violation.namespace,
                violation.key,
                layer,
                version,
                self._delay,
                path,
                expected,
            )
            if self._on_violation is not None:
                self._on_violation(violation)
        if telemetry.METRICS:
            for layer, _ in _checked(versions, check_database):
                attributes = {
                    "cache.namespace": change.namespace,
                    "cache.layer": layer,
                    "consistency.path": path,
                }
                instruments.consistency_checks.add(1, attributes)
                # 0 too: the series exists (and rates are 0) before a violation.
                violated = any(layer == bad for bad, _ in found)
                instruments.consistency_violations.add(int(violated), attributes)
        try:
            await self._recorder.record(change.namespace, 1, 1 if found else 0)
        except RedisError as err:
            log.debug("consistency count not recorded: %s", err)
