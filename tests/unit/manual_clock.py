"""A clock and random sources that tests drive by hand."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class ManualClock:
    """Both of a read's clocks (cachecoord.clock.Clock), moved only by :meth:`advance`."""

    def __init__(self, monotonic: float = 1000.0, time_ms: int = 1_700_000_000_000) -> None:
        self._monotonic = monotonic
        self._time_ms = time_ms

    def monotonic(self) -> float:
        return self._monotonic

    def time_ms(self) -> int:
        return self._time_ms

    def advance(self, seconds: float) -> None:
        self._monotonic += seconds
        self._time_ms += round(seconds * 1000)


class Draws:
    """A random source that returns the given numbers in turn, and counts its calls."""

    def __init__(self, values: Iterable[float]) -> None:
        self._values: Iterator[float] = iter(values)
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return next(self._values)


def never_drawn() -> float:
    """A random source for decisions that must not take a chance."""
    raise AssertionError("the random source was consulted")
