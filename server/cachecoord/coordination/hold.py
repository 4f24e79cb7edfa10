"""Holding a lock for as long as its holder wants it (the HoldLock stream).

A `Hold` takes a lock (or, resuming, takes over one its token holds), renews
it every third of its TTL in a task of its own, and releases it when the
holder leaves the ``async with`` block, whichever way it leaves: normally, by
an exception, or cancelled because its client went away. A lock that
outlives its holder blocks every other acquirer for a whole TTL, so the
release runs in a task of its own that a second cancellation of the holder
cannot cut short. A holder that calls `Hold.hand_off` before leaving keeps
the lock instead: the hold stops renewing it, and its client resumes it
elsewhere before it expires.

A renewal that fails for any reason but "not held by this token" (a
timeout, a reset connection, an open breaker) is retried with backoff for as
long as the lock is certainly still held: until a TTL, minus a safety margin
for clock drift, has passed since the start of the last renewal that
succeeded (Redis counts the TTL from when it ran that renewal, which was
later). Only then, or when Redis says the token no longer holds it, is the
lock lost, and the holder must stop at once, whatever it is waiting for.
Like ``asyncio.timeout``, the hold then cancels the holder's task and turns
that cancellation into `LockLost` as the block exits (a cancellation from
elsewhere still wins).
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType
from typing import TYPE_CHECKING

from cachecoord import background
from cachecoord.errors import LockNotHeld, Unavailable
from cachecoord.model import LockGrant
from cachecoord.storage.errors import RedisError

if TYPE_CHECKING:
    from cachecoord.coordination.locks import Locks

log = logging.getLogger(__name__)

RENEWALS_PER_TTL = 3
_letting_go: set[asyncio.Task[bool]] = set()  # releases nobody awaits any more
DRIFT_FACTOR = 0.01
"""Share of the TTL kept as a margin for clock drift between us and Redis
(as Redlock does), plus `DRIFT_MIN` seconds."""
DRIFT_MIN = 0.002
RETRY_FIRST = 0.02
"""Seconds before the first retry of a failed renewal; doubled each time."""


class LockLost(LockNotHeld):
    """A held lock was lost: its renewal failed, so another client may hold it."""


def safety_margin(ttl_ms: int) -> float:
    """Seconds before the end of a TTL from which a lock is no longer counted as held."""
    return ttl_ms / 1000 * DRIFT_FACTOR + DRIFT_MIN


class Hold:
    """``async with`` block that holds one lock: acquire, renew, release.

    Entering waits for the lock (up to *wait_timeout_ms*), or takes over the
    lock *resume_token* holds, and returns its grant; leaving releases it,
    unless `hand_off` was called. Use it from the task that runs the block.
    """

    def __init__(
        self,
        locks: Locks,
        name: str,
        ttl_ms: int,
        wait_timeout_ms: int,
        *,
        resume_token: str = "",
    ) -> None:
        self._locks = locks
        self._name = name
        self._ttl_ms = ttl_ms
        self._wait_timeout_ms = wait_timeout_ms
        self._resume_token = resume_token
        self._grant: LockGrant | None = None
        self._holder: asyncio.Task[object] | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._valid_until = 0.0  # monotonic time until which the lock is certainly ours
        self._leaving = False
        self._lost = False
        self._handing_off = False
        self._cancelled: asyncio.Task[object] | None = None  # the holder, once we cancel it

    @property
    def handed_off(self) -> bool:
        """Whether the block was left by `hand_off`, with the lock still held."""
        return self._handing_off and not self._lost

    @property
    def handed_off_for(self) -> float:
        """After a hand-off: seconds from now for which the lock is certainly still held."""
        return max(0.0, self._valid_until - safety_margin(self._ttl_ms) - time.monotonic())

    def hand_off(self) -> None:
        """Leave the block without releasing the lock: it is left to what
        remains of its TTL, for the client to resume it elsewhere."""
        self._handing_off = True

    async def __aenter__(self) -> LockGrant:
        holder = asyncio.current_task()
        if holder is None:
            raise RuntimeError("Hold must be entered from a task")
        if self._resume_token:
            try:
                self._grant = await self._locks.resume(self._name, self._resume_token, self._ttl_ms)
            except LockNotHeld:
                raise LockLost(
                    f"lock {self._name!r} was lost before it could be resumed "
                    "(it expired or another client took it)"
                ) from None
        else:
            self._grant = await self._locks.acquire(self._name, self._ttl_ms, self._wait_timeout_ms)
        # From the call that took it, not from when the wait for it began.
        self._valid_until = self._grant.taken_at + self._ttl_ms / 1000
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
            kept = await asyncio.shield(let_go)
        except asyncio.CancelledError:
            # Kept referenced until done: the loop holds tasks only weakly.
            _letting_go.add(let_go)
            let_go.add_done_callback(_letting_go.discard)
            let_go.add_done_callback(self._log_late_failure)
            raise
        except (RedisError, OSError, Unavailable) as err:
            if exc_type is None:
                raise Unavailable(
                    f"could not release lock {self._name!r} ({err}); it expires after its TTL"
                ) from err
            log.warning("could not release lock %r (%s); it expires with its TTL", self._name, err)
            return
        # Report a lost lock, unless someone else cancelled the holder too:
        # then the holder (the client) is gone and there is nobody to tell.
        if not kept and (self._took_back_cancellation() or exc_type is None):
            raise LockLost(
                f"lock {self._name!r} was lost while held (its renewal failed or it expired); "
                "another client may hold it now"
            )

    async def _let_go(self, renewal: asyncio.Task[None], grant: LockGrant) -> bool:
        """Stop renewing, then release (or hand off) the lock; False if it was lost."""
        await background.stop(renewal)
        if self._lost:
            return False
        if self._handing_off:
            # No last renewal: with Redis slow it could outlast the grace the
            # connection has left. The client's resume renews it at once.
            self._lost = self.handed_off_for <= 0
            return not self._lost
        try:
            await self._locks.release(self._name, grant.token)
        except LockNotHeld:
            return False
        return True

    async def _renew(self, grant: LockGrant) -> None:
        try:
            reason = await self._renew_until_lost(grant)
        except Exception:  # a bug must not leave the holder believing it holds the lock
            log.exception("renewing lock %r failed", self._name)
            reason = "the renewal failed unexpectedly"
        self._lose(reason)

    async def _renew_until_lost(self, grant: LockGrant) -> str:
        """Extend the lock every ttl/3; return why, once it may no longer be held."""
        ttl = self._ttl_ms / 1000
        margin = safety_margin(self._ttl_ms)
        while True:
            await asyncio.sleep(ttl / RENEWALS_PER_TTL)
            retry_in = RETRY_FIRST
            while True:
                attempt = time.monotonic()
                left = self._valid_until - margin - attempt
                if left <= 0:
                    return "its renewal could not be confirmed before its TTL ran out"
                try:
                    # Bounded: a renewal stuck on a frozen Redis must not
                    # outlast the time the lock is certainly ours.
                    async with asyncio.timeout(left):
                        await self._locks.extend(self._name, grant.token, self._ttl_ms)
                except LockNotHeld:
                    return "Redis has another holder or no lock for its token"
                except Exception as err:  # timeout, reset, open breaker: unknown, so retry
                    log.warning(
                        "could not renew lock %r (%r); retrying for %.3f s more",
                        self._name,
                        err,
                        max(0.0, self._valid_until - margin - time.monotonic()),
                    )
                    await asyncio.sleep(
                        min(retry_in, max(0.0, self._valid_until - margin - time.monotonic()))
                    )
                    retry_in = min(retry_in * 2, ttl / RENEWALS_PER_TTL)
                    continue
                self._valid_until = attempt + ttl
                break

    def _lose(self, reason: str) -> None:
        log.warning("lock %r was lost while held: %s", self._name, reason)
        self._lost = True
        if self._grant is not None:
            # Not known to be gone (e.g. Redis was unreachable): give it
            # back if it is still ours, rather than leave it to its TTL.
            self._locks.release_in_background(self._name, self._grant.token)
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


class Handoffs:
    """When the holds of HoldLock streams are handed off instead of held on.

    A gRPC server closes a connection `max_connection_age` after it opened
    (GOAWAY), and kills the streams still open on it when the grace that
    follows runs out; a stream that started on a connection therefore has at
    least that grace before it can be killed. Handlers are not told of the
    GOAWAY (grpc #26703), so each hold is handed off after *every* seconds
    (half the grace): before the kill, which would release the lock. When
    the server drains, every hold is handed off at once, and new streams
    are refused.
    """

    def __init__(self, every: float) -> None:
        self.every = every
        self.draining = False
        self._open: set[asyncio.Timeout] = set()

    def window(self, opened_at: float) -> _Window:
        """``async with`` scope that raises TimeoutError when it is time to hand
        off: *every* seconds after the stream opened (``loop.time()``
        *opened_at*; the wait for the lock counts too), or now when draining."""
        return _Window(self, opened_at)

    def drain(self) -> None:
        """Hand off every hold now, and every later one at once."""
        self.draining = True
        now = asyncio.get_running_loop().time()
        for timeout in self._open:
            timeout.reschedule(now)


class _Window:
    def __init__(self, handoffs: Handoffs, opened_at: float) -> None:
        self._handoffs = handoffs
        self._opened_at = opened_at
        self._timeout: asyncio.Timeout | None = None

    async def __aenter__(self) -> None:
        loop = asyncio.get_running_loop()
        when = self._opened_at + self._handoffs.every
        self._timeout = asyncio.timeout_at(loop.time() if self._handoffs.draining else when)
        await self._timeout.__aenter__()
        self._handoffs._open.add(self._timeout)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._timeout is not None
        self._handoffs._open.discard(self._timeout)
        await self._timeout.__aexit__(exc_type, exc, tb)
