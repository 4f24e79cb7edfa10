"""The one place where domain errors become gRPC status codes.

Every RPC handler is wrapped by :func:`rpc`: it bounds the call by the
client's deadline (grpc.aio does not propagate it to our awaits) or by the
configured default, and answers every failure with a status and a message
that says what to fix; never UNKNOWN with a Python traceback.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from cachecoord import errors

log = logging.getLogger(__name__)

CODES: dict[type[errors.CacheCoordError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NamespaceNotFound: grpc.StatusCode.NOT_FOUND,
    errors.VersionConflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ConstraintViolation: grpc.StatusCode.FAILED_PRECONDITION,
    errors.LockNotAcquired: grpc.StatusCode.ABORTED,
    errors.LockNotHeld: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]]


def status_of(err: errors.CacheCoordError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        code = CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def rpc(default_timeout: Callable[[Any], float]) -> Callable[[Handler[Any, Any]], Any]:
    """Decorate a servicer method; *default_timeout(servicer)* gives seconds."""

    def decorate(method: Handler[Request, Response]) -> Handler[Request, Response]:
        @functools.wraps(method)
        async def handle(
            self: Any, request: Request, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Response:
            remaining = context.time_remaining()
            # No deadline from the client: grpc reports None (or a far-off time).
            timeout = default_timeout(self) if remaining is None or remaining > 86400 else remaining
            try:
                async with asyncio.timeout(timeout):
                    return await method(self, request, context)
            except errors.CacheCoordError as err:
                await context.abort(status_of(err), str(err))
            except TimeoutError:
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the request did not finish within its deadline ({timeout:.3f} s)",
                )
            except Exception:
                log.exception("unexpected error in %s", method.__name__)
                await context.abort(
                    grpc.StatusCode.INTERNAL, "internal error; the server log has the details"
                )
            raise AssertionError("unreachable: abort raises")

        return handle

    return decorate
