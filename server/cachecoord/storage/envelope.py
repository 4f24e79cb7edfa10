"""The envelope a cached value is stored in.

``<version>:<fresh_until_ms>:<load_ms>:<tag><payload>`` where tag is ``v`` for
a value and ``n`` for a cached "not found" (a deletion); ``V`` and ``N`` mark a
write-behind write not yet flushed to PostgreSQL ("dirty": PostgreSQL is
behind it, so it is never reloaded from there). ASCII numbers keep it readable
from Lua (which compares versions) and from redis-cli.
"""

from __future__ import annotations

from dataclasses import dataclass

VALUE = b"v"
ABSENT = b"n"


@dataclass(frozen=True, slots=True)
class Cached:
    version: int
    fresh_until_ms: int
    load_ms: int
    value: bytes | None
    dirty: bool = False


def encode(version: int, fresh_until_ms: int, load_ms: int, value: bytes | None) -> bytes:
    head = b"%d:%d:%d:" % (version, fresh_until_ms, load_ms)
    return head + (ABSENT if value is None else VALUE + value)


def decode(raw: bytes) -> Cached:
    version, fresh_until, load_ms, rest = raw.split(b":", 3)
    tag = rest[:1]
    value = rest[1:] if tag in (b"v", b"V") else None
    return Cached(int(version), int(fresh_until), int(load_ms), value, tag.isupper())
