"""What a LocalCache keeps (cachecoord_client.local_memory), driven by a
manual clock: issue 17 scenario 3 pinned without servers. A Get that was in
flight while its key changed, its namespace was invalidated or the stream
was RESET returns its answer but does not keep it; what is kept is served
for max_age counted from when its Get began."""

from __future__ import annotations

from manual_clock import ManualClock

from cachecoord_client import Layer, Value
from cachecoord_client.local_memory import LocalMemory

K = ("ns", "k")
# About a millisecond, exact in binary: the clock lands on expiries exactly.
MS = 1 / 1024


def value(version: int = 1, *, found: bool = True, ttl_ms: int = 0, stale: bool = False) -> Value:
    return Value(found, b"v%d" % version if found else b"", version, Layer.REDIS, stale, ttl_ms)


def memory(clock: ManualClock, *, max_entries: int = 10, max_age: float = 1.0) -> LocalMemory:
    return LocalMemory(max_entries, max_age, clock=clock.monotonic)


def get(mem: LocalMemory, answer: Value, k: tuple[str, str] = K) -> None:
    """A Get of *k* from the server that answers *answer* at once."""
    mem.finish(k, mem.begin(k), answer)


def test_an_answer_is_held_for_max_age_from_when_its_get_began() -> None:
    clock = ManualClock()
    mem = memory(clock, max_age=1.0)
    reading = mem.begin(K)
    clock.advance(0.375)  # the server took its time
    mem.finish(K, reading, value())
    clock.advance(0.625 - MS)
    assert mem.get(K) == value()
    clock.advance(MS)
    assert mem.get(K) is None
    assert len(mem) == 0


def test_an_answer_older_than_max_age_on_arrival_is_not_held() -> None:
    clock = ManualClock()
    mem = memory(clock, max_age=0.25)
    reading = mem.begin(K)
    clock.advance(0.25)
    mem.finish(K, reading, value())
    assert mem.get(K) is None


def test_a_value_with_a_shorter_ttl_is_held_for_that() -> None:
    clock = ManualClock()
    mem = memory(clock, max_age=1.0)
    get(mem, value(ttl_ms=250))
    clock.advance(0.25 - MS)
    assert mem.holds(K)
    clock.advance(MS)
    assert not mem.holds(K)


def test_a_get_in_flight_while_its_key_changed_is_not_held() -> None:
    """The event of a write arrived while the Get was in flight: its answer
    may be the value from before the write. A Get begun after the event is
    held."""
    clock = ManualClock()
    mem = memory(clock)
    before = mem.begin(K)
    mem.invalidate(K, 2)
    after = mem.begin(K)
    mem.finish(K, before, value(1))
    assert mem.get(K) is None
    mem.finish(K, after, value(2))
    assert mem.get(K) == value(2)


def test_a_get_in_flight_during_a_reset_or_a_namespace_invalidation_is_not_held() -> None:
    clock = ManualClock()
    mem = memory(clock)
    for change in (mem.forget_all, lambda: mem.drop_namespace("ns")):
        reading = mem.begin(K)
        change()
        mem.finish(K, reading, value())
        assert mem.get(K) is None


def test_changes_elsewhere_do_not_stop_a_get_from_being_held() -> None:
    clock = ManualClock()
    mem = memory(clock)
    reading = mem.begin(K)
    mem.invalidate(("ns", "other"), 2)
    mem.drop_namespace("other-ns")
    mem.finish(K, reading, value())
    assert mem.holds(K)


def test_a_failed_get_holds_nothing() -> None:
    clock = ManualClock()
    mem = memory(clock)
    mem.finish(K, mem.begin(K), None)
    assert len(mem) == 0


def test_a_stale_answer_is_not_held() -> None:
    clock = ManualClock()
    mem = memory(clock)
    get(mem, value(stale=True))
    assert mem.get(K) is None


def test_an_older_answer_overtaken_by_a_newer_one_drops_both() -> None:
    clock = ManualClock()
    mem = memory(clock)
    slow, fast = mem.begin(K), mem.begin(K)
    mem.finish(K, fast, value(2))
    mem.finish(K, slow, value(1))
    assert mem.get(K) is None


def test_an_event_drops_older_versions_and_not_found_answers() -> None:
    clock = ManualClock()
    mem = memory(clock)
    get(mem, value(3))
    mem.invalidate(K, 3)
    assert mem.holds(K)
    mem.invalidate(K, 4)
    assert not mem.holds(K)
    get(mem, value(0, found=False))
    mem.invalidate(K, 1)
    assert not mem.holds(K)


def test_the_least_recently_used_entry_makes_room() -> None:
    clock = ManualClock()
    mem = memory(clock, max_entries=2)
    a, b, c = ("ns", "a"), ("ns", "b"), ("ns", "c")
    get(mem, value(), a)
    get(mem, value(), b)
    assert mem.get(a) is not None
    get(mem, value(), c)
    assert [mem.holds(k) for k in (a, b, c)] == [True, False, True]


def tagged(*tags: str) -> Value:
    return Value(True, b"v", 1, Layer.REDIS, False, 0, tags=tags)


def test_a_tag_drops_the_values_of_its_namespace_carrying_it_and_nothing_else() -> None:
    mem = memory(ManualClock())
    held = {
        ("ns", "a"): tagged("t"),
        ("ns", "b"): tagged("t", "s"),
        ("ns", "c"): tagged("s"),
        ("ns", "u"): tagged(),
        ("other", "a"): tagged("t"),
    }
    for k, answer in held.items():
        get(mem, answer, k)
    mem.drop_tag("ns", "t")
    assert [k for k in held if mem.holds(k)] == [("ns", "c"), ("ns", "u"), ("other", "a")]
    mem.drop_tag("ns", "s")
    assert [k for k in held if mem.holds(k)] == [("ns", "u"), ("other", "a")]


def test_a_tagged_get_in_flight_across_a_tag_of_its_namespace_is_not_kept() -> None:
    mem = memory(ManualClock())
    tagged_read, untagged_read = mem.begin(("ns", "a")), mem.begin(("ns", "u"))
    mem.drop_tag("ns", "any")
    mem.finish(("ns", "a"), tagged_read, tagged("t"))
    mem.finish(("ns", "u"), untagged_read, tagged())
    assert not mem.holds(("ns", "a"))
    assert mem.holds(("ns", "u"))
