"""How long a cached entry lives in Redis."""

from __future__ import annotations

import random
from collections.abc import Callable


def jittered(ttl_ms: int, jitter: float, rand: Callable[[], float] = random.random) -> int:
    """*ttl_ms* spread at random by up to ±*jitter* (a fraction of it), at
    least 1 ms: entries cached at the same moment do not all expire (and get
    reloaded) at the same moment. *rand*: a uniform draw in [0, 1)."""
    return max(1, round(ttl_ms * (1 + jitter * (2 * rand() - 1))))
