"""How long a cached entry lives in Redis."""

from __future__ import annotations

import random


def jittered(ttl_ms: int, jitter: float) -> int:
    """*ttl_ms* spread at random by up to ±*jitter* (a fraction of it), at
    least 1 ms: entries cached at the same moment do not all expire (and get
    reloaded) at the same moment."""
    return max(1, round(ttl_ms * (1 + jitter * (2 * random.random() - 1))))
