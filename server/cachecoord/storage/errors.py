"""What storage raises when Redis cannot be reached or refuses a command.

These are redis-py's own classes, named here so that code outside storage/
catches them without importing redis-py (storage is the only place that
speaks Redis)."""

from __future__ import annotations

from redis.exceptions import RedisError

__all__ = ["RedisError"]
