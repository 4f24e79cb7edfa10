"""Watch streams: the iterators returned by ``AsyncClient.watch`` and ``Client.watch``.

A Watch call lives until its consumer stops, so both iterators own their call
and cancel it when they are closed: explicitly (``aclose``/``close``, or the
end of a ``with`` block), when the consuming task is cancelled, or, as a last
resort, when they are garbage-collected. grpc.aio itself never cancels a call
that is merely dropped (grpc #43462: such a call is never collected), so
without this a consumer that breaks out of its loop would leave the stream,
and a watcher on the server, open until the channel closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

import grpc
import grpc.aio

from cachecoord_client import _convert
from cachecoord_client.errors import from_rpc_error
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb
from cachecoord_client.types import WatchEvent

if TYPE_CHECKING:
    AsyncWatchCall = grpc.aio.UnaryStreamCall[pb.WatchRequest, pb.WatchResponse]

__all__ = ["AsyncWatchStream", "WatchStream"]


class AsyncWatchStream(AsyncIterator[WatchEvent]):
    """The events of one Watch call, as an async iterator.

    Prefer ``async with``: leaving the block cancels the call whatever
    happened in it. A plain ``async for`` also works; the call is then
    cancelled when the consuming task is cancelled, when the stream fails,
    or when the stream object is dropped.

    Cancelling a wait for the next event cancels the call, as grpc.aio
    does; so does a timeout around it, after which the stream stops. That
    is how to find a dead stream: a live one gets a heartbeat at least every
    ``watch_heartbeat`` (10 s by default), so bound each wait by a few of
    those and watch again when it expires (`LocalCache` does).

    Iteration raises a `cachecoord_client.errors.CacheCoordError` when the
    call fails (NamespaceNotFound for an unknown namespace, Unavailable when
    the server goes away, DeadlineExceeded after an explicit ``timeout``),
    and stops once the stream was closed.
    """

    def __init__(self, call: AsyncWatchCall) -> None:
        """Wrap a started Watch call (see ``AsyncClient.watch``)."""
        self._call = call
        self._closed = False

    async def __anext__(self) -> WatchEvent:
        """Return the next event; events of kinds unknown to this client are skipped."""
        while not self._closed:
            try:
                response = await self._call.read()
            except asyncio.CancelledError:
                closed_here, self._closed = self._closed, True
                self._call.cancel()  # grpc.aio does too; this does not rely on it
                if closed_here and not _task_cancelling():
                    break  # aclose() from another task: grpc.aio raised CancelledError
                raise
            except grpc.RpcError as err:
                self._closed = True
                raise from_rpc_error(err) from err
            if not isinstance(response, pb.WatchResponse):  # EOF: the server ended it
                self._closed = True
                break
            event = _convert.to_watch_event(response)
            if event is not None:
                return event
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Cancel the call; iteration then stops. Safe to call twice."""
        self.cancel()

    def cancel(self) -> None:
        """Cancel the call without awaiting (usable from a callback or ``__del__``)."""
        self._closed = True
        self._call.cancel()  # a no-op once the call ended

    async def __aenter__(self) -> Self:
        """Return the stream itself."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Cancel the call."""
        self.cancel()

    def __del__(self) -> None:
        # The last resort for `async for ... break` without `async with`: the
        # call is cancelled when its consumer drops the stream. Suppressed: at
        # interpreter exit the loop may already be closed.
        call = getattr(self, "_call", None)
        if call is not None:
            with contextlib.suppress(Exception):
                call.cancel()


class WatchStream(Iterator[WatchEvent]):
    """The events of one Watch call, as a blocking iterator.

    Prefer ``with``: leaving the block cancels the call. `close` may be
    called from any thread; a ``next`` blocked in another thread then stops
    the iteration. Iteration raises a
    `cachecoord_client.errors.CacheCoordError` when the call fails.
    """

    def __init__(self, call: WatchCall) -> None:
        """Wrap a started Watch call (see ``Client.watch``)."""
        self._call = call
        self._responses = iter(call)
        self._closed = False

    def __next__(self) -> WatchEvent:
        """Return the next event; events of kinds unknown to this client are skipped."""
        while not self._closed:
            try:
                response = next(self._responses)
            except grpc.RpcError as err:
                if self._closed:  # our own cancellation, seen as CANCELLED
                    break
                self._closed = True
                raise from_rpc_error(err) from err
            except StopIteration:
                self._closed = True
                break
            event = _convert.to_watch_event(response)
            if event is not None:
                return event
        raise StopIteration

    def close(self) -> None:
        """Cancel the call; iteration then stops. Thread-safe, and safe to call twice."""
        self._closed = True
        self._call.cancel()

    def __enter__(self) -> Self:
        """Return the stream itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Cancel the call."""
        self.close()

    def __del__(self) -> None:
        call = getattr(self, "_call", None)
        if call is not None:
            with contextlib.suppress(Exception):
                call.cancel()


class WatchCall(Protocol):
    """A running blocking Watch call (grpc-stubs leaves ``cancel`` untyped)."""

    def __iter__(self) -> Iterator[pb.WatchResponse]: ...

    def cancel(self) -> bool: ...


def _task_cancelling() -> bool:
    """Whether the current task is being cancelled (by its owner, not by us)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
