"""Redis key names.

A namespace's keys are grouped into partitions, ``crc32(key) % partitions``,
and every Redis key of a partition shares one hash tag, so that each Lua
script (which touches one cache entry and its partition's invalidation log)
stays on a single Redis Cluster slot:

* cache-aside and write-through: ``cc:{<ns>:<p>}:v:<key>`` (value; with
  ``invalidation = "version"``, the prefix of the values
  ``...:v:<key>:g<generation>``), ``cc:{<ns>:<p>}:l:<key>`` (lease),
  ``cc:{<ns>:<p>}:g:<key>`` (the key's generation), and the partition's
  invalidation log (a Redis Stream) ``cc:{<ns>:<p>}:log``;
* write-behind: its queue partitions are the log's partitions:
  ``cc:wb:{<ns>:<p>}:v:<key>``, ``...:l:<key>``, the queue (Redis Stream)
  ``cc:wb:{<ns>:<p>}:queue`` and the log ``cc:wb:{<ns>:<p>}:log``; per
  namespace, ``cc:wb:{<ns>}:dead`` (dead letters) and ``cc:wb:{<ns>}:errors``
  (why entries were rejected).

Per namespace, ``cc:tags:{<ns>}:clock``, its tag clock, and ``cc:tags:{<ns>}``,
the hash of its tag marks (InvalidateTags, see scripts.py INVALIDATE_TAGS).

Namespace names cannot contain ``:`` or ``{`` (config.NAME_RE) and a
partition is digits, so the hash tag ends at the first ``}``; after it comes
a fixed part (``:v:``, ``:l:``, ``:g:``, ``:queue``, ``:log``), and the key,
when there is one, is last or followed by ``:g<digits>`` (whose last ``:g``
is the one before the digits). So distinct (namespace, key) pairs never share
a Redis key, whatever bytes the key holds, and no entry key is a log or a
queue. The tag keys' hash tag holds no ``:``, so it is none of a partition's.

Invalidation messages (invalidation/messages.py) go out on the namespace's
classic pub/sub channel ``cc:inv:<ns>`` or, with sharded pub/sub on a Redis
Cluster (``redis.sharded_pubsub``), on its partition's shard channel
``cc:inv:{<ns>:<p>}``: the hash tag of the partition's keys, so the script
that changes an entry publishes (SPUBLISH) on its own slot, and only the
node owning that slot carries the message. A channel is a shard channel
exactly when its name has a hash tag (:func:`is_shard_channel`); classic
names never have one (namespace names cannot contain ``{``).
"""

from __future__ import annotations

import zlib

LOG_PARTITIONS = 8
"""The default number of log partitions of a namespace that is not write-behind."""


class KeySpace:
    """The Redis names of one namespace."""

    def __init__(
        self,
        namespace: str,
        partitions: int = LOG_PARTITIONS,
        *,
        write_behind: bool = False,
        sharded: bool = False,
    ) -> None:
        """*sharded*: messages go out on the partitions' shard channels."""
        self.namespace = namespace
        self.partitions = partitions
        self.write_behind = write_behind
        self.sharded = sharded
        self.channel = f"cc:inv:{namespace}"
        """The namespace's classic channel (whether or not it is used)."""
        self._prefix = "cc:wb:" if write_behind else "cc:"

    def channel_of(self, partition: int) -> str:
        """The channel a change of *partition* is published on."""
        if self.sharded:
            return f"cc:inv:{{{self.namespace}:{partition}}}"
        return self.channel

    @property
    def channels(self) -> list[str]:
        """Every channel to hear the namespace's changes on: the classic one,
        and with sharded pub/sub each partition's shard channel (the classic
        one still carries what instances without sharded pub/sub publish,
        e.g. during a rolling upgrade)."""
        if self.sharded:
            return [self.channel, *(self.channel_of(p) for p in range(self.partitions))]
        return [self.channel]

    def partition(self, key: str) -> int:
        return zlib.crc32(key.encode()) % self.partitions

    def _tag(self, partition: int) -> str:
        return f"{self._prefix}{{{self.namespace}:{partition}}}"

    def value(self, key: str) -> str:
        return f"{self._tag(self.partition(key))}:v:{key}"

    def lease(self, key: str) -> str:
        return f"{self._tag(self.partition(key))}:l:{key}"

    def generation(self, key: str) -> str:
        return f"{self._tag(self.partition(key))}:g:{key}"

    def log(self, key: str) -> str:
        """The invalidation log of *key*'s partition."""
        return self.log_of(self.partition(key))

    def log_of(self, partition: int) -> str:
        return f"{self._tag(partition)}:log"

    @property
    def logs(self) -> list[str]:
        return [self.log_of(p) for p in range(self.partitions)]

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
        """Globs matching every cached value, lease (and generation) of the
        namespace (names hold no glob characters), never its queues or logs."""
        if self.write_behind:
            return [f"cc:wb:{{{self.namespace}:*}}:[vl]:*"]
        return [f"cc:{{{self.namespace}:*}}:[vlg]:*"]


def is_shard_channel(channel: str) -> bool:
    """Whether *channel* is a shard channel (SSUBSCRIBE/SPUBLISH, on the node
    owning its hash tag's slot) rather than a classic one."""
    return "{" in channel


def lock_key(name: str) -> str:
    return f"cc:lock:{{{name}}}"


def fencing_key(name: str) -> str:
    return f"cc:lock:{{{name}}}:fencing"


LOCK_CHANNEL = "cc:locks"
"""Lock release notices: a classic channel, broadcast to every node of a
cluster (lock keys are spread over every slot, and releases are rare)."""

TAG_CLOCK = ""
"""The field of KeySpace.tags that mirrors the tag clock (a tag is never
empty): marks read with it are known to be the marks of that clock."""
