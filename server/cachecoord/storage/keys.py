"""Redis key names.

Every key of one cache entry shares the hash tag ``{<namespace>:<key>}`` so
that each multi-key Lua script touches a single Redis Cluster slot. Namespace
names cannot contain ``:`` (config.NAME_RE) and every sibling ends in a fixed
suffix, so distinct (namespace, key) pairs never share a Redis key, whatever
bytes the key holds.
"""

from __future__ import annotations


def value_key(namespace: str, key: str) -> str:
    return f"cc:{{{namespace}:{key}}}"


def lease_key(namespace: str, key: str) -> str:
    return f"cc:{{{namespace}:{key}}}:lease"


def lock_key(name: str) -> str:
    return f"cc:lock:{{{name}}}"


def fencing_key(name: str) -> str:
    return f"cc:lock:{{{name}}}:fencing"


def scan_pattern(namespace: str) -> str:
    """Glob matching every key of *namespace* (names hold no glob characters)."""
    return f"cc:{{{namespace}:*"


def invalidation_channel(namespace: str) -> str:
    return f"cc:inv:{namespace}"


LOCK_CHANNEL = "cc:locks"
