"""The invalidation message published on ``cc:inv:<namespace>``
(or, with sharded pub/sub on a cluster, on its partition's shard channel
``cc:inv:{<namespace>:<partition>}``, storage/keys.py).

JSON, one object per key: ``{"namespace": "users", "key": "1", "version": 7,
"reason": "put", "origin": "host-1234", "at": 1796519670.675}``. ``key`` is
null when the whole namespace was invalidated. ``version`` is the version the
change created (0 when unknown, e.g. a plain Invalidate). ``origin`` is the
instance that made the change, ``at`` when it published it (Unix time in
seconds; absent or 0 when unknown): receivers measure the propagation delay
from it (cachecoord.invalidation.propagation.duration), so it is only as
good as the clocks of the hosts agree. InvalidateTags publishes one message
per tag with ``"tag": "<tag>"``, ``key`` null and ``reason`` ``"tags"``: every
entry carrying that tag was invalidated (not the whole namespace); other
messages have no ``tag`` member. A change (not a fill notice) also carries
``"partition": 3, "position": "1796538143288-0"``: the partition of the
namespace's invalidation log it was appended to and its entry id there
(storage/invalidation_log.py), added by the script that made the change.
Documented in the README; other programs may subscribe.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True, slots=True)
class Invalidation:
    namespace: str
    key: str | None
    version: int
    reason: str
    origin: str
    at: float = field(default_factory=time.time)
    tag: str | None = None
    """Set on InvalidateTags' messages (one per tag); *key* is then None."""
    partition: int = -1
    """The log partition the change was appended to (-1: not logged)."""
    position: str = ""
    """Its position there, a stream entry id ('' when not logged)."""

    @property
    def everything(self) -> bool:
        """Whether the whole namespace was invalidated."""
        return self.key is None and self.tag is None

    def encode(self) -> bytes:
        """The message as published, but without its partition and position
        (the script that logs it adds them) unless it has them, and without
        a tag unless it has one."""
        data = asdict(self)
        if not self.position:
            del data["partition"], data["position"]
        if self.tag is None:
            del data["tag"]
        return json.dumps(data, separators=(",", ":")).encode()

    def at_position(self, partition: int, position: str) -> Invalidation:
        return replace(self, partition=partition, position=position)

    def encode_around_version(self) -> tuple[bytes, bytes]:
        """The message in two parts, before and after its version: for a Redis
        script that numbers the write it announces (``head + version + tail``).
        A quote inside a JSON string is escaped, so the split cannot fall
        inside the key."""
        head, _, tail = replace(self, version=0, position="").encode().partition(b',"version":0,')
        return head + b',"version":', b"," + tail

    @classmethod
    def decode(cls, raw: bytes) -> Invalidation:
        """The message in *raw*: a :class:`FillNotice` if it is one."""
        data = json.loads(raw)
        kind = FillNotice if data.get("reason") == FILL else Invalidation
        return kind(
            namespace=str(data["namespace"]),
            key=None if data.get("key") is None else str(data["key"]),
            version=int(data.get("version", 0)),
            reason=str(data.get("reason", "")),
            origin=str(data.get("origin", "")),
            at=float(data.get("at") or 0.0),
            tag=None if data.get("tag") is None else str(data["tag"]),
            partition=int(data.get("partition", -1)),
            position=str(data.get("position") or ""),
        )


FILL = "fill"
"""The reason of a :class:`FillNotice`."""

TAGS = "tags"
"""The reason of InvalidateTags' messages."""


@dataclass(frozen=True, slots=True)
class FillNotice(Invalidation):
    """Not a change: a reader filled *key* with its current version (reason
    ``fill``). It wakes the readers of other instances waiting for that fill."""

    @classmethod
    def of(cls, namespace: str, key: str, version: int, origin: str) -> FillNotice:
        return cls(namespace, key, version, FILL, origin)
