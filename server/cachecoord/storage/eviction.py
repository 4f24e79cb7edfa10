"""Redis' eviction policy against write-behind.

A write-behind value waits in Redis, without a TTL, until a flusher has
written it to PostgreSQL. Under an ``allkeys-*`` maxmemory-policy Redis may
evict it first, losing an acknowledged write; ``noeviction`` and
``volatile-*`` never do (volatile-* evicts only keys with a TTL).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisClusterException, RedisError

log = logging.getLogger(__name__)


class UnsafeEviction(Exception):
    """Redis may evict write-behind values not yet written to PostgreSQL."""


async def check_write_behind(
    client: redis.Redis | redis.RedisCluster, namespaces: Sequence[str]
) -> None:
    """Raise UnsafeEviction if write-behind *namespaces* (any) would run under
    an allkeys-* policy. A policy that cannot be read (CONFIG GET may be
    refused by managed services) is only warned about."""
    if not namespaces:
        return
    try:
        policies = await _policies(client)
    except (RedisError, RedisClusterException) as err:
        log.warning("cannot read Redis maxmemory-policy (%s); make sure it is not allkeys-*", err)
        return
    for policy in policies:
        if policy.startswith("allkeys"):
            raise UnsafeEviction(
                f"Redis maxmemory-policy is {policy!r}: it may evict write-behind values not yet "
                f"written to PostgreSQL (namespaces {', '.join(namespaces)}). Set it to "
                "noeviction or volatile-lru (queued values have no TTL, so volatile-* never "
                "evicts them)"
            )


async def _policies(client: redis.Redis | redis.RedisCluster) -> list[str]:
    """maxmemory-policy of the Redis, or of every primary of the cluster."""
    if isinstance(client, redis.RedisCluster):
        replies: Any = await client.config_get(
            "maxmemory-policy", target_nodes=redis.RedisCluster.PRIMARIES
        )
        if "maxmemory-policy" in replies:  # a cluster of one primary
            replies = {"": replies}
        raw = [r.get("maxmemory-policy", "") for r in replies.values()]
    else:
        raw = [(await client.config_get("maxmemory-policy")).get("maxmemory-policy", "")]
    return [p.decode() if isinstance(p, bytes) else str(p) for p in raw]
