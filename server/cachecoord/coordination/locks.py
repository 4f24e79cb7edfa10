"""Distributed locks on Redis (redis-py's Lock pattern) with fencing tokens.

A lock is ``SET name token NX PX ttl``; release and extend are Lua
compare-and-delete and compare-and-pexpire, so only the holder's token works.
The fencing token is taken in the same script as the lock, so fencing order
is acquisition order. It is ``max(previous + 1, Redis clock in microseconds)``:
it keeps increasing across a Redis restart that lost the counter, as long as
the Redis host's clock does not step back by more than the time since the
last acquisition. Waiters sleep until a release notice (pub/sub) or the
holder's TTL, never in a busy loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import defaultdict
from collections.abc import Iterator

import redis.asyncio as redis
from redis.exceptions import RedisError

from cachecoord import instruments, telemetry
from cachecoord.coordination.hold import Hold
from cachecoord.errors import InvalidArgument, LockNotAcquired, LockNotHeld, Unavailable
from cachecoord.model import LockGrant
from cachecoord.storage import keys

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

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""

EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

MAX_TTL_MS = 86_400_000
MAX_NAME_BYTES = 512


class Locks:
    """Acquire, release, extend and hold named locks."""

    def __init__(self, client: redis.Redis | redis.RedisCluster) -> None:
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)
        self._extend = client.register_script(EXTEND)
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)

    async def acquire(self, name: str, ttl_ms: int, wait_timeout_ms: int) -> LockGrant:
        """Take the lock, waiting up to *wait_timeout_ms* for its holder to let go."""
        _check(name, ttl_ms)
        if wait_timeout_ms < 0:
            raise InvalidArgument(f"wait_timeout_ms must not be negative (got {wait_timeout_ms})")
        token = secrets.token_urlsafe(18)
        deadline = time.monotonic() + wait_timeout_ms / 1000
        released = asyncio.Event()
        # Registered before the first attempt, so a release between a failed
        # attempt and the wait is not missed.
        self._waiters[name].add(released)
        try:
            return await self._acquire_loop(
                name, token, ttl_ms, wait_timeout_ms, deadline, released
            )
        finally:
            waiters = self._waiters[name]
            waiters.discard(released)
            if not waiters:
                del self._waiters[name]

    async def _acquire_loop(
        self,
        name: str,
        token: str,
        ttl_ms: int,
        wait_timeout_ms: int,
        deadline: float,
        released: asyncio.Event,
    ) -> LockGrant:
        started = time.monotonic()
        while True:
            released.clear()
            with _redis_errors():
                got, value = await self._acquire(
                    keys=[keys.lock_key(name), keys.fencing_key(name)], args=[token, ttl_ms]
                )
            if got:
                if telemetry.METRICS:
                    instruments.lock_wait.record((time.monotonic() - started) * 1000)
                return LockGrant(token=token, fencing_token=int(value))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                waited = f" after waiting {wait_timeout_ms} ms" if wait_timeout_ms else ""
                raise LockNotAcquired(f"lock {name!r} is held by another client{waited}")
            # Wake on the release notice, or when the holder's TTL runs out.
            holder_ms = int(value) if int(value) > 0 else 10
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(released.wait(), min(remaining, holder_ms / 1000 + 0.005))

    async def release(self, name: str, token: str) -> None:
        """Release the lock if *token* holds it."""
        _check(name, 1)
        with _redis_errors():
            released = await self._release(
                keys=[keys.lock_key(name)], args=[token, keys.LOCK_CHANNEL, name]
            )
        if not released:
            raise LockNotHeld(f"lock {name!r} is not held by this token (expired or released)")

    async def extend(self, name: str, token: str, ttl_ms: int) -> None:
        """Reset the lock's TTL to *ttl_ms* from now if *token* holds it."""
        _check(name, ttl_ms)
        with _redis_errors():
            extended = await self._extend(keys=[keys.lock_key(name)], args=[token, ttl_ms])
        if not extended:
            raise LockNotHeld(f"lock {name!r} is not held by this token (expired or released)")

    def hold(self, name: str, ttl_ms: int, wait_timeout_ms: int) -> Hold:
        """Hold the lock for the duration of an ``async with`` block.

        The lock is renewed every third of *ttl_ms* while the block runs and
        released when it exits, also when it is cancelled; *ttl_ms* then only
        bounds how long the lock outlives a crashed instance. See `Hold`.
        """
        return Hold(self, name, ttl_ms, wait_timeout_ms)

    def on_release_notice(self, name: str) -> None:
        """Called by the bus for every release published by any instance."""
        for event in self._waiters.get(name, ()):
            event.set()

    def wake_all(self) -> None:
        """Wake every waiter (the subscription dropped: notices may be lost)."""
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()


@contextlib.contextmanager
def _redis_errors() -> Iterator[None]:
    try:
        yield
    except RedisError as err:
        raise Unavailable(
            f"Redis is unavailable; locks cannot be taken or released: {err}"
        ) from err


def _check(name: str, ttl_ms: int) -> None:
    if not name:
        raise InvalidArgument("lock name must not be empty")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidArgument(f"lock name is longer than {MAX_NAME_BYTES} bytes")
    if not 0 < ttl_ms <= MAX_TTL_MS:
        raise InvalidArgument(f"ttl_ms must be between 1 and {MAX_TTL_MS} (got {ttl_ms})")
