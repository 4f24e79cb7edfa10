"""Redis key names (storage/keys.py) without Redis: distinct (namespace, key)
pairs never share a name, and the namespace's scan patterns match its
values, leases and generations but never a log or a queue. Redis' glob and
fnmatch agree on the patterns used here (``*``, ``[vlg]``; braces are
literal in both)."""

from __future__ import annotations

from fnmatch import fnmatchcase
from itertools import product

import pytest
from redis.crc import key_slot

from cachecoord.storage.keys import LOCK_CHANNEL, KeySpace, is_shard_channel

AWKWARD = [
    "1",
    "",
    "{",
    "}",
    ":",
    "}:log",
    ":v:x",
    "}:v:a",
    "a:g1",
    "a:g1:g2",
    "}:queue",
    ":l:",
    "ü",
]


@pytest.mark.parametrize("write_behind", [False, True])
def test_distinct_keys_never_share_a_redis_name(write_behind: bool) -> None:
    spaces = [KeySpace(ns, 8, write_behind=write_behind) for ns in ("users", "users2", "u")]
    names: dict[str, tuple[str, str, str]] = {}
    for space, key in product(spaces, AWKWARD):
        made = {
            "value": space.value(key),
            "lease": space.lease(key),
            "generation": space.generation(key),
            **{f"value@g{g}": f"{space.value(key)}:g{g}" for g in (0, 1, 12)},
        }
        for role, name in made.items():
            assert names.setdefault(name, (space.namespace, key, role)) == (
                space.namespace,
                key,
                role,
            )
    logs = {log for space in spaces for log in space.logs}
    queues = {queue for space in spaces for queue in space.queues}
    assert not (logs | queues) & set(names)


@pytest.mark.parametrize("write_behind", [False, True])
def test_scan_patterns_match_entries_never_logs_or_queues(write_behind: bool) -> None:
    space = KeySpace("users", 8, write_behind=write_behind)
    other = KeySpace("users2", 8, write_behind=write_behind)

    def matched(name: str) -> bool:
        return any(fnmatchcase(name, pattern) for pattern in space.scan_patterns)

    for key in AWKWARD:
        assert matched(space.value(key))
        assert matched(space.lease(key))
        assert not matched(other.value(key))
    if not write_behind:
        assert all(matched(space.generation(key)) for key in AWKWARD)
    for name in [*space.logs, *space.queues, space.dead_letters, space.errors]:
        assert not matched(name)


def test_a_key_and_its_log_share_a_hash_tag() -> None:
    for write_behind in (False, True):
        space = KeySpace("users", 8, write_behind=write_behind)
        for key in AWKWARD:
            tag = space.value(key).split("}")[0]
            assert space.log(key).startswith(tag + "}")
            assert space.lease(key).startswith(tag + "}")


def test_with_sharded_pubsub_a_change_goes_out_on_its_partitions_slot() -> None:
    """The shard channel of a key's partition hashes to the slot of the key's
    entry and log, so the script that changes it may SPUBLISH on it."""
    for write_behind in (False, True):
        space = KeySpace("users", 8, write_behind=write_behind, sharded=True)
        shard_channels = [c for c in space.channels if is_shard_channel(c)]
        assert len(set(shard_channels)) == 8
        assert set(space.channels) - set(shard_channels) == {space.channel}  # still heard
        for key in AWKWARD:
            channel = space.channel_of(space.partition(key))
            assert key_slot(channel.encode()) == key_slot(space.log(key).encode())
            assert key_slot(channel.encode()) == key_slot(space.value(key).encode())


def test_without_sharded_pubsub_every_change_goes_out_on_the_classic_channel() -> None:
    space = KeySpace("users", 8)
    assert space.channels == [space.channel] == ["cc:inv:users"]
    assert {space.channel_of(p) for p in range(8)} == {"cc:inv:users"}
    assert not is_shard_channel(space.channel)
    assert not is_shard_channel(LOCK_CHANNEL)
