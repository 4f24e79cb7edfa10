"""The envelope a cached value is stored in.

``<version>:<fresh_until_ms>:<load_ms>:<tag><payload>`` where tag is ``v`` for
a value and ``n`` for a cached "not found" (a deletion); ``V`` and ``N`` mark a
write-behind write not yet flushed to PostgreSQL ("dirty": PostgreSQL is
behind it, so it is never reloaded from there). ASCII numbers keep it readable
from Lua (which compares versions) and from redis-cli.

A value with tags (InvalidateTags) has tag ``t`` (``T`` dirty) and its payload
starts with ``<clock>:<length>:<tags as a JSON array of that many bytes>``:
*clock* is the namespace's tag clock read before the value was read from
PostgreSQL or written (see strategies/tagging.py). A "not found" never has
tags. Entries without tags keep the shorter form, and decode as before.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

VALUE = b"v"
ABSENT = b"n"
TAGGED = b"t"


@dataclass(frozen=True, slots=True)
class Cached:
    version: int
    fresh_until_ms: int
    load_ms: int
    value: bytes | None
    dirty: bool = False
    tags: tuple[str, ...] = ()
    tag_clock: int = 0
    """The namespace's tag clock read before the value was (for tagged values)."""


def encode(
    version: int,
    fresh_until_ms: int,
    load_ms: int,
    value: bytes | None,
    tags: Sequence[str] = (),
    tag_clock: int = 0,
) -> bytes:
    head = b"%d:%d:%d:" % (version, fresh_until_ms, load_ms)
    if value is None:
        return head + ABSENT
    if not tags:
        return head + VALUE + value
    return head + TAGGED + tagged_payload(value, tags, tag_clock)


def tagged_payload(value: bytes, tags: Sequence[str], tag_clock: int) -> bytes:
    """What follows the tag ``t`` of a tagged value."""
    return tag_prefix(tags, tag_clock) + value


def tag_prefix(tags: Sequence[str], tag_clock: int) -> bytes:
    """``<clock>:<length>:<tags as JSON>``, which starts a tagged value's payload
    (empty without tags; write-behind queues it beside the value too)."""
    if not tags:
        return b""
    listed = json.dumps(list(tags), separators=(",", ":"), ensure_ascii=False).encode()
    return b"%d:%d:" % (tag_clock, len(listed)) + listed


def parse_tag_prefix(prefix: bytes) -> tuple[tuple[str, ...], int]:
    """The tags and clock of a :func:`tag_prefix` (empty: none, 0)."""
    if not prefix:
        return (), 0
    clock, _, listed = prefix.split(b":", 2)
    return tuple(json.loads(listed)), int(clock)


def decode(raw: bytes) -> Cached:
    version, fresh_until, load_ms, rest = raw.split(b":", 3)
    tag = rest[:1]
    if tag in (b"v", b"V"):
        return Cached(int(version), int(fresh_until), int(load_ms), rest[1:], tag == b"V")
    if tag in (b"t", b"T"):
        clock, length, tagged = rest[1:].split(b":", 2)
        size = int(length)
        tags = tuple(json.loads(tagged[:size]))
        return Cached(
            int(version),
            int(fresh_until),
            int(load_ms),
            tagged[size:],
            tag == b"T",
            tags,
            int(clock),
        )
    return Cached(int(version), int(fresh_until), int(load_ms), None, tag.isupper())
