"""The blocking client, built on a ``grpc`` channel."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import grpc

from cachecoord_client import _convert
from cachecoord_client.errors import (
    CacheCoordError,
    DeadlineExceeded,
    LockLost,
    Unavailable,
    from_rpc_error,
)
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2_grpc
from cachecoord_client.types import (
    Deleted,
    Entry,
    HeldLock,
    Lock,
    Value,
    WatchEvent,
    WatchEventKind,
)
from cachecoord_client.watch import WatchStream

__all__ = ["Client"]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class _Cancellable(Protocol):
    """A running call (grpc-stubs leaves ``grpc.Call.cancel`` untyped)."""

    def cancel(self) -> bool: ...


class Client:
    """Blocking client of a cachecoord server; the same methods as `AsyncClient`.

    The client is thread-safe: one instance (one channel) can serve every
    thread of a process. It opens its channel in the constructor; the
    connection itself is made on the first call.

    Every method takes a keyword ``timeout`` in seconds; None means the
    client's ``default_timeout``. Every failed call raises a
    `cachecoord_client.errors.CacheCoordError` subclass chained to the
    `grpc.RpcError`.

    Example:
        >>> with Client("127.0.0.1:50051") as client:  # doctest: +SKIP
        ...     value = client.get("users", "1")
    """

    def __init__(
        self,
        target: str,
        *,
        default_timeout: float = 5.0,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """Open a channel to ``target``.

        Args:
            target: Server address, e.g. ``"127.0.0.1:50051"`` or ``"dns:///cachecoord:50051"``.
            default_timeout: Deadline in seconds of calls made without ``timeout``.
            credentials: TLS credentials; None opens a plaintext channel.
            token: Bearer token sent as ``authorization: Bearer <token>`` metadata.
            options: gRPC channel options, e.g. ``[("grpc.keepalive_time_ms", 30000)]``.

        Raises:
            ValueError: ``default_timeout`` is not positive, or ``token`` is not
                printable ASCII.
        """
        settings = _convert.settings(default_timeout, token)
        if credentials is None:
            channel = grpc.insecure_channel(target, options=_convert.channel_options(options))
        else:
            channel = grpc.secure_channel(
                target, credentials, options=_convert.channel_options(options)
            )
        self._setup(channel, owns_channel=True, settings=settings)

    @classmethod
    def from_channel(
        cls,
        channel: grpc.Channel,
        *,
        default_timeout: float = 5.0,
        token: str | None = None,
    ) -> Self:
        """Wrap an existing blocking ``grpc`` channel.

        The client does not own the channel: `close` leaves it open, and the
        caller closes it.

        Args:
            channel: An open ``grpc.Channel``.
            default_timeout: Deadline in seconds of calls made without ``timeout``.
            token: Bearer token sent as ``authorization: Bearer <token>`` metadata.

        Returns:
            A client using ``channel``.
        """
        settings = _convert.settings(default_timeout, token)
        self = cls.__new__(cls)
        self._setup(channel, owns_channel=False, settings=settings)
        return self

    def _setup(
        self,
        channel: grpc.Channel,
        *,
        owns_channel: bool,
        settings: _convert.Settings,
    ) -> None:
        self._default_timeout = settings.default_timeout
        self._metadata = settings.metadata
        self._channel = channel
        self._owns_channel = owns_channel
        self._stub = cachecoord_pb2_grpc.CacheCoordServiceStub(channel)

    @property
    def default_timeout(self) -> float:
        """Deadline in seconds of calls made without ``timeout``."""
        return self._default_timeout

    def close(self) -> None:
        """Close the channel, cancelling calls in flight; a no-op for a borrowed channel."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        """Return the client itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the client."""
        self.close()

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        timeout: float,
    ) -> _Resp:
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def get(
        self, namespace: str, key: str, *, min_version: int = 0, timeout: float | None = None
    ) -> Value:
        """Read one key (near cache, then Redis, then PostgreSQL).

        Args:
            namespace: Namespace as configured on the server, e.g. ``"users"``.
            key: Key within the namespace.
            min_version: Read-your-writes: the version a put or delete returned
                (from any client); a cached copy older than it is not served
                (the answer then says ``reloaded``). 0: any.
            timeout: Deadline in seconds; None uses ``default_timeout``.

        Returns:
            The value; ``found`` is False when the key does not exist.

        Raises:
            NamespaceNotFound: The namespace is not configured.
            CacheCoordError: Any other failure.
        """
        request = _convert.get_request(namespace, key, min_version)
        timeout = _convert.deadline(timeout, self._default_timeout)
        return _convert.to_value(self._call(self._stub.Get, request, timeout))

    def batch_get(
        self,
        namespace: str,
        keys: Iterable[str],
        *,
        min_versions: Mapping[str, int] | None = None,
        timeout: float | None = None,
    ) -> list[Entry]:
        """Read many keys of one namespace.

        Args:
            namespace: Namespace as configured on the server.
            keys: Keys to read (1 to 1000); not a single str.
            min_versions: Read-your-writes per key (see ``get``'s
                ``min_version``); every key named must be in ``keys``.
            timeout: Deadline in seconds; None uses ``default_timeout``.

        Returns:
            One entry per requested key, in request order.

        Raises:
            TypeError: ``keys`` is a str or bytes.
            NamespaceNotFound: The namespace is not configured.
            CacheCoordError: Any other failure.
        """
        request = _convert.batch_get_request(namespace, keys, min_versions)
        timeout = _convert.deadline(timeout, self._default_timeout)
        return _convert.to_entries(self._call(self._stub.BatchGet, request, timeout))

    def put(
        self,
        namespace: str,
        key: str,
        value: bytes,
        *,
        expected_version: int | None = None,
        ttl_ms: int | None = None,
        timeout: float | None = None,
    ) -> int:
        """Write one key according to the namespace's strategy.

        Args:
            namespace: Namespace as configured on the server.
            key: Key within the namespace.
            value: Opaque bytes, or a UTF-8 JSON object for mapped namespaces.
            expected_version: Write only if the key's current version equals
                this (0: only if the key does not exist); None writes unconditionally.
            ttl_ms: Cache time to live for this write; None or 0 uses the namespace's.
            timeout: Deadline in seconds; None uses ``default_timeout``.

        Returns:
            The version the write created.

        Raises:
            VersionConflict: ``expected_version`` did not match.
            NamespaceNotFound: The namespace is not configured.
            CacheCoordError: Any other failure.
        """
        request = _convert.put_request(namespace, key, value, expected_version, ttl_ms)
        timeout = _convert.deadline(timeout, self._default_timeout)
        return _convert.to_version(self._call(self._stub.Put, request, timeout))

    def delete(
        self,
        namespace: str,
        key: str,
        *,
        expected_version: int | None = None,
        timeout: float | None = None,
    ) -> Deleted:
        """Remove one key from PostgreSQL and from the cache.

        Args:
            namespace: Namespace as configured on the server.
            key: Key within the namespace.
            expected_version: Delete only if the key's current version equals
                this; None deletes unconditionally.
            timeout: Deadline in seconds; None uses ``default_timeout``.

        Returns:
            Whether a row was deleted, and the version recorded for the deletion.

        Raises:
            VersionConflict: ``expected_version`` did not match.
            NamespaceNotFound: The namespace is not configured.
            CacheCoordError: Any other failure.
        """
        request = _convert.delete_request(namespace, key, expected_version)
        timeout = _convert.deadline(timeout, self._default_timeout)
        return _convert.to_deleted(self._call(self._stub.Delete, request, timeout))

    def invalidate(
        self,
        namespace: str,
        keys: Iterable[str] = (),
        *,
        all: bool = False,
        timeout: float | None = None,
    ) -> int:
        """Drop cached copies on every instance, without touching PostgreSQL.

        Args:
            namespace: Namespace as configured on the server.
            keys: Keys to invalidate; must be empty when ``all`` is True.
            all: Invalidate every cached key of the namespace.
            timeout: Deadline in seconds; None uses ``default_timeout``.

        Returns:
            The number of cached entries dropped from Redis.

        Raises:
            TypeError: ``keys`` is a str or bytes.
            InvalidArgument: The request is malformed, e.g. ``keys`` given with ``all``.
            NamespaceNotFound: The namespace is not configured.
            CacheCoordError: Any other failure.
        """
        request = _convert.invalidate_request(namespace, keys, all)
        timeout = _convert.deadline(timeout, self._default_timeout)
        return _convert.to_invalidated(self._call(self._stub.Invalidate, request, timeout))

    def acquire_lock(
        self,
        name: str,
        *,
        ttl_ms: int,
        wait_timeout_ms: int = 0,
        timeout: float | None = None,
    ) -> Lock:
        """Take a distributed lock, waiting up to ``wait_timeout_ms`` while it is held.

        Args:
            name: Lock name.
            ttl_ms: Time to live of the lock (1 to 86400000 ms); it is released
                when this elapses without `extend_lock`.
            wait_timeout_ms: How long to wait for a held lock; 0 fails at once.
            timeout: Deadline in seconds; None uses ``wait_timeout_ms / 1000 +
                default_timeout``. A deadline shorter than the wait can end the
                call with DeadlineExceeded instead of LockNotAcquired.

        Returns:
            The lock, with its token and fencing token.

        Raises:
            LockNotAcquired: The lock is still held by someone else.
            CacheCoordError: Any other failure.
        """
        request = _convert.acquire_lock_request(name, ttl_ms, wait_timeout_ms)
        request.token = secrets.token_urlsafe(24)  # ours: releasable without the answer
        timeout = _convert.lock_deadline(timeout, self._default_timeout, wait_timeout_ms)
        try:
            return _convert.to_lock(name, self._call(self._stub.AcquireLock, request, timeout))
        except CacheCoordError as err:
            if err.code in UNKNOWN_OUTCOME:  # the lock may have been taken: let it go
                threading.Thread(
                    target=self._release_quietly,
                    args=(name, request.token),
                    name=f"release-lock[{name}]",
                    daemon=True,
                ).start()
            raise

    def _release_quietly(self, name: str, token: str) -> None:
        with contextlib.suppress(grpc.RpcError):
            self._stub.ReleaseLock(
                _convert.release_lock_request(name, token),
                timeout=self._default_timeout,
                metadata=self._metadata,
            )

    def release_lock(self, name: str, token: str, *, timeout: float | None = None) -> None:
        """Release a held lock.

        Args:
            name: Lock name.
            token: Token returned by `acquire_lock`.
            timeout: Deadline in seconds; None uses ``default_timeout``.

        Raises:
            CacheCoordError: The call failed, e.g. because ``token`` does not
                hold the lock (any more).
        """
        request = _convert.release_lock_request(name, token)
        timeout = _convert.deadline(timeout, self._default_timeout)
        self._call(self._stub.ReleaseLock, request, timeout)

    def extend_lock(
        self, name: str, token: str, *, ttl_ms: int, timeout: float | None = None
    ) -> None:
        """Reset a held lock's time to live.

        Args:
            name: Lock name.
            token: Token returned by `acquire_lock`.
            ttl_ms: New time to live in milliseconds, counted from now.
            timeout: Deadline in seconds; None uses ``default_timeout``.

        Raises:
            CacheCoordError: The call failed, e.g. because ``token`` does not
                hold the lock (any more).
        """
        request = _convert.extend_lock_request(name, token, ttl_ms)
        timeout = _convert.deadline(timeout, self._default_timeout)
        self._call(self._stub.ExtendLock, request, timeout)

    def watch(
        self,
        namespaces: Iterable[str],
        *,
        key_prefix: str = "",
        timeout: float | None = None,
        resume: bool = False,
    ) -> WatchStream:
        """Stream the invalidation events of some namespaces; see `AsyncClient.watch`.

        The call starts at once. Use the stream in a ``with`` block so that the
        call is cancelled however the block ends; `WatchStream.close` may also
        be called from another thread to stop a consumer blocked on it.

        Example:
            >>> with client.watch(["users"]) as events:  # doctest: +SKIP
            ...     for event in events:
            ...         if event.kind is WatchEventKind.RESET:
            ...             local.clear()

        Args:
            namespaces: Namespaces to watch (at least one); not a single str.
            key_prefix: Only events of keys starting with this; invalidations
                of a whole namespace (``all_keys``) always come.
            timeout: Deadline in seconds of the whole stream. None (the
                default): no deadline; ``default_timeout`` does not apply.
            resume: Watch again when the stream breaks, as
                `AsyncClient.watch` does: a RESET with reason
                ``reconnecting`` first, then the new stream's events.

        Returns:
            An iterator of `WatchEvent`, and a context manager that cancels
            the call on exit.

        Raises:
            TypeError: ``namespaces`` is a str or bytes.
        """
        request = _convert.watch_request(namespaces, key_prefix)
        if resume:
            return _ResumingWatchStream(
                lambda: self._stub.Watch(request, timeout=timeout, metadata=self._metadata)
            )
        return WatchStream(self._stub.Watch(request, timeout=timeout, metadata=self._metadata))

    @contextlib.contextmanager
    def hold_lock(
        self,
        name: str,
        *,
        ttl_ms: int,
        wait_timeout_ms: int = 0,
        timeout: float | None = None,
    ) -> Iterator[HeldLock]:
        """Hold a distributed lock for the duration of a ``with`` block.

        The lock is held by a HoldLock stream: the server renews it while the
        block runs and releases it when the block exits, or as soon as this
        process dies or its connection breaks, so a crashed holder does not
        keep others waiting for a whole TTL. When the server is about to close
        the stream's connection (``max_connection_age``, a drain, a restart)
        it hands the lock off instead, and a thread of the client takes it
        over on a new stream (``resume``), the token and fencing token
        unchanged; the block notices nothing.

        A thread cannot be interrupted: the yielded `HeldLock` tells the block
        the moment the lock is lost (``lost``, ``check()``, ``wait_lost()``),
        and leaving the block then raises `LockLost`.

        A block that ends normally releases the lock and waits for the
        server's confirmation; a block that raises cancels the stream, the
        server releases the lock at once, and the block's exception propagates.

        Example:
            >>> with client.hold_lock("report", ttl_ms=30_000) as lock:  # doctest: +SKIP
            ...     for part in parts:
            ...         lock.check()  # raises LockLost once the lock is lost
            ...         write_report(part, fencing_token=lock.fencing_token)

        Args:
            name: Lock name.
            ttl_ms: Time to live of the lock (100 to 86400000 ms). The server
                renews it every third of this, so it only matters when the
                server itself stops, or between a hand-off and its resume: the
                lock then expires after it.
            wait_timeout_ms: How long to wait for a held lock; 0 fails at once.
            timeout: Deadline in seconds to take the lock, and again to release
                it; None uses ``wait_timeout_ms / 1000 + default_timeout`` to
                take it and ``default_timeout`` to release it. Holding it has
                no deadline.

        Yields:
            The lock, with its token and fencing token.

        Raises:
            LockNotAcquired: The lock is still held by someone else.
            LockLost: On leaving the block: the lock was lost while the block
                ran (its renewal failed, the stream broke, or it could not be
                resumed), so the block's work may not have been exclusive.
            DeadlineExceeded: The lock was not taken, or its release not
                confirmed, within ``timeout``.
            CacheCoordError: Any other failure.
        """
        hold = _SyncHold(self._stub, self._metadata, name, ttl_ms)
        try:
            take = _convert.lock_deadline(timeout, self._default_timeout, wait_timeout_ms)
            lock = hold.take(wait_timeout_ms, take)
            yield lock
            hold.release(_convert.deadline(timeout, self._default_timeout))
        finally:
            hold.close()  # cancels the stream (no-op once it ended), frees grpc's request thread


UNKNOWN_OUTCOME = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
"""Failures of an AcquireLock after which the lock may have been taken anyway."""

WATCH_RESUME_FOR = 10.0
"""Seconds a resuming Watch tries to open a new stream before it raises Unavailable."""


class _ResumingWatchStream(WatchStream):
    """A Watch that opens a new stream when its stream breaks (``resume=True``)."""

    def __init__(self, open_call: Callable[[], Any]) -> None:
        super().__init__(open_call())
        self._open_call = open_call
        self._stopped = False
        self._broken_since: float | None = None
        self._retry_in = _RESUME_RETRY_FIRST

    def __next__(self) -> WatchEvent:
        while True:
            try:
                event = super().__next__()
            except Unavailable:
                if self._stopped:
                    raise
                now = time.monotonic()
                if self._broken_since is None:  # it just broke: tell the consumer at once
                    self._broken_since = now
                    self._reopen()
                    return WatchEvent(kind=WatchEventKind.RESET, reason="reconnecting")
                if now - self._broken_since > WATCH_RESUME_FOR:
                    raise
                time.sleep(self._retry_in)
                self._retry_in = min(self._retry_in * 2, 1.0)
                self._reopen()
                continue
            except StopIteration:
                if self._stopped or self._broken_since is not None:
                    raise
                self._broken_since = time.monotonic()  # the server ended it: as a break
                self._reopen()
                return WatchEvent(kind=WatchEventKind.RESET, reason="reconnecting")
            self._broken_since = None
            self._retry_in = _RESUME_RETRY_FIRST
            return event

    def _reopen(self) -> None:
        self._call.cancel()
        if self._stopped:
            return
        self._call = self._open_call()
        self._responses = iter(self._call)
        self._closed = False

    def close(self) -> None:
        """Cancel the call for good; iteration then stops. Thread-safe."""
        self._stopped = True
        super().close()


_RESUME_RETRY_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
_RESUME_RETRY_FIRST = 0.02
_RESUME_RETRY_MAX = 0.5


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


class _SyncHold:
    """One lock held through a chain of HoldLock streams (see the asyncio
    client's `_AsyncHold`): a thread follows the current stream, resumes the
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
        retry_in = _RESUME_RETRY_FIRST
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
                    if code not in _RESUME_RETRY_CODES:
                        self._fail(_convert.hold_error(self._name, err, True))
                        return False
                    why = str(from_rpc_error(err))
                    time.sleep(min(retry_in, max(0.0, valid_until - time.monotonic())))
                    retry_in = min(retry_in * 2, _RESUME_RETRY_MAX)
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
