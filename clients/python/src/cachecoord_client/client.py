"""The asyncio client, built on ``grpc.aio``."""

# ``timeout`` is the gRPC deadline sent to the server with each call (the API
# shared with the sync client), not a local cancel scope: ASYNC109 does not apply.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import grpc
import grpc.aio

from cachecoord_client import _convert
from cachecoord_client.errors import CacheCoordError, DeadlineExceeded, from_rpc_error
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2_grpc
from cachecoord_client.types import Deleted, Entry, Lock, Value
from cachecoord_client.watch import AsyncWatchStream

if TYPE_CHECKING:
    from cachecoord_client.proto.cachecoord.v1.cachecoord_pb2_grpc import (
        CacheCoordServiceAsyncStub,
    )

__all__ = ["AsyncClient"]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_HoldCall = grpc.aio.StreamStreamCall[pb.HoldLockRequest, pb.HoldLockResponse]


class AsyncClient:
    """Asyncio client of a cachecoord server.

    ``grpc.aio`` binds a channel to the event loop running when it is created,
    so the client must be constructed inside that loop (in a coroutine, e.g.
    under ``asyncio.run``) and used only there; the constructor raises
    RuntimeError when no loop is running. It opens its channel in the
    constructor; the connection itself is made on the first call.

    Every method takes a keyword ``timeout`` in seconds; None means the
    client's ``default_timeout``. Every failed call raises a
    `cachecoord_client.errors.CacheCoordError` subclass chained to the
    `grpc.RpcError`.

    Example:
        >>> async with AsyncClient("127.0.0.1:50051") as client:  # doctest: +SKIP
        ...     value = await client.get("users", "1")
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
        """Open a channel to ``target``; must be called inside the running event loop.

        Args:
            target: Server address, e.g. ``"127.0.0.1:50051"`` or ``"dns:///cachecoord:50051"``.
            default_timeout: Deadline in seconds of calls made without ``timeout``.
            credentials: TLS credentials; None opens a plaintext channel.
            token: Bearer token sent as ``authorization: Bearer <token>`` metadata.
            options: gRPC channel options, e.g. ``[("grpc.keepalive_time_ms", 30000)]``.

        Raises:
            ValueError: ``default_timeout`` is not positive, or ``token`` is not
                printable ASCII.
            RuntimeError: No event loop is running in this thread.
        """
        settings = _convert.settings(default_timeout, token)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "AsyncClient must be created inside the running event loop that uses it "
                "(grpc.aio binds its channel to that loop); create it in a coroutine, "
                "or use the blocking cachecoord_client.Client"
            ) from None
        channel_options = _convert.channel_options(options)
        if credentials is None:
            channel = grpc.aio.insecure_channel(target, options=channel_options)
        else:
            channel = grpc.aio.secure_channel(target, credentials, options=channel_options)
        self._setup(channel, owns_channel=True, settings=settings)

    @classmethod
    def from_channel(
        cls,
        channel: grpc.aio.Channel,
        *,
        default_timeout: float = 5.0,
        token: str | None = None,
    ) -> Self:
        """Wrap an existing ``grpc.aio`` channel.

        The client does not own the channel: `close` leaves it open, and the
        caller closes it.

        Args:
            channel: An open ``grpc.aio.Channel``.
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
        channel: grpc.aio.Channel,
        *,
        owns_channel: bool,
        settings: _convert.Settings,
    ) -> None:
        self._default_timeout = settings.default_timeout
        self._metadata = settings.metadata
        self._channel = channel
        self._owns_channel = owns_channel
        self._stub: CacheCoordServiceAsyncStub = cachecoord_pb2_grpc.CacheCoordServiceStub(channel)

    @property
    def default_timeout(self) -> float:
        """Deadline in seconds of calls made without ``timeout``."""
        return self._default_timeout

    async def close(self) -> None:
        """Close the channel, cancelling calls in flight; a no-op for a borrowed channel."""
        if self._owns_channel:
            await self._channel.close(None)

    async def __aenter__(self) -> Self:
        """Return the client itself."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the client."""
        await self.close()

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        timeout: float,
    ) -> _Resp:
        try:
            return await method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    async def get(self, namespace: str, key: str, *, timeout: float | None = None) -> Value:
        """Read one key (near cache, then Redis, then PostgreSQL).

        Args:
            namespace: Namespace as configured on the server, e.g. ``"users"``.
            key: Key within the namespace.
            timeout: Deadline in seconds; None uses ``default_timeout``.

        Returns:
            The value; ``found`` is False when the key does not exist.

        Raises:
            NamespaceNotFound: The namespace is not configured.
            CacheCoordError: Any other failure.
        """
        request = _convert.get_request(namespace, key)
        timeout = _convert.deadline(timeout, self._default_timeout)
        return _convert.to_value(await self._call(self._stub.Get, request, timeout))

    async def batch_get(
        self, namespace: str, keys: Iterable[str], *, timeout: float | None = None
    ) -> list[Entry]:
        """Read many keys of one namespace.

        Args:
            namespace: Namespace as configured on the server.
            keys: Keys to read (1 to 1000); not a single str.
            timeout: Deadline in seconds; None uses ``default_timeout``.

        Returns:
            One entry per requested key, in request order.

        Raises:
            TypeError: ``keys`` is a str or bytes.
            NamespaceNotFound: The namespace is not configured.
            CacheCoordError: Any other failure.
        """
        request = _convert.batch_get_request(namespace, keys)
        timeout = _convert.deadline(timeout, self._default_timeout)
        return _convert.to_entries(await self._call(self._stub.BatchGet, request, timeout))

    async def put(
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
        return _convert.to_version(await self._call(self._stub.Put, request, timeout))

    async def delete(
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
        return _convert.to_deleted(await self._call(self._stub.Delete, request, timeout))

    async def invalidate(
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
        return _convert.to_invalidated(await self._call(self._stub.Invalidate, request, timeout))

    async def acquire_lock(
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
        timeout = _convert.lock_deadline(timeout, self._default_timeout, wait_timeout_ms)
        return _convert.to_lock(name, await self._call(self._stub.AcquireLock, request, timeout))

    async def release_lock(self, name: str, token: str, *, timeout: float | None = None) -> None:
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
        await self._call(self._stub.ReleaseLock, request, timeout)

    async def extend_lock(
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
        await self._call(self._stub.ExtendLock, request, timeout)

    def watch(
        self, namespaces: Iterable[str], *, key_prefix: str = "", timeout: float | None = None
    ) -> AsyncWatchStream:
        """Stream the invalidation events of some namespaces, to keep a local cache coherent.

        The first event is always a RESET (reason ``subscribed``): events start
        now. Then come INVALIDATION events; a later RESET means events may have
        been missed (the server lost its subscription, or this client read too
        slowly), so everything cached from these namespaces must be dropped.
        A HEARTBEAT comes whenever nothing else happened for a while (10 s by
        default), so a silent stream can be told from a dead one.
        `cachecoord_client.LocalCache` does all this for you.

        The call starts at once. Use the stream in ``async with`` so that the
        call is cancelled however the block ends:

        Example:
            >>> async with client.watch(["users"]) as events:  # doctest: +SKIP
            ...     async for event in events:
            ...         if event.kind is WatchEventKind.RESET or event.all_keys:
            ...             local.clear()  # one namespace watched: all_keys is all of it
            ...         elif event.kind is WatchEventKind.INVALIDATION:
            ...             local.pop(event.key, None)

        Args:
            namespaces: Namespaces to watch (at least one); not a single str.
            key_prefix: Only events of keys starting with this; invalidations
                of a whole namespace (``all_keys``) always come.
            timeout: Deadline in seconds of the whole stream. None (the
                default, unlike other methods): no deadline, since a Watch is
                meant to stay open; ``default_timeout`` does not apply.

        Returns:
            An async iterator of `WatchEvent`, and an async context manager
            that cancels the call on exit.

        Raises:
            TypeError: ``namespaces`` is a str or bytes.

        While iterating, the stream raises NamespaceNotFound (a namespace is
        not configured), InvalidArgument (no namespace, or a too long prefix),
        or another CacheCoordError when the call fails (Unavailable when the
        server goes away).
        """
        request = _convert.watch_request(namespaces, key_prefix)
        return AsyncWatchStream(self._stub.Watch(request, timeout=timeout, metadata=self._metadata))

    @contextlib.asynccontextmanager
    async def hold_lock(
        self,
        name: str,
        *,
        ttl_ms: int,
        wait_timeout_ms: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[Lock]:
        """Hold a distributed lock for the duration of an ``async with`` block.

        The lock is held by a HoldLock stream: the server renews it while the
        block runs and releases it when the block exits, or as soon as this
        process dies or its connection breaks, so a crashed holder does not
        keep others waiting for a whole TTL.

        A block that ends normally releases the lock and waits for the
        server's confirmation; a block that raises (or is cancelled) cancels
        the stream, the server releases the lock at once, and the block's
        exception propagates.

        Example:
            >>> async with client.hold_lock("report", ttl_ms=30_000) as lock:  # doctest: +SKIP
            ...     await write_report(fencing_token=lock.fencing_token)

        Args:
            name: Lock name.
            ttl_ms: Time to live of the lock (1 to 86400000 ms). The server
                renews it every third of this, so it only matters when the
                server itself stops: the lock then expires after it.
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
                ran (its renewal failed), so the block's work may not have
                been exclusive.
            DeadlineExceeded: The lock was not taken, or its release not
                confirmed, within ``timeout``.
            CacheCoordError: Any other failure.
        """
        # No request iterator: this side writes its requests with call.write().
        call: _HoldCall = self._stub.HoldLock(None, metadata=self._metadata)
        try:
            take = _convert.lock_deadline(timeout, self._default_timeout, wait_timeout_ms)
            request = _convert.hold_lock_acquire(name, ttl_ms, wait_timeout_ms)
            yield await _take_held(call, name, request, take)
            await _release_held(call, name, _convert.deadline(timeout, self._default_timeout))
        finally:
            # grpc.aio never cancels a call that is merely dropped (grpc
            # #43462: it is never garbage-collected), so the stream, and the
            # lock, would live until the channel closes. No-op once it ended.
            call.cancel()


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


async def _release_held(call: _HoldCall, name: str, seconds: float) -> None:
    """Half-close the stream, which releases the lock, and wait for its end.

    The stream ends OK only if the lock was held until released; a ``lost``
    event or ABORTED means it was lost while held.
    """
    lost = False
    try:
        async with asyncio.timeout(seconds):
            # Half-closing releases the lock, as a `release` message does. A
            # write would race with the server ending the stream (a lost lock),
            # and grpc.aio answers a write to an ended stream by replacing the
            # server's status with a local INTERNAL: the ABORTED would be lost.
            await call.done_writing()
            while isinstance(response := await call.read(), pb.HoldLockResponse):
                lost = lost or _convert.is_lost(response)
    except TimeoutError:
        raise DeadlineExceeded(
            f"the release of lock {name!r} was not confirmed within {seconds:.3f} s"
        ) from None
    except grpc.RpcError as err:
        raise _convert.hold_error(name, err, lost) from err
