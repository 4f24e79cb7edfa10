"""The one place where domain errors become gRPC status codes.

Every RPC handler is wrapped: unary ones by :func:`rpc`, which also bounds
the call by the client's deadline (grpc.aio does not propagate it to our
awaits) or by the configured default; streaming ones by :func:`stream_rpc`,
which does not (a HoldLock stream lives as long as its client wants; grpc
itself cancels it at the client's deadline). Both answer every failure with a
status and a message that says what to fix; never UNKNOWN with a Python
traceback. Cancellation (the client went away) passes through untouched.

With ``[auth]`` enabled, every wrapper first admits the call through the
servicer's ``authorizer`` (rpc/auth.py: bearer token, then the RPC's
permission rule), inside the same status mapping; with auth off that costs
one attribute check.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

import grpc
from opentelemetry import trace

from cachecoord import errors, instruments, telemetry
from cachecoord.coordination.hold import LockLost
from cachecoord.rpc import auth
from cachecoord.rpc.registration import Undecodable

log = logging.getLogger(__name__)

SERVICE = "cachecoord.v1.CacheCoordService"

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
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
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
        name = method.__name__
        rule = auth.rule_of(name)
        server_span = _SpanNaming.of(name)

        async def bounded(self: Any, request: Request, context: Context) -> Response:
            _admit(self, rule, request, context)
            remaining = context.time_remaining()
            if remaining is not None and remaining < 86400:
                # grpc.aio cancels this task at the client's deadline (and the
                # client reports DEADLINE_EXCEEDED): no timer of ours needed.
                return await method(self, request, context)
            # No deadline from the client (grpc reports None or a far-off
            # time): bound the call by the configured default.
            timeout = default_timeout(self)
            try:
                async with asyncio.timeout(timeout):
                    return await method(self, request, context)
            except TimeoutError:
                raise errors.DeadlineExceeded(
                    f"the request did not finish within its deadline ({timeout:.3f} s)"
                ) from None

        @functools.wraps(method)
        async def handle(self: Any, request: Request, context: Context) -> Response:
            if telemetry.TRACING:
                with server_span.start(context):
                    return await _answer(context, name, bounded(self, request, context))
            return await _answer(context, name, bounded(self, request, context))

        return handle

    return decorate


def server_stream_rpc(method: Handler[Request, None]) -> Handler[Request, None]:
    """Decorate a servicer method with one request and a response stream
    (written with context.write); it runs as long as the client listens."""
    name = method.__name__
    rule = auth.rule_of(name)
    server_span = _SpanNaming.of(name)

    async def admitted(self: Any, request: Request, context: Context) -> None:
        _admit(self, rule, request, context)
        await method(self, request, context)

    @functools.wraps(method)
    async def handle(self: Any, request: Request, context: Context) -> None:
        if telemetry.TRACING:
            with server_span.start(context):
                await _answer(context, name, admitted(self, request, context))
        else:
            await _answer(context, name, admitted(self, request, context))

    return handle


def stream_rpc(method: StreamHandler[Request]) -> StreamHandler[Request]:
    """Decorate a streaming servicer method written in the reader/writer style."""
    name = method.__name__
    rule = auth.rule_of(name)
    server_span = _SpanNaming.of(name)

    async def admitted(self: Any, requests: AsyncIterator[Any], context: Context) -> None:
        # Authenticated once, before the first read; each message is then
        # checked against the rule as the handler reads it.
        authorizer: auth.Authorizer | None = self.authorizer
        check = None
        if authorizer is not None:
            check = functools.partial(rule, authorizer.authenticate(context))
        await method(self, _Decoded(requests, check), context)

    @functools.wraps(method)
    async def handle(self: Any, requests: AsyncIterator[Any], context: Context) -> None:
        if telemetry.TRACING:
            with server_span.start(context):
                await _answer(context, name, admitted(self, requests, context))
        else:
            await _answer(context, name, admitted(self, requests, context))

    return handle


def _admit(servicer: Any, rule: auth.Rule, request: Any, context: Context) -> None:
    """Authenticate and authorize the call (when auth is on), then refuse an
    unparsable request: a caller without a valid token learns nothing else."""
    authorizer: auth.Authorizer | None = servicer.authorizer
    if authorizer is not None:
        authorizer.admit(context, rule, request)
    if isinstance(request, Undecodable):
        raise errors.InvalidArgument(request.message)


class _Decoded(AsyncIterator[Request]):
    """A request stream that fails with InvalidArgument at its first unparsable
    message, and with PermissionDenied at the first one that *check* refuses.

    A plain class rather than an async generator: a handler that stops
    reading early leaves no generator behind for the event loop to finalize.
    """

    def __init__(
        self, requests: AsyncIterator[Any], check: Callable[[Any], None] | None = None
    ) -> None:
        self._requests = requests
        self._check = check

    async def __anext__(self) -> Request:
        request = await anext(self._requests)
        if isinstance(request, Undecodable):
            raise errors.InvalidArgument(request.message)
        if self._check is not None:
            self._check(request)
        decoded: Request = request
        return decoded


async def _answer(context: Context, method: str, call: Awaitable[Response]) -> Response:
    """Await the handler; end the RPC with the status of whatever it raised.
    Cancellation (the client went away) passes through untouched."""
    started = time.perf_counter()
    try:
        result = await call
    except errors.CacheCoordError as err:
        code = status_of(err)
        _finished(method, code, started)
        await context.abort(code, _bounded(str(err)))
    except grpc.aio.AbortError:
        _finished(method, context.code() or grpc.StatusCode.UNKNOWN, started)
        raise  # the handler chose its status itself
    except asyncio.CancelledError:
        _finished(method, grpc.StatusCode.CANCELLED, started)
        raise
    except Exception:
        log.exception("unexpected error in %s", method)
        _finished(method, grpc.StatusCode.INTERNAL, started)
        await context.abort(
            grpc.StatusCode.INTERNAL, "internal error; the server log has the details"
        )
    else:
        _finished(method, grpc.StatusCode.OK, started)
        return result
    raise AssertionError("unreachable: abort raises")


# Details travel percent-encoded in gRPC metadata (8 KiB soft limit; each
# non-ASCII byte takes three characters): a message quoting a huge input is
# cut, or the client would see RESOURCE_EXHAUSTED instead.
_MAX_DETAILS_BYTES = 1300  # at most ~3.9 KB once percent-encoded


def _bounded(details: str) -> str:
    encoded = details.encode()
    if len(encoded) <= _MAX_DETAILS_BYTES:
        return details
    return encoded[:_MAX_DETAILS_BYTES].decode(errors="ignore") + "... (message cut)"


# Status codes that mean the server failed (OpenTelemetry RPC conventions);
# the others are the client's doing and leave the server span unset.
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _finished(method: str, code: grpc.StatusCode, started: float) -> None:
    if telemetry.METRICS:
        attributes = {
            "rpc.system": "grpc",
            "rpc.service": SERVICE,
            "rpc.method": method,
            "rpc.grpc.status_code": code.value[0],
        }
        instruments.call_duration.record(time.perf_counter() - started, attributes)
        instruments.requests.add(1, {"rpc.method": method, "rpc.grpc.status_code": code.value[0]})
    if (span := instruments.request_span.get()) is not None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in _SERVER_FAULTS:
            span.set_status(trace.StatusCode.ERROR, code.name)


@dataclass(frozen=True, slots=True)
class _SpanNaming:
    """The server span's name and attributes of one method, made once."""

    name: str
    attributes: Mapping[str, str]

    @classmethod
    def of(cls, method: str) -> _SpanNaming:
        attributes = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method}
        return cls(f"{SERVICE}/{method}", MappingProxyType(attributes))

    def start(self, context: Context) -> instruments.ServerSpan:
        return instruments.ServerSpan(
            self.name, context.invocation_metadata() or (), self.attributes
        )
