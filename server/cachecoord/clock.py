"""Time and chance, as the read path sees them: injected, so that its
decisions can be driven by tests without sleeping or patching modules."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Protocol

Random = Callable[[], float]
"""A source of uniform floats in [0, 1), like :func:`random.random`."""


class Clock(Protocol):
    """The two clocks a read needs."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin, never going back: ages and waits."""
        ...

    def time_ms(self) -> int:
        """Wall-clock milliseconds since the epoch: the logical expiries
        stored in Redis, which every instance compares with its own."""
        ...


class SystemClock:
    """The machine's clocks."""

    # time.monotonic itself, not a method calling it: the near cache reads
    # it on every hit.
    monotonic = staticmethod(time.monotonic)

    def time_ms(self) -> int:
        return time.time_ns() // 1_000_000


SYSTEM_CLOCK = SystemClock()
SYSTEM_RANDOM: Random = random.random
