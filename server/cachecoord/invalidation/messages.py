"""The invalidation message published on ``cc:inv:<namespace>``.

JSON, one object per key: ``{"namespace": "users", "key": "1", "version": 7,
"reason": "put", "origin": "host-1234"}``. ``key`` is null when the whole
namespace was invalidated. ``version`` is the version the change created (0
when unknown, e.g. a plain Invalidate). ``origin`` is the instance that made
the change. Documented in the README; other programs may subscribe.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class Invalidation:
    namespace: str
    key: str | None
    version: int
    reason: str
    origin: str

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Invalidation:
        data = json.loads(raw)
        return cls(
            namespace=str(data["namespace"]),
            key=None if data.get("key") is None else str(data["key"]),
            version=int(data.get("version", 0)),
            reason=str(data.get("reason", "")),
            origin=str(data.get("origin", "")),
        )
