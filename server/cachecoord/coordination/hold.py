"""Holding a lock for as long as its holder wants it (the HoldLock stream).

A `Hold` takes a lock, renews it every third of its TTL in a task of its own,
and releases it when the holder leaves the ``async with`` block, whichever way
it leaves: normally, by an exception, or cancelled because its client went
away. A lock that outlives its holder blocks every other acquirer for a whole
TTL, so the release runs in a task of its own that a second cancellation of
the holder cannot cut short.

If a renewal fails (Redis has another holder or no lock, or could not be
reached for a whole TTL), the lock is lost and the holder must stop at once,
whatever it is waiting for. Like ``asyncio.timeout``, the hold then cancels
the holder's task and turns that cancellation into `LockLost` as the block
exits (a cancellation from elsewhere still wins).
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from cachecoord import background
from cachecoord.errors import LockNotHeld, Unavailable
from cachecoord.model import LockGrant

if TYPE_CHECKING:
    from cachecoord.coordination.locks import Locks

log = logging.getLogger(__name__)

RENEWALS_PER_TTL = 3


class LockLost(LockNotHeld):
    """A held lock was lost: its renewal failed, so another client may hold it."""


class Hold:
    """``async with`` block that holds one lock: acquire, renew, release.

    Entering waits for the lock (up to *wait_timeout_ms*) and returns its
    grant; leaving releases it. Use it from the task that runs the block.
    """

    def __init__(self, locks: Locks, name: str, ttl_ms: int, wait_timeout_ms: int) -> None:
        self._locks = locks
        self._name = name
        self._ttl_ms = ttl_ms
        self._wait_timeout_ms = wait_timeout_ms
        self._grant: LockGrant | None = None
        self._holder: asyncio.Task[object] | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._leaving = False
        self._lost = False
        self._cancelled: asyncio.Task[object] | None = None  # the holder, once we cancel it

    async def __aenter__(self) -> LockGrant:
        holder = asyncio.current_task()
        if holder is None:
            raise RuntimeError("Hold must be entered from a task")
        self._grant = await self._locks.acquire(self._name, self._ttl_ms, self._wait_timeout_ms)
        self._holder = holder
        self._renewal = asyncio.create_task(
            self._renew(self._grant), name=f"lock-renewal[{self._name}]"
        )
        return self._grant

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._renewal is None or self._grant is None:
            raise RuntimeError("Hold exited without having been entered")
        self._leaving = True  # from here on a lost lock is reported, not cancelled
        let_go = asyncio.create_task(
            self._let_go(self._renewal, self._grant), name=f"lock-release[{self._name}]"
        )
        try:
            released = await asyncio.shield(let_go)
        except asyncio.CancelledError:
            let_go.add_done_callback(self._log_late_failure)
            raise
        except (RedisError, OSError) as err:
            if exc_type is None:
                raise Unavailable(
                    f"could not release lock {self._name!r} ({err}); it expires after its TTL"
                ) from err
            log.warning("could not release lock %r (%s); it expires with its TTL", self._name, err)
            return
        # Report a lost lock, unless someone else cancelled the holder too:
        # then the holder (the client) is gone and there is nobody to tell.
        if not released and (self._took_back_cancellation() or exc_type is None):
            raise LockLost(
                f"lock {self._name!r} was lost while held (its renewal failed or it expired); "
                "another client may hold it now"
            )

    async def _let_go(self, renewal: asyncio.Task[None], grant: LockGrant) -> bool:
        """Stop renewing, then release the lock; False if it turned out to be lost."""
        await background.stop(renewal)
        if self._lost:
            return False
        try:
            await self._locks.release(self._name, grant.token)
        except LockNotHeld:
            return False
        return True

    async def _renew(self, grant: LockGrant) -> None:
        try:
            await self._renew_until_lost(grant)
        except Exception:  # a bug must not leave the holder believing it holds the lock
            log.exception("renewing lock %r failed", self._name)
        self._lose()

    async def _renew_until_lost(self, grant: LockGrant) -> None:
        """Extend the lock every ttl/3; return once it may no longer be held."""
        ttl = self._ttl_ms / 1000
        valid_until = time.monotonic() + ttl
        while True:
            await asyncio.sleep(ttl / RENEWALS_PER_TTL)
            attempt = time.monotonic()
            try:
                await self._locks.extend(self._name, grant.token, self._ttl_ms)
            except LockNotHeld:
                return
            except (RedisError, OSError) as err:
                # Unknown whether the lock still exists: retry until a TTL has
                # passed since the last good renewal; after that it may not.
                if time.monotonic() >= valid_until:
                    return
                log.warning("could not renew lock %r (%s); retrying", self._name, err)
                continue
            valid_until = attempt + ttl

    def _lose(self) -> None:
        log.info("lock %r was lost while held", self._name)
        self._lost = True
        if not self._leaving and self._holder is not None:
            self._cancelled = self._holder
            self._cancelled.cancel()

    def _took_back_cancellation(self) -> bool:
        """Undo our own cancellation of the holder; False if it was cancelled by others too."""
        return self._cancelled is not None and self._cancelled.uncancel() == 0

    def _log_late_failure(self, let_go: asyncio.Task[bool]) -> None:
        """Retrieve the outcome of a release nobody waits for any more."""
        if not let_go.cancelled() and let_go.exception() is not None:
            log.warning("could not release lock %r (%s)", self._name, let_go.exception())
