"""The one place where domain errors become gRPC status codes.

Every RPC handler is wrapped: unary ones by :func:`rpc`, which also bounds
the call by the client's deadline (grpc.aio does not propagate it to our
awaits) or by the configured default; streaming ones by :func:`stream_rpc`,
which does not (a HoldLock stream lives as long as its client wants; grpc
itself cancels it at the client's deadline). Both answer every failure with a
status and a message that says what to fix; never UNKNOWN with a Python
traceback. Cancellation (the client went away) passes through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from cachecoord import errors
from cachecoord.coordination.hold import LockLost
from cachecoord.rpc.registration import Undecodable

log = logging.getLogger(__name__)

CODES: dict[type[errors.CacheCoordError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NamespaceNotFound: grpc.StatusCode.NOT_FOUND,
    errors.VersionConflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ConstraintViolation: grpc.StatusCode.FAILED_PRECONDITION,
    errors.LockNotAcquired: grpc.StatusCode.ABORTED,
    LockLost: grpc.StatusCode.ABORTED,
    errors.LockNotHeld: grpc.StatusCode.FAILED_PRECONDITION,
    errors.QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

Context = grpc.aio.ServicerContext[Any, Any]
Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, Context], Awaitable[Response]]
# A streaming handler in grpc.aio's reader/writer style: it reads requests
# from the iterator, writes responses with context.write() and returns None.
StreamHandler = Callable[[Any, AsyncIterator[Request], Context], Awaitable[None]]


def status_of(err: errors.CacheCoordError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        code = CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def rpc(default_timeout: Callable[[Any], float]) -> Callable[[Handler[Any, Any]], Any]:
    """Decorate a unary servicer method; *default_timeout(servicer)* gives seconds."""

    def decorate(method: Handler[Request, Response]) -> Handler[Request, Response]:
        @functools.wraps(method)
        async def handle(self: Any, request: Request, context: Context) -> Response:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            remaining = context.time_remaining()
            # No deadline from the client: grpc reports None (or a far-off time).
            timeout = default_timeout(self) if remaining is None or remaining > 86400 else remaining
            async with _statuses(context, method.__name__):
                try:
                    async with asyncio.timeout(timeout):
                        return await method(self, request, context)
                except TimeoutError:
                    raise errors.DeadlineExceeded(
                        f"the request did not finish within its deadline ({timeout:.3f} s)"
                    ) from None
            raise AssertionError("unreachable: abort raises")

        return handle

    return decorate


def server_stream_rpc(method: Handler[Request, None]) -> Handler[Request, None]:
    """Decorate a servicer method with one request and a response stream
    (written with context.write); it runs as long as the client listens."""

    @functools.wraps(method)
    async def handle(self: Any, request: Request, context: Context) -> None:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        async with _statuses(context, method.__name__):
            await method(self, request, context)

    return handle


def stream_rpc(method: StreamHandler[Request]) -> StreamHandler[Request]:
    """Decorate a streaming servicer method written in the reader/writer style."""

    @functools.wraps(method)
    async def handle(self: Any, requests: AsyncIterator[Any], context: Context) -> None:
        async with _statuses(context, method.__name__):
            await method(self, _Decoded(requests), context)

    return handle


class _Decoded(AsyncIterator[Request]):
    """A request stream that fails with InvalidArgument at its first unparsable message.

    A plain class rather than an async generator: a handler that stops
    reading early leaves no generator behind for the event loop to finalize.
    """

    def __init__(self, requests: AsyncIterator[Any]) -> None:
        self._requests = requests

    async def __anext__(self) -> Request:
        request = await anext(self._requests)
        if isinstance(request, Undecodable):
            raise errors.InvalidArgument(request.message)
        decoded: Request = request
        return decoded


@contextlib.asynccontextmanager
async def _statuses(context: Context, method: str) -> AsyncIterator[None]:
    """End the RPC with the status of whatever the handler raised."""
    try:
        yield
    except errors.CacheCoordError as err:
        await context.abort(status_of(err), str(err))
    except grpc.aio.AbortError:
        raise  # the handler chose its status itself
    except Exception:
        log.exception("unexpected error in %s", method)
        await context.abort(
            grpc.StatusCode.INTERNAL, "internal error; the server log has the details"
        )
