"""A Redis Cluster client whose callers wait for a connection.

redis-py's asyncio cluster client keeps one pool per node, and a full pool
fails at once (MaxConnectionsError) instead of waiting: a burst of requests
beyond ``redis.max_connections`` would become errors, and a Get that cannot
reach Redis loads PostgreSQL without a lease (and trips the circuit breaker).
A single Redis has a blocking pool instead; this client gives the cluster the
same behaviour: at most ``max_connections`` commands or pipelines are in
flight, each on at most one connection per node, and the others wait up to
``redis.pool_timeout`` for their turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from contextvars import ContextVar
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterPipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

from cachecoord.storage.hot_path import HotPath

T = TypeVar("T")

# Set while a call holds its turn: a command that redis-py issues from within
# a pipeline (to follow a redirection) must not wait for a second turn.
_IN_TURN: ContextVar[bool] = ContextVar("cachecoord_redis_in_turn", default=False)


class WaitingRedisCluster(redis.RedisCluster):
    """``redis.asyncio.RedisCluster`` with a waiting limit on calls in flight."""

    def __init__(self, *, max_connections: int, pool_timeout: float, **kwargs: Any) -> None:
        super().__init__(max_connections=max_connections, **kwargs)
        self._max_connections = max_connections
        self._turns = asyncio.Semaphore(max_connections)
        self._pool_timeout = pool_timeout
        self.hot_path = HotPath(self)
        """Pipelined connections to the nodes, for the hot read commands."""

    async def aclose(self) -> None:
        self.hot_path.close()
        await super().aclose()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return await self.in_turn(super().execute_command(*args, **kwargs))

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        # (redis-py's annotations leave ClusterPipeline abstract; it is not.)
        return _WaitingPipeline(self, transaction)  # type: ignore[abstract]

    async def in_turn(self, call: Coroutine[Any, Any, T]) -> T:
        """Await *call* once fewer than max_connections calls are in flight."""
        if _IN_TURN.get():
            return await call
        try:
            await self._wait_for_turn()
        except BaseException:  # no turn (or cancelled while waiting): never run
            call.close()
            raise
        turn = _IN_TURN.set(True)
        try:
            return await call
        finally:
            _IN_TURN.reset(turn)
            self._turns.release()

    async def _wait_for_turn(self) -> None:
        if not self._turns.locked():
            await self._turns.acquire()  # free: returns at once
            return
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._turns.acquire()
        except TimeoutError:
            raise RedisConnectionError(
                f"no Redis connection free within redis.pool_timeout "
                f"({self._pool_timeout:g} s; redis.max_connections = {self._max_connections})"
            ) from None


class _WaitingPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        client: WaitingRedisCluster = self.cluster_client  # type: ignore[assignment]
        return await client.in_turn(super().execute(raise_on_error, allow_redirections))
