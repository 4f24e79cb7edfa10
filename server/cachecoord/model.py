"""The values the domain hands to the RPC layer."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Layer(enum.Enum):
    """Where a value was served from."""

    NEAR = "near"
    REDIS = "redis"
    DATABASE = "database"


@dataclass(frozen=True, slots=True)
class Entry:
    """One key's answer: ``value is None`` means the key does not exist."""

    key: str
    value: bytes | None
    version: int
    layer: Layer
    stale: bool = False
    ttl_ms: int = 0
    reloaded: bool = False
    """A cached copy older than the read's min_version was skipped."""
    tags: tuple[str, ...] = ()
    """The value's tags (InvalidateTags)."""

    @property
    def found(self) -> bool:
        return self.value is not None


@dataclass(frozen=True, slots=True)
class Row:
    """A value as PostgreSQL holds it (``value is None``: no row)."""

    value: bytes | None
    version: int
    tags: tuple[str, ...] = ()
    """Tags stored with the row (managed) or derived from its columns (mapped)."""


@dataclass(frozen=True, slots=True)
class Deleted:
    deleted: bool
    version: int


@dataclass(frozen=True, slots=True)
class LockGrant:
    token: str
    fencing_token: int
    taken_at: float = 0.0
    """``time.monotonic()`` just before the Redis call that took (or resumed)
    the lock: its TTL runs from no earlier than this."""
