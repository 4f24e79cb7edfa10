"""The asyncio client, built on ``grpc.aio``."""

# ``timeout`` is the gRPC deadline sent to the server with each call (the API
# shared with the sync client), not a local cancel scope: ASYNC109 does not apply.
# ruff: noqa: ASYNC109

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import grpc
import grpc.aio

from cachecoord_client import _convert
from cachecoord_client._hold_async import AsyncHold
from cachecoord_client.errors import (
    CacheCoordError,
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
from cachecoord_client.watch import AsyncWatchStream

if True:  # ASYNC
    import asyncio
else:  # What the blocking client (generated: scripts/gen_sync_client.py) uses instead
    import threading
    from collections.abc import Iterator

    from cachecoord_client._hold_sync import SyncHold

if TYPE_CHECKING:
    from cachecoord_client.proto.cachecoord.v1.cachecoord_pb2_grpc import (
        CacheCoordServiceAsyncStub,
    )
    from cachecoord_client.watch import AsyncWatchCall

__all__ = ["AsyncClient"]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


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
        if True:  # ASYNC
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
        if True:  # ASYNC
            # Releases of locks granted to cancelled callers: close() waits for them.
            self._letting_go: set[asyncio.Task[None]] = set()

    @property
    def default_timeout(self) -> float:
        """Deadline in seconds of calls made without ``timeout``."""
        return self._default_timeout

    async def close(self) -> None:
        """Close the channel, cancelling calls in flight; a no-op for a borrowed channel.

        Releases of locks whose AcquireLock was cancelled (see `acquire_lock`)
        are waited for first, up to ``default_timeout``: cut by the close, they
        would leave those locks to their TTL."""
        if True:  # ASYNC
            if self._letting_go:
                await asyncio.wait(self._letting_go, timeout=self._default_timeout)
        if self._owns_channel:
            if True:  # ASYNC
                await self._channel.close(None)
            else:
                self._channel.close()

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

    async def get(
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
        return _convert.to_value(await self._call(self._stub.Get, request, timeout))

    async def batch_get(
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
        return _convert.to_entries(await self._call(self._stub.BatchGet, request, timeout))

    async def put(
        self,
        namespace: str,
        key: str,
        value: bytes,
        *,
        expected_version: int | None = None,
        ttl_ms: int | None = None,
        tags: Iterable[str] = (),
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
            tags: Tags of the value (0 to 16, each 1 to 128 bytes of UTF-8), for
                :meth:`invalidate_tags`; not for mapped namespaces (their
                configuration derives tags from columns).
            timeout: Deadline in seconds; None uses ``default_timeout``.

        Returns:
            The version the write created.

        Raises:
            VersionConflict: ``expected_version`` did not match.
            NamespaceNotFound: The namespace is not configured.
            CacheCoordError: Any other failure.
        """
        request = _convert.put_request(namespace, key, value, expected_version, ttl_ms, tags)
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

    async def invalidate_tags(
        self, namespace: str, tags: Iterable[str], *, timeout: float | None = None
    ) -> None:
        """Hide every cached value of the namespace carrying one of *tags*, on
        every instance, without touching PostgreSQL (the next read reloads).

        Args:
            namespace: Namespace as configured on the server.
            tags: Tags to invalidate (1 to 100, each 1 to 128 bytes of UTF-8).
            timeout: Deadline in seconds; None uses ``default_timeout``.

        Raises:
            TypeError: ``tags`` is a str or bytes.
            InvalidArgument: No tags, too many, or one too long.
            NamespaceNotFound: The namespace is not configured.
            CacheCoordError: Any other failure.
        """
        request = _convert.invalidate_tags_request(namespace, tags)
        timeout = _convert.deadline(timeout, self._default_timeout)
        await self._call(self._stub.InvalidateTags, request, timeout)

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
        request.token = secrets.token_urlsafe(24)  # ours: releasable without the answer
        timeout = _convert.lock_deadline(timeout, self._default_timeout, wait_timeout_ms)
        if True:  # ASYNC
            call = self._stub.AcquireLock(request, timeout=timeout, metadata=self._metadata)
            answer = asyncio.ensure_future(_answer_of(call))
            try:
                return _convert.to_lock(name, await asyncio.shield(answer))
            except asyncio.CancelledError:
                self._let_go_later(call, answer, name, request.token)
                raise
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                if error.code in UNKNOWN_OUTCOME:  # the lock may have been taken: let it go
                    self._let_go_later(call, answer, name, request.token)
                raise error from err
        else:
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

    if True:  # ASYNC

        def _let_go_later(
            self,
            call: grpc.aio.UnaryUnaryCall[Any, pb.AcquireLockResponse],
            answer: asyncio.Future[pb.AcquireLockResponse],
            name: str,
            token: str,
        ) -> None:
            task = asyncio.create_task(self._let_go(call, answer, name, token))
            self._letting_go.add(task)  # referenced until done (the loop's are weak)
            task.add_done_callback(self._letting_go.discard)

        async def _let_go(
            self,
            call: grpc.aio.UnaryUnaryCall[Any, pb.AcquireLockResponse],
            answer: asyncio.Future[pb.AcquireLockResponse],
            name: str,
            token: str,
        ) -> None:
            """Release what an AcquireLock whose caller gave up may have taken.

            A cancelled call may still answer for a moment (cancelling it at once
            could cross its answer); then it is cancelled, and the lock released
            by its token whatever the answer was (the server releases what it
            takes after it sees the cancellation, too)."""
            with contextlib.suppress(TimeoutError, grpc.RpcError, asyncio.CancelledError):
                async with asyncio.timeout(_ABANDONED_ACQUIRE_GRACE):
                    token = (await asyncio.shield(answer)).token or token
            call.cancel()
            release = _convert.release_lock_request(name, token)
            with contextlib.suppress(grpc.RpcError):
                await self._stub.ReleaseLock(
                    release, timeout=self._default_timeout, metadata=self._metadata
                )

    else:

        def _release_quietly(self, name: str, token: str) -> None:
            with contextlib.suppress(grpc.RpcError):
                self._stub.ReleaseLock(
                    _convert.release_lock_request(name, token),
                    timeout=self._default_timeout,
                    metadata=self._metadata,
                )

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
        self,
        namespaces: Iterable[str],
        *,
        key_prefix: str = "",
        timeout: float | None = None,
        resume: bool = False,
        replay: bool = False,
        resume_token: str = "",
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
            resume: Watch again when the stream breaks (UNAVAILABLE: the
                server closed its connection after ``max_connection_age``,
                drained, or restarted) instead of raising: a RESET with reason
                ``reconnecting`` comes at once (drop everything: events may be
                missed until the new stream is up), then the new stream's own
                RESET. Unavailable is raised only when no new stream could be
                opened for `WATCH_RESUME_FOR` seconds.
            replay: With ``resume``, open the new stream from the last
                event's resume token instead: an INTERRUPTED event comes at
                once (stop serving what you cached, but keep it), then the
                events missed meanwhile, replayed from the server's
                invalidation log, then RESUMED; or a RESET (``too_old``) when
                the log no longer reaches back that far.
            resume_token: Start from this position (a `WatchEvent`'s
                ``resume_token``, of a stream of the same namespaces): the
                events after it come first, then RESUMED; or a RESET
                (``too_old``). Empty: start now, with RESET (``subscribed``).

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
        request = _convert.watch_request(namespaces, key_prefix, resume_token)

        def open_call(token: str) -> AsyncWatchCall:
            request.resume_token = token
            return self._stub.Watch(request, timeout=timeout, metadata=self._metadata)

        if resume:
            return _ResumingWatchStream(open_call, replay=replay, token=resume_token)
        return AsyncWatchStream(open_call(resume_token))

    if True:  # ASYNC

        @contextlib.asynccontextmanager
        async def hold_lock(
            self,
            name: str,
            *,
            ttl_ms: int,
            wait_timeout_ms: int = 0,
            timeout: float | None = None,
        ) -> AsyncIterator[HeldLock]:
            """Hold a distributed lock for the duration of an ``async with`` block.

            The lock is held by a HoldLock stream: the server renews it while the
            block runs and releases it when the block exits, or as soon as this
            process dies or its connection breaks, so a crashed holder does not
            keep others waiting for a whole TTL. When the server is about to close
            the stream's connection (``max_connection_age``, a drain, a restart)
            it hands the lock off instead, and the client takes it over on a new
            stream (``resume``), the token and fencing token unchanged; the block
            notices nothing.

            If the lock is lost while the block runs (the server found another
            holder or no lock, could not renew it within its TTL, the stream
            broke, or a handed-off lock could not be resumed before it expired),
            the block's task is cancelled at once and ``hold_lock`` raises
            `LockLost` in its place; the yielded `HeldLock` says so too (``lost``,
            ``check()``).

            A block that ends normally releases the lock and waits for the
            server's confirmation; a block that raises (or is cancelled) cancels
            the stream, the server releases the lock at once, and the block's
            exception propagates.

            Example:
                >>> async with client.hold_lock("report", ttl_ms=30_000) as lock:  # doctest: +SKIP
                ...     await write_report(fencing_token=lock.fencing_token)

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
                LockLost: The lock was lost while the block ran (raised in place
                    of the block's cancellation, or on leaving it), so the block's
                    work may not have been exclusive.
                DeadlineExceeded: The lock was not taken, or its release not
                    confirmed, within ``timeout``.
                CacheCoordError: Any other failure.
            """
            hold = AsyncHold(self._stub, self._metadata, name, ttl_ms)
            try:
                take = _convert.lock_deadline(timeout, self._default_timeout, wait_timeout_ms)
                lock = await hold.take(wait_timeout_ms, take)
                try:
                    yield lock
                except asyncio.CancelledError:
                    lost = hold.took_back_cancellation()
                    if lost is not None:
                        raise lost from None
                    raise
                await hold.release(_convert.deadline(timeout, self._default_timeout))
            finally:
                # grpc.aio never cancels a call that is merely dropped (grpc
                # #43462: it is never garbage-collected), so the stream, and the
                # lock, would live until the channel closes. No-op once it ended.
                hold.close()

    else:

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
            hold = SyncHold(self._stub, self._metadata, name, ttl_ms)
            try:
                take = _convert.lock_deadline(timeout, self._default_timeout, wait_timeout_ms)
                lock = hold.take(wait_timeout_ms, take)
                yield lock
                hold.release(_convert.deadline(timeout, self._default_timeout))
            finally:
                # Cancels the stream (a no-op once it ended), frees grpc's request thread.
                hold.close()


WATCH_RESUME_FOR = 10.0
"""Seconds a resuming Watch tries to open a new stream before it raises Unavailable."""


class _ResumingWatchStream(AsyncWatchStream):
    """A Watch that opens a new stream when its stream breaks (``resume=True``);
    with *replay*, from the last resume token it received."""

    def __init__(
        self, open_call: Callable[[str], AsyncWatchCall], *, replay: bool, token: str
    ) -> None:
        super().__init__(open_call(token))
        self._open_call = open_call
        self._replay = replay
        self._token = token
        self._stopped = False
        self._broken_since: float | None = None
        self._retry_in = _convert.RESUME_RETRY_FIRST

    async def __anext__(self) -> WatchEvent:
        while True:
            try:
                event = await super().__anext__()
            except Unavailable:
                if self._stopped:
                    raise
                now = time.monotonic()
                if self._broken_since is None:  # it just broke: tell the consumer at once
                    self._broken_since = now
                    return self._interrupted()
                if now - self._broken_since > WATCH_RESUME_FOR:
                    raise
                await asyncio.sleep(self._retry_in)
                self._retry_in = min(self._retry_in * 2, 1.0)
                self._reopen()
                continue
            except StopAsyncIteration:
                if self._stopped or self._broken_since is not None:
                    raise
                # The server ended the stream (it is shutting down): as a break.
                self._broken_since = time.monotonic()
                return self._interrupted()
            self._broken_since = None
            self._retry_in = _convert.RESUME_RETRY_FIRST
            self._token = event.resume_token or self._token
            return event

    def _interrupted(self) -> WatchEvent:
        """Open a new stream, and say what the consumer must do meanwhile."""
        if self._replay and self._token:
            event = WatchEvent(kind=WatchEventKind.INTERRUPTED, resume_token=self._token)
        else:
            self._token = ""  # the consumer drops everything: start afresh
            event = WatchEvent(kind=WatchEventKind.RESET, reason="reconnecting")
        self._reopen()
        return event

    def _reopen(self) -> None:
        self._call.cancel()
        if self._stopped:
            return
        if True:  # ASYNC
            self._call = self._open_call(self._token)
        else:
            self._call = self._open_call(self._token)
            self._responses = iter(self._call)
        self._closed = False

    if True:  # ASYNC

        def cancel(self) -> None:
            """Cancel the call for good; iteration then stops."""
            self._stopped = True
            super().cancel()

    else:

        def close(self) -> None:
            """Cancel the call for good; iteration then stops. Thread-safe."""
            self._stopped = True
            super().close()


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

if True:  # ASYNC
    _ABANDONED_ACQUIRE_GRACE = 0.25
    """Seconds an AcquireLock whose caller was cancelled may still answer before it is cancelled."""

    async def _answer_of(
        call: grpc.aio.UnaryUnaryCall[Any, pb.AcquireLockResponse],
    ) -> pb.AcquireLockResponse:
        return await call
