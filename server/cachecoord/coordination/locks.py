"""Distributed locks with fencing tokens, kept in Redis by storage/lock_store.py
(redis-py's Lock pattern; see there for the fencing order). Waiters sleep
until a release notice (pub/sub) or the holder's TTL, never in a busy loop.

An acquisition whose caller is gone before it ends (its deadline passed or
it was cancelled while the script ran) releases what the script took, so no
lock is left that nobody holds a token for; one that cannot finish within
the caller's deadline does not start (design 4.3).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Iterator

from cachecoord import instruments, telemetry
from cachecoord.coordination.hold import Hold
from cachecoord.errors import (
    DeadlineExceeded,
    InvalidArgument,
    LockNotAcquired,
    LockNotHeld,
    Unavailable,
)
from cachecoord.model import LockGrant
from cachecoord.storage.errors import RedisError
from cachecoord.storage.lock_store import LockStore

MAX_TTL_MS = 86_400_000
MIN_TTL_MS = 100
"""Shortest accepted ``ttl_ms``: a renewal every third of it must fit in a
Redis round trip with room to spare, and a handed-off hold must be resumable."""
MAX_NAME_BYTES = 512
MIN_TOKEN_CHARS, MAX_TOKEN_CHARS = 16, 128
ROUND_TRIP_BUDGET = 0.005
"""Seconds an acquisition needs at least: a Redis round trip and the answer's
way back. A caller with less deadline left is answered DEADLINE_EXCEEDED at
once, so it never takes a lock it could not be told about."""

log = logging.getLogger(__name__)


class Locks:
    """Acquire, release, extend and hold named locks."""

    def __init__(self, store: LockStore) -> None:
        self._store = store
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._orphan_releases: set[asyncio.Task[None]] = set()

    async def acquire(
        self,
        name: str,
        ttl_ms: int,
        wait_timeout_ms: int,
        *,
        caller_deadline: float | None = None,
        token: str = "",
    ) -> LockGrant:
        """Take the lock, waiting up to *wait_timeout_ms* for its holder to let go.

        *caller_deadline* (``time.monotonic()`` seconds) is when the caller
        stops listening: an acquisition that would end after it is not
        started, or is undone. *token*: the caller's own (see
        `check_token`), so that it can release the lock without the answer;
        empty: a random one.
        """
        _check(name, ttl_ms)
        if wait_timeout_ms < 0:
            raise InvalidArgument(f"wait_timeout_ms must not be negative (got {wait_timeout_ms})")
        if token:
            check_token(token)
        _before(caller_deadline, name)
        token = token or secrets.token_urlsafe(18)
        deadline = time.monotonic() + wait_timeout_ms / 1000
        released = asyncio.Event()
        # Registered before the first attempt, so a release between a failed
        # attempt and the wait is not missed.
        self._waiters[name].add(released)
        try:
            grant = await self._acquire_loop(
                name, token, ttl_ms, wait_timeout_ms, deadline, released
            )
        finally:
            waiters = self._waiters[name]
            waiters.discard(released)
            if not waiters:
                del self._waiters[name]
        if caller_deadline is not None and caller_deadline - time.monotonic() < (
            ROUND_TRIP_BUDGET / 2
        ):
            # The answer would arrive after the caller gave up: nobody would
            # ever hold this token, so let go now rather than after the TTL.
            self.release_in_background(name, token)
            raise DeadlineExceeded(f"lock {name!r} was taken too late for the caller's deadline")
        return grant

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
            attempted = time.monotonic()
            got, value = await self._attempt(name, token, ttl_ms)
            if got:
                if telemetry.METRICS:
                    instruments.lock_wait.record(time.monotonic() - started)
                return LockGrant(token=token, fencing_token=int(value), taken_at=attempted)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                waited = f" after waiting {wait_timeout_ms} ms" if wait_timeout_ms else ""
                raise LockNotAcquired(f"lock {name!r} is held by another client{waited}")
            # Wake on the release notice, or when the holder's TTL runs out.
            holder_ms = int(value) if int(value) > 0 else 10
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(released.wait(), min(remaining, holder_ms / 1000 + 0.005))

    async def _attempt(self, name: str, token: str, ttl_ms: int) -> tuple[bool, int]:
        """Try to take the lock once; if the caller goes away while it runs
        (deadline, cancellation), whatever it takes is released."""
        attempt = asyncio.ensure_future(self._store.acquire(name, token, ttl_ms))
        try:
            with _redis_errors():
                got, value = await asyncio.shield(attempt)
        except asyncio.CancelledError:
            attempt.add_done_callback(lambda done: self._release_if_taken(done, name, token))
            raise
        except Unavailable:
            # Redis may have run the script before the error (a timeout on the
            # reply): let go of whatever this token may hold, nobody will.
            self.release_in_background(name, token)
            raise
        return got, value

    def _release_if_taken(
        self, attempt: asyncio.Future[tuple[bool, int]], name: str, token: str
    ) -> None:
        if attempt.cancelled() or attempt.exception() is not None:
            return  # not taken, or unknown: then the lock ends with its TTL
        if attempt.result()[0]:
            self.release_in_background(name, token)

    def release_in_background(self, name: str, token: str) -> None:
        """Release the lock if *token* still holds it, in a task of its own
        (for a caller that is gone, or a holder that lost track of it)."""

        async def release() -> None:
            try:
                await self.release(name, token)
            except LockNotHeld:
                pass
            except Unavailable as err:
                log.warning("could not release lock %r (%s); it expires with its TTL", name, err)
            else:
                log.info("released lock %r, which its holder or caller had given up", name)

        task = asyncio.create_task(release(), name=f"lock-release[{name}]")
        self._orphan_releases.add(task)
        task.add_done_callback(self._orphan_releases.discard)

    async def release(self, name: str, token: str) -> None:
        """Release the lock if *token* holds it."""
        _check_name(name)
        with _redis_errors():
            released = await self._store.release(name, token)
        if not released:
            raise LockNotHeld(f"lock {name!r} is not held by this token (expired or released)")

    async def extend(self, name: str, token: str, ttl_ms: int) -> None:
        """Reset the lock's TTL to *ttl_ms* from now if *token* holds it."""
        _check(name, ttl_ms)
        with _redis_errors():
            extended = await self._store.extend(name, token, ttl_ms)
        if not extended:
            raise LockNotHeld(f"lock {name!r} is not held by this token (expired or released)")

    async def resume(self, name: str, token: str, ttl_ms: int) -> LockGrant:
        """Reset the TTL of a lock *token* holds and return its grant (same
        fencing token); LockNotHeld if the token no longer holds it."""
        _check(name, ttl_ms)
        if not token:
            raise InvalidArgument("resume: token must not be empty")
        attempted = time.monotonic()
        with _redis_errors():
            fencing_token = await self._store.resume(name, token, ttl_ms)
        if fencing_token is None:
            raise LockNotHeld(f"lock {name!r} is not held by this token any more")
        return LockGrant(token=token, fencing_token=fencing_token, taken_at=attempted)

    def hold(self, name: str, ttl_ms: int, wait_timeout_ms: int, *, resume_token: str = "") -> Hold:
        """Hold the lock for the duration of an ``async with`` block.

        The lock is renewed every third of *ttl_ms* while the block runs and
        released when it exits, also when it is cancelled; *ttl_ms* then only
        bounds how long the lock outlives a crashed instance. With
        *resume_token*, the block takes over a lock that token holds instead
        of acquiring it. See `Hold`.
        """
        return Hold(self, name, ttl_ms, wait_timeout_ms, resume_token=resume_token)

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


def _before(caller_deadline: float | None, name: str) -> None:
    """Refuse to start what cannot finish before the caller's deadline."""
    if caller_deadline is not None and caller_deadline - time.monotonic() < ROUND_TRIP_BUDGET:
        raise DeadlineExceeded(
            f"too little of the deadline is left to take lock {name!r} "
            f"(at least {ROUND_TRIP_BUDGET * 1000:.0f} ms are needed)"
        )


def check_token(token: str) -> None:
    """A caller's own token: long enough not to be guessed, printable ASCII."""
    if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS or not all(
        "!" <= char <= "~" for char in token
    ):
        raise InvalidArgument(
            f"token must be {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} printable ASCII characters "
            "(random, never reused), or empty"
        )


def _check_name(name: str) -> None:
    """Lock names follow the rules of keys."""
    if not name:
        raise InvalidArgument("lock name must not be empty")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidArgument(f"lock name is longer than {MAX_NAME_BYTES} bytes")
    if "\x00" in name:
        raise InvalidArgument("lock name must not contain NUL characters")


def _check(name: str, ttl_ms: int) -> None:
    _check_name(name)
    if not MIN_TTL_MS <= ttl_ms <= MAX_TTL_MS:
        raise InvalidArgument(
            f"ttl_ms must be between {MIN_TTL_MS} and {MAX_TTL_MS} (got {ttl_ms})"
        )
