"""The pieces storage/ builds Redis writes from: invalidation messages split
around the version a script assigns, fill notices told apart by type, and
the TTL jitter."""

from __future__ import annotations

import random

import pytest

from cachecoord.invalidation.messages import FillNotice, Invalidation
from cachecoord.storage.expiry import jittered


@pytest.mark.parametrize("key", ["plain", None, '","version":0,', "back\\slash", "ünïcode"])
def test_a_message_split_around_its_version_joins_into_the_message_with_that_version(
    key: str | None,
) -> None:
    message = Invalidation("users", key, 0, "put", "host-1", at=1.25)

    head, tail = message.encode_around_version()

    joined = Invalidation.decode(head + b"1796519670675123" + tail)
    assert joined == Invalidation("users", key, 1796519670675123, "put", "host-1", at=1.25)


def test_a_fill_notice_decodes_as_a_fill_notice_and_a_change_does_not() -> None:
    fill = FillNotice.of("users", "1", 7, "host-1")
    change = Invalidation("users", "1", 8, "put", "host-1")

    assert isinstance(Invalidation.decode(fill.encode()), FillNotice)
    assert Invalidation.decode(fill.encode()).version == 7
    assert not isinstance(Invalidation.decode(change.encode()), FillNotice)


def test_a_message_is_logged_without_a_position_and_published_with_the_one_its_script_adds() -> (
    None
):
    message = Invalidation("users", "1", 7, "put", "host-1", at=1.25)
    logged = message.encode()
    # What ANNOUNCE (storage/scripts.py) publishes: the logged JSON, its last
    # "}" replaced by the partition and position.
    published = logged[:-1] + b',"partition":3,"position":"1796538143288-0"}'

    assert b"position" not in logged
    assert Invalidation.decode(logged).position == ""
    assert Invalidation.decode(published) == message.at_position(3, "1796538143288-0")
    assert Invalidation.decode(message.at_position(3, "1-0").encode()).position == "1-0"


def test_jittered_ttls_stay_within_the_jitter_and_at_least_one_ms() -> None:
    random.seed(5)
    ttls = [jittered(1000, 0.1) for _ in range(1000)]

    assert min(ttls) >= 900
    assert max(ttls) <= 1100
    assert len(set(ttls)) > 50
    assert jittered(1, 0.5) >= 1
    assert jittered(1000, 0) == 1000
