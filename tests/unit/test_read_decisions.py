"""The read path's decisions (strategies/read_decisions.py), each driven by a
given time and random draw: hits, stale-while-revalidate, XFetch early
refresh, write-behind values, fill TTLs, lease outcomes and the wait for
another reader's fill, and which loaded rows count as confirmed."""

from __future__ import annotations

import math
import random

import pytest
from manual_clock import Draws, ManualClock, never_drawn

from cachecoord.model import Entry, Layer
from cachecoord.strategies.read_decisions import (
    FillWait,
    HitDecision,
    LeaseOutcome,
    MissPlan,
    Read,
    decide_hit,
    fill_ttl,
    loaded_read,
    plan_misses,
    refresh_early,
)

NOW = 1_700_000_000_000
# A draw r for which -ln(1 - r) == x: XFetch then refreshes once the expiry
# is at most load_ms * beta * x away.
ONE = 1 - math.exp(-1)


def hit(
    remaining_ms: int,
    *,
    stale_window_ms: int = 1000,
    beta: float = 0.0,
    load_ms: int = 10,
    dirty: bool = False,
    draw: float | None = None,
) -> HitDecision:
    return decide_hit(
        now_ms=NOW,
        fresh_until_ms=NOW + remaining_ms,
        load_ms=load_ms,
        dirty=dirty,
        stale_window_ms=stale_window_ms,
        beta=beta,
        rand=never_drawn if draw is None else Draws([draw]),
    )


# -- hits --------------------------------------------------------------------


def test_a_fresh_hit_is_served_as_it_is() -> None:
    assert hit(5000) == HitDecision(stale=False, remaining_ms=5000, reload=False, refresh=False)


def test_a_hit_at_its_expiry_is_served_stale_and_refreshed_without_taking_a_chance() -> None:
    assert hit(0) == HitDecision(stale=True, remaining_ms=0, reload=False, refresh=True)


def test_a_hit_inside_the_stale_window_is_served_stale_and_refreshed() -> None:
    decision = hit(-1000, stale_window_ms=1000)
    assert decision == HitDecision(stale=True, remaining_ms=0, reload=False, refresh=True)


def test_a_hit_past_the_stale_window_is_reloaded_not_refreshed() -> None:
    decision = hit(-1001, stale_window_ms=1000)
    assert decision == HitDecision(stale=True, remaining_ms=0, reload=True, refresh=False)


def test_without_a_stale_window_an_expired_hit_is_reloaded() -> None:
    assert hit(-1, stale_window_ms=0).reload


@pytest.mark.parametrize("remaining_ms", [60_000, 0, -1, -3_600_000])
def test_an_unflushed_write_behind_value_is_never_stale_reloaded_nor_refreshed(
    remaining_ms: int,
) -> None:
    """A dirty value is kept without a TTL until flushed: it is the newest
    there is, and PostgreSQL is behind it, however old its logical expiry."""
    decision = hit(remaining_ms, stale_window_ms=0, beta=1.0, dirty=True)
    assert decision == HitDecision(
        stale=False, remaining_ms=max(0, remaining_ms), reload=False, refresh=False
    )


# -- XFetch --------------------------------------------------------------------


def test_xfetch_refreshes_once_the_expiry_is_within_load_time_times_beta_times_the_draw() -> None:
    # load 100 ms, beta 1, -ln(1 - r) = 1: refresh from 100 ms before expiry.
    assert hit(99, beta=1.0, load_ms=100, draw=ONE).refresh
    assert not hit(101, beta=1.0, load_ms=100, draw=ONE).refresh
    # beta 2 doubles the horizon.
    assert hit(199, beta=2.0, load_ms=100, draw=ONE).refresh
    assert not hit(201, beta=2.0, load_ms=100, draw=ONE).refresh


def test_xfetch_counts_a_load_of_zero_ms_as_one() -> None:
    draw = 1 - math.exp(-10)  # -ln(1 - r) = 10: 10 ms ahead for a 1 ms load
    assert refresh_early(NOW, 0, NOW + 9, beta=1.0, rand=Draws([draw]))
    assert not refresh_early(NOW, 0, NOW + 11, beta=1.0, rand=Draws([draw]))


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_xfetch_with_beta_zero_or_less_never_refreshes_early(beta: float) -> None:
    assert not refresh_early(NOW, 10_000, NOW + 1, beta=beta, rand=never_drawn)


def test_xfetch_survives_a_draw_of_zero() -> None:
    assert not refresh_early(NOW, 100, NOW + 1000, beta=1.0, rand=Draws([0.0]))


@pytest.mark.parametrize(("gap_ms", "beta"), [(100, 1.0), (100, 2.0), (300, 1.0)])
def test_xfetch_refreshes_with_the_probability_the_paper_gives(gap_ms: int, beta: float) -> None:
    """P(refresh) = exp(-gap / (load * beta)) for a uniform draw."""
    draws = random.Random(17).random
    runs = 10_000
    refreshed = sum(
        refresh_early(NOW, 100, NOW + gap_ms, beta=beta, rand=draws) for _ in range(runs)
    )
    assert refreshed / runs == pytest.approx(math.exp(-gap_ms / (100 * beta)), abs=0.02)


# -- fills ---------------------------------------------------------------------


def ttl(rand: float, *, found: bool = True, jitter: float = 0.1) -> tuple[int, int]:
    return fill_ttl(
        found=found,
        ttl_ms=10_000,
        negative_ttl_ms=500,
        jitter=jitter,
        stale_window_ms=2_000,
        stale_if_error_ms=0,
        rand=Draws([rand]),
    )


def test_a_fill_ttl_is_spread_by_the_jitter_either_way() -> None:
    assert ttl(0.5) == (10_000, 12_000)
    assert ttl(0.0) == (9_000, 11_000)
    assert ttl(0.999_999) == (11_000, 13_000)
    assert ttl(0.0, jitter=0.0) == (10_000, 12_000)


def test_a_missing_key_is_cached_for_the_negative_ttl() -> None:
    assert ttl(0.5, found=False) == (500, 2_500)


def test_a_fill_is_kept_in_redis_for_the_longer_of_the_stale_window_and_stale_if_error() -> None:
    _, px = fill_ttl(
        found=True,
        ttl_ms=1_000,
        negative_ttl_ms=1,
        jitter=0.0,
        stale_window_ms=2_000,
        stale_if_error_ms=60_000,
        rand=Draws([0.5]),
    )
    assert px == 61_000


def test_a_fill_ttl_is_at_least_one_ms() -> None:
    assert ttl(0.0, jitter=1.0)[0] == 1


# -- loaded rows ---------------------------------------------------------------

ROW = Entry("k", b"v", 3, Layer.DATABASE, ttl_ms=10_000)


def test_a_row_whose_fill_redis_accepted_is_current_as_of_the_fill_and_may_be_kept() -> None:
    read = loaded_read(ROW, filled=True, query_as_of=5, fill_as_of=9, began=12.5)
    assert read == Read(ROW, as_of=9, confirmed_at=12.5)


def test_a_row_whose_fill_was_refused_or_not_made_is_current_as_of_its_query_only() -> None:
    """A refused fill means a write came after the lease: the row may be
    older than it, so it is answered (the reader began before the write) but
    never kept by the near cache."""
    read = loaded_read(ROW, filled=False, query_as_of=5, fill_as_of=9, began=12.5)
    assert read == Read(ROW, as_of=5, confirmed_at=None)


# -- leases --------------------------------------------------------------------


def test_each_lease_answer_has_its_outcome() -> None:
    assert LeaseOutcome.of(b"1:2:3:vx") is LeaseOutcome.CACHED
    assert LeaseOutcome.of(True) is LeaseOutcome.LEASED
    assert LeaseOutcome.of(False) is LeaseOutcome.HELD
    assert LeaseOutcome.of(b"") is LeaseOutcome.CACHED  # bytes, whatever they hold


def test_a_leased_key_is_loaded_and_filled() -> None:
    assert plan_misses(["a"], {"a": True}) == MissPlan({}, ["a"], frozenset({"a"}), None)


def test_a_single_key_leased_by_another_reader_is_waited_for_not_filled() -> None:
    assert plan_misses(["a"], {"a": False}) == MissPlan({}, ["a"], frozenset(), "a")


def test_a_key_filled_meanwhile_is_served_from_redis_not_loaded() -> None:
    assert plan_misses(["a"], {"a": b"raw"}) == MissPlan({"a": b"raw"}, [], frozenset(), None)


def test_a_batch_does_not_wait_for_another_readers_fill() -> None:
    plan = plan_misses(["a", "b", "c"], {"a": True, "b": False, "c": b"raw"})
    assert plan == MissPlan({"c": b"raw"}, ["a", "b"], frozenset({"a"}), None)


def test_the_last_key_left_to_load_is_waited_for_when_another_reader_holds_it() -> None:
    plan = plan_misses(["a", "b"], {"a": b"raw", "b": False})
    assert plan == MissPlan({"a": b"raw"}, ["b"], frozenset(), "b")


def test_without_an_answer_from_redis_every_key_is_loaded_and_none_filled() -> None:
    assert plan_misses(["a", "b"], {}) == MissPlan({}, ["a", "b"], frozenset(), None)


def test_the_wait_for_a_fill_backs_off_and_ends_at_lease_wait() -> None:
    clock = ManualClock()
    wait = FillWait(300, clock, max_poll=0.1)
    timeouts = []
    while (timeout := wait.next_timeout()) is not None:
        timeouts.append(timeout)
        clock.advance(timeout)  # no notice came: each wait runs out
    assert timeouts == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.1, 0.05])


def test_a_wait_for_a_fill_ends_at_lease_wait_however_often_it_is_woken() -> None:
    clock = ManualClock()
    wait = FillWait(250, clock, max_poll=0.1)
    looks = 0
    while wait.next_timeout() is not None:
        looks += 1
        clock.advance(1 / 64)  # woken early each time (by notices of other keys, say)
    assert looks == 16
    assert clock.monotonic() == 1000.25


def test_a_wait_for_a_fill_of_zero_never_looks() -> None:
    assert FillWait(0, ManualClock(), max_poll=0.1).next_timeout() is None
