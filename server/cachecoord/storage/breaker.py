"""A circuit breaker for Redis.

When Redis is down, every call would wait for its connect or socket timeout
before the read falls back to PostgreSQL. After ``failures`` consecutive
connection failures the breaker opens: calls fail at once (as a Redis
ConnectionError, so every caller's fallback applies) for ``cooldown``; then
one call is let through as a probe, and its outcome closes or reopens it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from redis.exceptions import ConnectionError as RedisConnectionError


class CircuitOpen(RedisConnectionError):
    """Redis is being skipped after repeated failures."""


class CircuitBreaker:
    def __init__(
        self, failures: int, cooldown_ms: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._threshold = failures
        self._cooldown = cooldown_ms / 1000
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._failures >= self._threshold

    def check(self) -> None:
        """Raise CircuitOpen unless a call may go to Redis now."""
        if self._failures < self._threshold:
            return
        if self._probing or self._clock() < self._open_until:
            raise CircuitOpen(
                f"Redis skipped after {self._failures} failed calls; probing again shortly"
            )
        self._probing = True  # this caller is the probe

    def succeeded(self) -> None:
        self._failures = 0
        self._probing = False

    def failed(self) -> None:
        self._failures += 1
        self._probing = False
        if self._failures >= self._threshold:
            self._open_until = self._clock() + self._cooldown
