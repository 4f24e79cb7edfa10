"""Redis access for named locks (coordination/locks.py): redis-py's Lock
pattern with a fencing counter beside each lock.

A lock is ``SET name token NX PX ttl``; release and extend are Lua
compare-and-delete and compare-and-pexpire, so only the holder's token works.
The fencing token is taken in the same script as the lock, so fencing order
is acquisition order. It is ``max(previous + 1, Redis clock in microseconds)``:
it keeps increasing across a Redis restart that lost the counter, as long as
the Redis host's clock does not step back by more than the time since the
last acquisition. A release publishes the lock's name on LOCK_CHANNEL.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis

from cachecoord.storage.breaker import CircuitBreaker, guarded
from cachecoord.storage.keys import LOCK_CHANNEL, fencing_key, lock_key

# KEYS: lock, fencing counter. ARGV: token, ttl ms.
# Returns {1, fencing token} if taken, {0, the holder's remaining ttl ms} if not.
ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local now = redis.call('TIME')
  local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local fencing = math.max(tonumber(redis.call('GET', KEYS[2]) or '0') + 1, clock)
  redis.call('SET', KEYS[2], string.format('%.0f', fencing))
  return {1, fencing}
end
return {0, redis.call('PTTL', KEYS[1])}
"""

# KEYS: lock. ARGV: token, release channel, lock name.
# Returns 1 if released (and announced), 0 if the token does not hold the lock.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""

# KEYS: lock. ARGV: token, ttl ms.
# Returns 1 if the TTL was reset, 0 if the token does not hold the lock.
EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lock, fencing counter. ARGV: token, ttl ms.
# Returns {1, fencing token of the holder} after resetting the TTL, or {0}
# when the token no longer holds the lock. The counter holds the token of the
# last acquisition, which is this holder's as long as its token holds the lock.
RESUME = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, redis.call('GET', KEYS[2]) or '0'}
end
return {0}
"""


class LockStore:
    """The locks in Redis. Every call goes through *breaker* (none: a breaker
    of its own) and raises redis-py's errors."""

    def __init__(
        self, client: redis.Redis | redis.RedisCluster, *, breaker: CircuitBreaker | None = None
    ) -> None:
        self.breaker = breaker or CircuitBreaker(failures=5, cooldown_ms=1000)
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)
        self._extend = client.register_script(EXTEND)
        self._resume = client.register_script(RESUME)

    @guarded
    async def acquire(self, name: str, token: str, ttl_ms: int) -> tuple[bool, int]:
        """Take the lock for *token* if it is free: (True, fencing token), or
        (False, how long the holder's TTL still runs, in ms)."""
        reply: Any = await self._acquire(
            keys=[lock_key(name), fencing_key(name)], args=[token, ttl_ms]
        )
        got, value = reply
        return bool(int(got)), int(value)

    @guarded
    async def release(self, name: str, token: str) -> bool:
        """Delete the lock if *token* holds it and announce it; whether it did."""
        released = await self._release(keys=[lock_key(name)], args=[token, LOCK_CHANNEL, name])
        return bool(released)

    @guarded
    async def extend(self, name: str, token: str, ttl_ms: int) -> bool:
        """Reset the lock's TTL if *token* holds it; whether it did."""
        return bool(await self._extend(keys=[lock_key(name)], args=[token, ttl_ms]))

    @guarded
    async def resume(self, name: str, token: str, ttl_ms: int) -> int | None:
        """Reset the TTL of the lock *token* holds and return its fencing
        token; None if the token does not hold it."""
        reply: Any = await self._resume(
            keys=[lock_key(name), fencing_key(name)], args=[token, ttl_ms]
        )
        return int(reply[1]) if int(reply[0]) else None
