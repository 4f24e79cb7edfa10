"""The value types settings are made of: the error, the enumerations and durations."""

from __future__ import annotations

import enum


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the fix."""


class StrategyName(enum.StrEnum):
    CACHE_ASIDE = "cache-aside"
    WRITE_THROUGH = "write-through"
    WRITE_BEHIND = "write-behind"


class Kind(enum.StrEnum):
    MAPPED = "mapped"
    MANAGED = "managed"


class Invalidation(enum.StrEnum):
    DELETE = "delete"
    VERSION = "version"


class QueueFull(enum.StrEnum):
    REJECT = "reject"
    WRITE_THROUGH = "write-through"


class Action(enum.StrEnum):
    """What a bearer token may do: to a namespace (read, write, invalidate,
    watch) or, granted by ``lock_prefixes``, to a lock (lock)."""

    READ = "read"
    WRITE = "write"
    INVALIDATE = "invalidate"
    WATCH = "watch"
    LOCK = "lock"


NAMESPACE_ACTIONS = frozenset(Action) - {Action.LOCK}
ANY = "*"
"""In permissions: every namespace (as a key) or every action; in lock_prefixes: every lock."""


class Duration(int):
    """Milliseconds, written in the file as ``"250ms"``, ``"5s"``, ``"5m"``, ``"1h"`` or a
    number of seconds."""
