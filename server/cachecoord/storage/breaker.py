"""A circuit breaker for Redis.

When Redis is down, every call would wait for its connect or socket timeout
before the read falls back to PostgreSQL. After ``failures`` consecutive
connection failures the breaker opens: calls fail at once (as a Redis
ConnectionError, so every caller's fallback applies) for ``cooldown``; then
one call is let through as a probe, and its outcome closes or reopens it.

A probe that ends without an outcome (its caller was cancelled, or it failed
in a way that says nothing about reaching Redis) or that never ends (a write
stuck on a dead socket) must not keep the breaker open for good: every call
would then be skipped while Redis is back. So a probe is given up on when it
reports :meth:`abandoned`, and in any case after one more ``cooldown``; then
the next call probes again.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from redis.exceptions import ClusterDownError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

P = ParamSpec("P")
T = TypeVar("T")


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
        self._probe_since: float | None = None  # when the probe in flight started

    @property
    def is_open(self) -> bool:
        return self._failures >= self._threshold

    def check(self) -> None:
        """Raise CircuitOpen unless a call may go to Redis now."""
        if self._failures < self._threshold:
            return
        now = self._clock()
        probing = self._probe_since is not None and now < self._probe_since + self._cooldown
        if probing or now < self._open_until:
            raise CircuitOpen(
                f"Redis skipped after {self._failures} failed calls; probing again shortly"
            )
        self._probe_since = now  # this caller is the probe

    def succeeded(self) -> None:
        """A call reached Redis."""
        self._failures = 0
        self._probe_since = None

    def failed(self) -> None:
        """A call could not reach Redis."""
        self._failures += 1
        self._probe_since = None
        if self._failures >= self._threshold:
            self._open_until = self._clock() + self._cooldown

    def abandoned(self) -> None:
        """A call ended without telling whether Redis can be reached."""
        self._probe_since = None


def guarded(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Route a store method's call through its store's circuit breaker (the
    store's ``breaker`` attribute). Every method of storage/ that sends a
    command to Redis is guarded."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        breaker: CircuitBreaker = args[0].breaker  # type: ignore[attr-defined]
        breaker.check()
        try:
            result = await method(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, ClusterDownError):
            breaker.failed()
            raise
        except ResponseError:
            breaker.succeeded()  # Redis answered (an error about the command)
            raise
        except BaseException:
            breaker.abandoned()  # cancelled, or no verdict on reaching Redis
            raise
        breaker.succeeded()
        return result

    return call
