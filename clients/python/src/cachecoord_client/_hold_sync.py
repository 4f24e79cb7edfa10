"""How `Client.hold_lock` holds a lock: a thread follows a chain of HoldLock streams.

Hand-written, as its asyncio counterpart (`cachecoord_client._hold_async`) is:
a thread cannot be interrupted the way a task is cancelled, and a blocking
stream is an iterator fed by a request generator rather than read and write
calls, so this is not generated from it (see scripts/gen_sync_client.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import grpc

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

__all__ = ["SyncHold"]


class _Cancellable(Protocol):
    """A running call (grpc-stubs leaves ``grpc.Call.cancel`` untyped)."""

    def cancel(self) -> bool: ...


class _Stream:
    """One HoldLock stream: the call, its responses and the event that half-closes it."""

    def __init__(self, stub: Any, metadata: Any, first: pb.HoldLockRequest) -> None:
        self.letting_go = threading.Event()
        call = stub.HoldLock(_held_requests(first, self.letting_go), metadata=metadata)
        self.call: _Cancellable = call
        self.responses: Iterator[pb.HoldLockResponse] = iter(call)

    def close(self) -> None:
        self.call.cancel()
        self.letting_go.set()


_RELEASE_ON_CLOSE_S = 2.0
"""Deadline of the ReleaseLock a hold sends when it is closed between a
hand-off and its resume."""


class SyncHold:
    """One lock held through a chain of HoldLock streams (see the asyncio
    client's `AsyncHold`): a thread follows the current stream, resumes the
    lock on `handoff`, and marks it lost (`HeldLock.lost`) the moment the
    stream says `lost`, breaks, or a resume fails. A thread cannot be
    interrupted, so the block learns of a loss through the `HeldLock` and,
    at the latest, as `LockLost` when it ends."""

    def __init__(self, stub: Any, metadata: Any, name: str, ttl_ms: int) -> None:
        self._stub = stub
        self._metadata = metadata
        self._name = name
        self._ttl_ms = ttl_ms
        self._mutex = threading.Lock()  # guards _stream and _leaving
        self._stream: _Stream | None = None
        self._lock: HeldLock | None = None
        self._follower: threading.Thread | None = None
        self._leaving = False
        self._handed_off = False
        self._resuming = False  # between a handoff and the new stream's `acquired`
        self._error: CacheCoordError | None = None

    def take(self, wait_timeout_ms: int, seconds: float) -> HeldLock:
        request = _convert.hold_lock_acquire(self._name, self._ttl_ms, wait_timeout_ms)
        request.acquire.resumable = True
        stream = self._stream = _Stream(self._stub, self._metadata, request)
        granted = _take_held(stream.call, stream.responses, self._name, seconds)
        self._lock = HeldLock(
            name=granted.name, token=granted.token, fencing_token=granted.fencing_token
        )
        self._follower = threading.Thread(
            target=self._follow, name=f"hold-lock[{self._name}]", daemon=True
        )
        self._follower.start()
        return self._lock

    def release(self, seconds: float) -> None:
        assert self._follower is not None
        assert self._lock is not None
        with self._mutex:
            self._leaving = True
            if self._stream is not None:
                self._stream.letting_go.set()  # the half-close: the server releases
        self._follower.join(seconds)
        if self._follower.is_alive():
            self.close()
            raise DeadlineExceeded(
                f"the release of lock {self._name!r} was not confirmed within {seconds:.3f} s"
            )
        if self._error is None and self._handed_off:
            self._release_handed_off(self._lock, seconds)
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Close the current stream (the server then releases the lock).
        Between a hand-off and its resume no stream holds the lock: it is
        then released by its token, or it would outlive the block by its TTL."""
        with self._mutex:
            self._leaving = True
            if self._stream is not None:
                self._stream.close()
            resuming = self._resuming
        if resuming and self._lock is not None:
            self._release_handed_off(self._lock, _RELEASE_ON_CLOSE_S)

    def _follow(self) -> None:
        try:
            while True:
                assert self._stream is not None
                handoff = self._read_to_end(self._stream)
                if handoff is None:
                    return
                if self._leaving:
                    self._handed_off = True
                    return
                valid_for = handoff - (handoff * 0.01 + 0.005)
                with self._mutex:
                    self._resuming = True
                resumed = self._resume(time.monotonic() + valid_for)
                with self._mutex:
                    self._resuming = False
                if not resumed:
                    return
        except Exception as err:  # a bug must not leave the holder believing it holds the lock
            self._fail(CacheCoordError(f"following lock {self._name!r} failed: {err!r}"))

    def _read_to_end(self, stream: _Stream) -> float | None:
        lost = False
        handoff: float | None = None
        try:
            for response in stream.responses:
                kind = response.WhichOneof("kind")
                if kind == "lost":
                    lost = True
                    self._fail(LockLost(f"lock {self._name!r} was lost while held"))
                elif kind == "handoff":
                    handoff = response.handoff.valid_for_ms / 1000
        except grpc.RpcError as err:
            if self._leaving and not lost and _code(err) is grpc.StatusCode.CANCELLED:
                return None  # our own close()
            self._fail(_convert.hold_error(self._name, err, lost or not self._leaving))
            return None
        if lost:
            return None
        if handoff is None and not self._leaving:
            self._fail(LockLost(f"the stream holding lock {self._name!r} ended unexpectedly"))
        return handoff

    def _resume(self, valid_until: float) -> bool:
        assert self._lock is not None
        resume = pb.HoldLockRequest(
            resume=pb.HoldLockRequest.Resume(
                name=self._name, token=self._lock.token, ttl_ms=self._ttl_ms
            )
        )
        retry_in = RESUME_RETRY_FIRST
        why = "no time was left"
        while (left := valid_until - time.monotonic()) > 0:
            with self._mutex:
                if self._leaving and self._stream is not None:
                    # Let go while handed off: released with ReleaseLock by release().
                    self._handed_off = True
                    return False
                stream = self._stream = _Stream(self._stub, self._metadata, resume)
            with _cancel_after(stream.call, left) as expired:
                try:
                    response = next(stream.responses, None)
                except grpc.RpcError as err:
                    if expired.is_set():
                        why = "the server did not answer"
                        break
                    code = _code(err)
                    if code not in RESUME_RETRY_CODES:
                        self._fail(_convert.hold_error(self._name, err, True))
                        return False
                    why = str(from_rpc_error(err))
                    time.sleep(min(retry_in, max(0.0, valid_until - time.monotonic())))
                    retry_in = min(retry_in * 2, RESUME_RETRY_MAX)
                    continue
            if (
                response is not None
                and response.WhichOneof("kind") == "acquired"
                and response.acquired.fencing_token == self._lock.fencing_token
            ):
                with self._mutex:
                    if self._leaving:  # release() half-closed the previous stream
                        stream.letting_go.set()
                return True
            stream.close()
            self._fail(LockLost(f"lock {self._name!r} was lost while handed off"))
            return False
        self._fail(LockLost(f"lock {self._name!r} could not be resumed before it expired ({why})"))
        return False

    def _release_handed_off(self, lock: HeldLock, seconds: float) -> None:
        request = _convert.release_lock_request(lock.name, lock.token)
        try:
            self._stub.ReleaseLock(request, timeout=seconds, metadata=self._metadata)
        except grpc.RpcError as err:
            if _code(err) is grpc.StatusCode.FAILED_PRECONDITION:  # not held: it was lost
                self._error = LockLost(f"lock {self._name!r} was lost while handed off")
            else:
                self._error = from_rpc_error(err)

    def _fail(self, error: CacheCoordError) -> None:
        if self._error is None:
            self._error = error
        if self._lock is not None:
            lost = (
                error
                if isinstance(error, LockLost)
                else LockLost(f"lock {self._name!r} may be lost: {error}")
            )
            self._lock._mark_lost(lost)


def _code(err: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(err, "code", None)
    result = code() if callable(code) else None
    return result if isinstance(result, grpc.StatusCode) else None


def _held_requests(
    acquire: pb.HoldLockRequest, letting_go: threading.Event
) -> Iterator[pb.HoldLockRequest]:
    """The request stream: acquire, then a half-close (the release) once *letting_go* is set."""
    yield acquire
    letting_go.wait()


@contextlib.contextmanager
def _cancel_after(call: _Cancellable, seconds: float) -> Iterator[threading.Event]:
    """Cancel *call* if the block runs longer than *seconds*; the event says whether it did."""
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        call.cancel()

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield expired
    finally:
        timer.cancel()


def _take_held(
    call: _Cancellable, responses: Iterator[pb.HoldLockResponse], name: str, seconds: float
) -> Lock:
    """Wait up to *seconds* for the ``acquired`` event."""
    with _cancel_after(call, seconds) as expired:
        try:
            response = next(responses, None)
        except grpc.RpcError as err:
            if expired.is_set():
                raise DeadlineExceeded(
                    f"lock {name!r} was not acquired within {seconds:.3f} s"
                ) from err
            raise from_rpc_error(err) from err
    if response is None:
        raise CacheCoordError(
            f"HoldLock for {name!r} ended before the lock was acquired",
            code=grpc.StatusCode.INTERNAL,
        )
    return _convert.to_held_lock(name, response)
