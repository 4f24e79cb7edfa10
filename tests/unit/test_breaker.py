"""The Redis circuit breaker with a clock of the test's own: it opens after
repeated connection failures, lets one probe through per cool-down, and never
stays open for good because a probe ended without an outcome or never ended
(the cluster failover test found an instance that skipped Redis forever after
its probe met "CLUSTERDOWN")."""

from __future__ import annotations

import pytest

from cachecoord.storage.breaker import CircuitBreaker, CircuitOpen


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def opened(clock: Clock) -> CircuitBreaker:
    breaker = CircuitBreaker(failures=3, cooldown_ms=1000, clock=clock)
    for _ in range(3):
        breaker.check()
        breaker.failed()
    return breaker


def test_it_opens_after_the_failures_and_skips_during_the_cooldown() -> None:
    clock = Clock()
    breaker = opened(clock)
    assert breaker.is_open
    clock.now += 0.9
    with pytest.raises(CircuitOpen):
        breaker.check()


def test_one_probe_at_a_time_and_its_success_closes_it() -> None:
    clock = Clock()
    breaker = opened(clock)
    clock.now += 1.0
    breaker.check()  # the probe
    with pytest.raises(CircuitOpen):
        breaker.check()  # another call while the probe is out
    breaker.succeeded()
    assert not breaker.is_open
    breaker.check()


def test_a_failed_probe_reopens_it_for_another_cooldown() -> None:
    clock = Clock()
    breaker = opened(clock)
    clock.now += 1.0
    breaker.check()
    breaker.failed()
    clock.now += 0.5
    with pytest.raises(CircuitOpen):
        breaker.check()
    clock.now += 0.5
    breaker.check()


def test_an_abandoned_probe_lets_the_next_call_probe() -> None:
    clock = Clock()
    breaker = opened(clock)
    clock.now += 1.0
    breaker.check()
    breaker.abandoned()  # e.g. its caller was cancelled
    breaker.check()  # probes at once, not after another cooldown


def test_a_probe_that_never_ends_is_given_up_after_a_cooldown() -> None:
    clock = Clock()
    breaker = opened(clock)
    clock.now += 1.0
    breaker.check()  # this probe never reports
    clock.now += 0.99
    with pytest.raises(CircuitOpen):
        breaker.check()
    clock.now += 0.01
    breaker.check()  # a new probe
    breaker.succeeded()
    assert not breaker.is_open
