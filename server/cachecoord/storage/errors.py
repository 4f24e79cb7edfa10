"""What storage raises when Redis cannot be reached or refuses a command.

These are redis-py's own classes, named here so that code outside storage/
catches them without importing redis-py (storage is the only place that
speaks Redis). RedisClusterException: a cluster client found no node to
start from."""

from __future__ import annotations

from redis.exceptions import RedisClusterException, RedisError

__all__ = ["RedisClusterException", "RedisError"]
