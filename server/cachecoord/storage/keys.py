"""Redis key names.

Every key of one cache entry shares a hash tag, so that each multi-key Lua
script touches a single Redis Cluster slot:

* cache-aside and write-through: ``cc:{<ns>:<key>}`` (value), ``...:lease``
  and, with ``invalidation = "version"``, ``...:gen`` (the key's generation;
  values live at ``...:g<generation>``);
* write-behind: keys are grouped into partitions so that a value and the
  queue (Redis Stream) it is written to share a slot:
  ``cc:wb:{<ns>:<partition>}:v:<key>``, ``...:l:<key>`` and
  ``cc:wb:{<ns>:<partition>}:queue``; per namespace, ``cc:wb:{<ns>}:dead``
  (dead letters) and ``cc:wb:{<ns>}:errors`` (why entries were rejected).

Per namespace, ``cc:tags:{<ns>}:clock``, its tag clock, and ``cc:tags:{<ns>}``,
the hash of its tag marks (InvalidateTags, see scripts.py INVALIDATE_TAGS).

Namespace names cannot contain ``:`` or ``{`` (config.NAME_RE), and the key
is always last or followed by a fixed suffix, so distinct (namespace, key)
pairs never share a Redis key, whatever bytes the key holds.
"""

from __future__ import annotations

import zlib


class KeySpace:
    """The Redis names of one namespace."""

    def __init__(self, namespace: str, partitions: int = 0) -> None:
        self.namespace = namespace
        self.partitions = partitions
        self.channel = f"cc:inv:{namespace}"

    def partition(self, key: str) -> int:
        return zlib.crc32(key.encode()) % self.partitions

    def value(self, key: str) -> str:
        if self.partitions:
            return f"cc:wb:{{{self.namespace}:{self.partition(key)}}}:v:{key}"
        return f"cc:{{{self.namespace}:{key}}}"

    def lease(self, key: str) -> str:
        if self.partitions:
            return f"cc:wb:{{{self.namespace}:{self.partition(key)}}}:l:{key}"
        return f"cc:{{{self.namespace}:{key}}}:lease"

    def generation(self, key: str) -> str:
        return f"cc:{{{self.namespace}:{key}}}:gen"

    def queue(self, key: str) -> str:
        return self.queue_of(self.partition(key))

    def queue_of(self, partition: int) -> str:
        return f"cc:wb:{{{self.namespace}:{partition}}}:queue"

    @property
    def queues(self) -> list[str]:
        return [self.queue_of(p) for p in range(self.partitions)]

    @property
    def dead_letters(self) -> str:
        return f"cc:wb:{{{self.namespace}}}:dead"

    @property
    def errors(self) -> str:
        """A hash: queue entry id -> why PostgreSQL rejected it (write-behind)."""
        return f"cc:wb:{{{self.namespace}}}:errors"

    @property
    def tag_clock(self) -> str:
        """The namespace's tag clock (a number; read with every value)."""
        return f"cc:tags:{{{self.namespace}}}:clock"

    @property
    def tags(self) -> str:
        """A hash: tag -> the clock value at which the tag was last
        invalidated; '' -> the clock as the hash last saw it."""
        return f"cc:tags:{{{self.namespace}}}"

    @property
    def scan_patterns(self) -> list[str]:
        """Globs matching every cached value and lease of the namespace (names
        hold no glob characters), never its queues."""
        if self.partitions:
            return [f"cc:wb:{{{self.namespace}:*}}:[vl]:*"]
        return [f"cc:{{{self.namespace}:*"]


def lock_key(name: str) -> str:
    return f"cc:lock:{{{name}}}"


def fencing_key(name: str) -> str:
    return f"cc:lock:{{{name}}}:fencing"


LOCK_CHANNEL = "cc:locks"

TAG_CLOCK = ""
"""The field of KeySpace.tags that mirrors the tag clock (a tag is never
empty): marks read with it are known to be the marks of that clock."""
