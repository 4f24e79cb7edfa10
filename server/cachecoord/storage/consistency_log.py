"""The consistency observer's counts, per namespace and minute, in Redis:
``cc:consistency:{<namespace>}:<unix minute>``, a hash of ``checks`` and
``violations`` kept for :data:`KEEP_MINUTES`, so that ``cachecoord
consistency report`` sums every instance's checks over a window."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as redis

KEEP_MINUTES = 7 * 24 * 60


def bucket(namespace: str, minute: int) -> str:
    return f"cc:consistency:{{{namespace}}}:{minute}"


@dataclass(frozen=True, slots=True)
class Counts:
    checks: int
    violations: int


class ConsistencyLog:
    def __init__(self, client: redis.Redis | redis.RedisCluster) -> None:
        self._client = client

    async def record(self, namespace: str, checks: int, violations: int) -> None:
        name = bucket(namespace, int(time.time() // 60))
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hincrby(name, "checks", checks)
            if violations:
                pipe.hincrby(name, "violations", violations)
            pipe.expire(name, KEEP_MINUTES * 60)
            await pipe.execute()

    async def counts(self, namespace: str, minutes: int) -> Counts:
        """The sums of the last *minutes* minutes (the current one included)."""
        now = int(time.time() // 60)
        names: Sequence[str] = [bucket(namespace, now - m) for m in range(minutes)]
        checks = violations = 0
        async with self._client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(name, "checks", "violations")
            for found_checks, found_violations in await pipe.execute():
                checks += int(found_checks or 0)
                violations += int(found_violations or 0)
        return Counts(checks, violations)
