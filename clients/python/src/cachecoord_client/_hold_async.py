"""How `AsyncClient.hold_lock` holds a lock: a task follows a chain of HoldLock streams.

Hand-written: tasks and cancellation have no thread equivalent, so the
blocking client's counterpart (`cachecoord_client._hold_sync`) is written
separately rather than generated (see scripts/gen_sync_client.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from cachecoord_client import _convert
from cachecoord_client._convert import RESUME_RETRY_CODES, RESUME_RETRY_FIRST, RESUME_RETRY_MAX
from cachecoord_client.errors import (
    CacheCoordError,
    DeadlineExceeded,
    LockLost,
    from_rpc_error,
)
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb
from cachecoord_client.types import HeldLock, Lock

if TYPE_CHECKING:
    from cachecoord_client.proto.cachecoord.v1.cachecoord_pb2_grpc import (
        CacheCoordServiceAsyncStub,
    )

__all__ = ["AsyncHold"]

_HoldCall = grpc.aio.StreamStreamCall[pb.HoldLockRequest, pb.HoldLockResponse]


def _client_margin(valid_for: float) -> float:
    """What a client keeps back from a server's ``valid_for_ms`` (the event's transit)."""
    return valid_for * 0.01 + 0.005


_RELEASING: set[asyncio.Task[None]] = set()
"""Releases of handed-off locks whose holder left (see AsyncHold.close)."""


class AsyncHold:
    """One lock held through a chain of HoldLock streams: the first takes it,
    each later one resumes it after the server handed it off.

    A task of its own follows the current stream. It resumes on `handoff`,
    and when the stream says `lost`, breaks, or a resume fails, marks the
    lock lost and cancels the holder's task (like ``asyncio.timeout``,
    `took_back_cancellation` then turns that cancellation into `LockLost`).
    """

    def __init__(
        self,
        stub: CacheCoordServiceAsyncStub,
        metadata: Any,
        name: str,
        ttl_ms: int,
    ) -> None:
        self._stub = stub
        self._metadata = metadata
        self._name = name
        self._ttl_ms = ttl_ms
        self._call: _HoldCall = stub.HoldLock(None, metadata=metadata)
        self._lock: HeldLock | None = None
        self._follower: asyncio.Task[None] | None = None
        self._holder: asyncio.Task[Any] | None = None
        self._cancelled_holder = False
        self._leaving = False
        self._handed_off = False  # the last stream ended with handoff, not yet resumed
        self._resuming = False  # between a handoff and the new stream's `acquired`
        self._releasing: asyncio.Task[None] | None = None
        self._error: CacheCoordError | None = None  # how the chain ended, if it failed

    async def take(self, wait_timeout_ms: int, seconds: float) -> HeldLock:
        """Send ``acquire`` and wait up to *seconds* for ``acquired``."""
        request = _convert.hold_lock_acquire(self._name, self._ttl_ms, wait_timeout_ms)
        request.acquire.resumable = True
        granted = await _take_held(self._call, self._name, request, seconds)
        self._lock = HeldLock(
            name=granted.name, token=granted.token, fencing_token=granted.fencing_token
        )
        self._holder = asyncio.current_task()
        self._follower = asyncio.create_task(self._follow(), name=f"hold-lock[{self._name}]")
        return self._lock

    async def release(self, seconds: float) -> None:
        """Let go: half-close the current stream and wait for its end; a lock
        that was just handed off is released with ReleaseLock instead."""
        assert self._follower is not None
        assert self._lock is not None
        self._leaving = True
        try:
            async with asyncio.timeout(seconds):
                await self._half_close(self._call)
                await asyncio.shield(self._follower)
                if self._error is None and self._handed_off:
                    await self._release_handed_off(self._lock)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the release of lock {self._name!r} was not confirmed within {seconds:.3f} s"
            ) from None
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Cancel the current stream (the server then releases the lock) and the
        follower. Between a hand-off and its resume no stream holds the lock:
        it is then released by its token, or it would outlive the block by
        its TTL."""
        self._leaving = True
        self._call.cancel()
        if self._follower is not None:
            self._follower.cancel()
        if self._resuming and self._lock is not None and self._releasing is None:
            self._releasing = asyncio.get_running_loop().create_task(
                self._release_handed_off(self._lock), name=f"release-lock[{self._name}]"
            )
            _RELEASING.add(self._releasing)  # the loop keeps tasks only weakly
            self._releasing.add_done_callback(_RELEASING.discard)

    def took_back_cancellation(self) -> LockLost | None:
        """The loss to raise if we cancelled the holder and nobody else did; else None."""
        if not self._cancelled_holder or self._holder is None or self._lock is None:
            return None
        if self._holder.uncancel() > 0:
            return None
        error = self._lock._loss.error
        return error if error is not None else LockLost(f"lock {self._name!r} was lost")

    async def _follow(self) -> None:
        while True:
            handoff = await self._read_to_end(self._call)
            if handoff is None:
                return
            if self._leaving:
                self._handed_off = True
                return
            self._resuming = True
            resumed = await self._resume(time.monotonic() + handoff - _client_margin(handoff))
            self._resuming = False
            if not resumed:
                return

    async def _read_to_end(self, call: _HoldCall) -> float | None:
        """Read *call* to its end; the ``valid_for`` seconds of its handoff,
        or None once the chain ended (released, or failed: see ``_fail``)."""
        lost = False
        handoff: float | None = None
        try:
            while isinstance(response := await call.read(), pb.HoldLockResponse):
                kind = response.WhichOneof("kind")
                if kind == "lost":
                    lost = True
                    self._fail(LockLost(f"lock {self._name!r} was lost while held"))
                elif kind == "handoff":
                    handoff = response.handoff.valid_for_ms / 1000
        except grpc.RpcError as err:
            self._fail(_convert.hold_error(self._name, err, lost or not self._leaving))
            return None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this follower is being stopped
            # The call was cancelled under us (the channel was closed): the
            # server ends the stream and releases the lock.
            self._fail(LockLost(f"the stream holding lock {self._name!r} was cancelled"))
            return None
        if lost:
            return None
        if handoff is None and not self._leaving:
            self._fail(LockLost(f"the stream holding lock {self._name!r} ended unexpectedly"))
        return handoff

    async def _resume(self, valid_until: float) -> bool:
        """Take the handed-off lock over on a new stream before *valid_until*."""
        assert self._lock is not None
        resume = pb.HoldLockRequest.Resume(
            name=self._name, token=self._lock.token, ttl_ms=self._ttl_ms
        )
        retry_in = RESUME_RETRY_FIRST
        why = "no time was left"
        while (left := valid_until - time.monotonic()) > 0:
            call: _HoldCall = self._stub.HoldLock(None, metadata=self._metadata)
            self._call = call
            try:
                async with asyncio.timeout(left):
                    with contextlib.suppress(asyncio.InvalidStateError):
                        await call.write(pb.HoldLockRequest(resume=resume))
                    response = await call.read()
            except TimeoutError:
                call.cancel()
                why = "the server did not answer"
                break
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                if error.code not in RESUME_RETRY_CODES:
                    self._fail(_convert.hold_error(self._name, err, True))
                    return False
                why = str(error)
                await asyncio.sleep(min(retry_in, max(0.0, valid_until - time.monotonic())))
                retry_in = min(retry_in * 2, RESUME_RETRY_MAX)
                continue
            if (
                isinstance(response, pb.HoldLockResponse)
                and response.WhichOneof("kind") == "acquired"
                and response.acquired.fencing_token == self._lock.fencing_token
            ):
                if self._leaving:  # release() may have half-closed the previous stream
                    await self._half_close(call)
                return True
            call.cancel()
            self._fail(LockLost(f"lock {self._name!r} was lost while handed off"))
            return False
        self._fail(LockLost(f"lock {self._name!r} could not be resumed before it expired ({why})"))
        return False

    async def _release_handed_off(self, lock: HeldLock) -> None:
        request = _convert.release_lock_request(lock.name, lock.token)
        try:
            await self._stub.ReleaseLock(request, metadata=self._metadata)
        except grpc.RpcError as err:
            error = from_rpc_error(err)
            if error.code is grpc.StatusCode.FAILED_PRECONDITION:  # not held: it was lost
                self._error = LockLost(f"lock {self._name!r} was lost while handed off")
            else:
                self._error = error

    @staticmethod
    async def _half_close(call: _HoldCall) -> None:
        # Half-closing releases the lock, as a `release` message does. A
        # write would race with the server ending the stream (a lost lock),
        # and grpc.aio answers a write to an ended stream by replacing the
        # server's status with a local INTERNAL: the ABORTED would be lost.
        with contextlib.suppress(asyncio.InvalidStateError, grpc.RpcError):
            await call.done_writing()

    def _fail(self, error: CacheCoordError) -> None:
        """The chain ended with *error*: the lock may be lost, which
        interrupts the holder at once unless it is already letting go."""
        if self._error is None:
            self._error = error
        if self._lock is None:
            return
        lost = (
            error
            if isinstance(error, LockLost)
            else LockLost(f"lock {self._name!r} may be lost: {error}")
        )
        if self._lock._mark_lost(lost) and not self._leaving and self._holder is not None:
            self._cancelled_holder = True
            self._holder.cancel()


async def _take_held(
    call: _HoldCall, name: str, request: pb.HoldLockRequest, seconds: float
) -> Lock:
    """Send the HoldLock request and wait up to *seconds* for ``acquired``."""
    try:
        async with asyncio.timeout(seconds):
            with contextlib.suppress(asyncio.InvalidStateError):  # ended already: read says why
                await call.write(request)
            response = await call.read()
    except TimeoutError:
        raise DeadlineExceeded(f"lock {name!r} was not acquired within {seconds:.3f} s") from None
    except grpc.RpcError as err:
        raise from_rpc_error(err) from err
    if not isinstance(response, pb.HoldLockResponse):
        raise CacheCoordError(
            f"HoldLock for {name!r} ended before the lock was acquired",
            code=grpc.StatusCode.INTERNAL,
        )
    return _convert.to_held_lock(name, response)
