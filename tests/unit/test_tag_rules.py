"""Tags without servers: the validity rule (strategies/tagging.py), the
tagged value envelope, the marks this instance keeps per clock value, the
near cache's tag index, and tag templates of mapped namespaces."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from manual_clock import ManualClock

from cachecoord.invalidation.messages import Invalidation
from cachecoord.invalidation.near_cache import NearCache
from cachecoord.model import Entry, Layer
from cachecoord.storage import envelope
from cachecoord.storage.tag_templates import BadTemplate, TagTemplate, derive
from cachecoord.strategies.tagging import TagMarks, valid

# -- the rule ------------------------------------------------------------------


def test_a_value_is_valid_without_marks_while_the_clock_has_not_moved() -> None:
    assert valid(entry_clock=7, clock=7, marks=None) is True


def test_marks_are_needed_once_the_clock_moved() -> None:
    assert valid(entry_clock=7, clock=9, marks=None) is None


def test_a_tag_invalidated_after_the_clock_was_read_hides_the_value() -> None:
    # The fill read clock 7, then InvalidateTags moved it to 8 and marked the tag 8.
    assert valid(entry_clock=7, clock=8, marks=[0, 8]) is False


def test_tags_invalidated_before_the_clock_was_read_do_not_hide_the_value() -> None:
    # A Put after InvalidateTags read the clock it moved to: it survives it.
    assert valid(entry_clock=8, clock=9, marks=[8, 3]) is True


def test_a_clock_behind_the_value_means_the_marks_were_lost() -> None:
    assert valid(entry_clock=9, clock=0, marks=[0]) is False


# -- the envelope ----------------------------------------------------------------


def test_an_untagged_value_keeps_the_short_envelope() -> None:
    raw = envelope.encode(3, 100, 2, b"x:y")
    assert raw == b"3:100:2:vx:y"
    assert envelope.decode(raw) == envelope.Cached(3, 100, 2, b"x:y")


def test_a_tagged_value_round_trips_tags_with_any_bytes_and_its_clock() -> None:
    tags = ("tenant:1", 'odd "tag":\n{}', "ünïcode")
    raw = envelope.encode(3, 100, 2, b"a:b", tags, 1_700_000_000_000_000)
    assert raw.startswith(b"3:100:2:t")
    cached = envelope.decode(raw)
    assert (cached.value, cached.tags, cached.tag_clock, cached.dirty) == (
        b"a:b",
        tags,
        1_700_000_000_000_000,
        False,
    )


def test_a_not_found_answer_carries_no_tags() -> None:
    assert envelope.decode(envelope.encode(3, 100, 2, None, ("t",), 5)).tags == ()


# -- the marks kept per clock value ----------------------------------------------


class Marks:
    def __init__(self, marks: dict[str, int]) -> None:
        self.marks = marks
        self.reads: list[list[str]] = []

    async def __call__(self, tags: Sequence[str]) -> tuple[int, list[int]]:
        self.reads.append(list(tags))
        return self.marks.get("", 99), [self.marks.get(tag, 0) for tag in tags]


def test_marks_are_read_once_per_clock_value_and_again_when_it_moves() -> None:
    redis = Marks({"a": 5})
    kept = TagMarks(redis)

    async def scenario() -> list[bool]:
        return [
            await kept.valid(["a"], 4, 5),  # a invalidated at 5, after the value's clock 4
            await kept.valid(["a"], 6, 7),  # written after: valid
            await kept.valid(["a", "b"], 6, 7),  # b: read, a: kept
            await kept.valid(["a"], 6, 6),  # the clock did not move: no read
        ]

    assert asyncio.run(scenario()) == [False, True, True, True]
    assert redis.reads == [["a"], ["a"], ["b"]]


def test_marks_that_redis_lost_hide_the_value_and_are_not_kept() -> None:
    redis = Marks({"": 0})  # the hash's copy of the clock is gone
    kept = TagMarks(redis)
    assert asyncio.run(kept.valid(["a"], 6, 7)) is False
    assert asyncio.run(kept.valid(["a"], 6, 7)) is False
    assert redis.reads == [["a"], ["a"]]


def test_forgotten_marks_are_read_again() -> None:
    redis = Marks({"a": 5})
    kept = TagMarks(redis)
    asyncio.run(kept.valid(["a"], 6, 7))
    kept.forget()
    asyncio.run(kept.valid(["a"], 6, 7))
    assert redis.reads == [["a"], ["a"]]


# -- the near cache ----------------------------------------------------------------


def tagged(key: str, *tags: str) -> Entry:
    return Entry(key, b"v", 1, Layer.REDIS, tags=tags)


def kept(near: NearCache, clock: ManualClock, value: Entry) -> None:
    near.finish(value.key, near.begin(value.key), value, clock.monotonic())


def test_a_tag_event_drops_the_values_carrying_the_tag_and_keeps_the_others() -> None:
    clock = ManualClock()
    near = NearCache(10, 1000, clock=clock.monotonic)
    for value in (tagged("a", "t1"), tagged("b", "t1", "t2"), tagged("c", "t2"), tagged("d")):
        kept(near, clock, value)
    near.invalidate_tag("t1")
    assert [k for k in "abcd" if near.get(k) is not None] == ["c", "d"]
    near.invalidate_tag("t2")
    assert [k for k in "abcd" if near.get(k) is not None] == ["d"]


def test_a_tagged_read_in_flight_across_a_tag_event_is_not_kept() -> None:
    clock = ManualClock()
    near = NearCache(10, 1000, clock=clock.monotonic)
    began, other = near.begin("a"), near.begin("u")
    near.invalidate_tag("t9")  # any tag: the rule does not track which
    near.finish("a", began, tagged("a", "t1"), clock.monotonic())
    near.finish("u", other, tagged("u"), clock.monotonic())
    assert near.get("a") is None
    assert near.get("u") is not None  # untagged values are not held back


def test_evicted_and_replaced_values_leave_no_trace_in_the_tag_index() -> None:
    clock = ManualClock()
    near = NearCache(1, 1000, clock=clock.monotonic)
    kept(near, clock, tagged("a", "t1"))
    kept(near, clock, tagged("b", "t2"))  # evicts a
    kept(near, clock, tagged("b", "t3"))  # b retagged
    near.invalidate_tag("t2")
    assert near.get("b") is not None
    assert near._tagged == {"t3": {"b"}}


# -- messages and templates ---------------------------------------------------------


def test_a_tag_message_round_trips_and_other_messages_have_no_tag_member() -> None:
    message = Invalidation("ns", None, 0, "tags", "host", 1.0, tag="tenant:1")
    assert Invalidation.decode(message.encode()) == message
    assert not message.everything
    assert b'"tag"' not in Invalidation("ns", "k", 1, "put", "host", 1.0).encode()


def test_templates_render_columns_and_skip_null_ones() -> None:
    templates = [TagTemplate.parse(t) for t in ("tenant:{tenant_id}", "k{{{karma}}}", "x:{gone}")]
    assert derive(templates, b'{"tenant_id": "acme", "karma": 3, "gone": null}') == (
        "tenant:acme",
        "k{3}",
    )


@pytest.mark.parametrize("text", ["", "a:{}", "a:{b!r}", "a:{b:>4}", "a:{b"])
def test_bad_templates_are_refused(text: str) -> None:
    with pytest.raises(BadTemplate):
        TagTemplate.parse(text)
