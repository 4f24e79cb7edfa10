"""A pipelined connection to one Redis node, for the hot read commands.

redis-py checks a connection out of its pool for every command, wraps the
read in a timeout and wakes the event loop once more for the reply: several
times the CPU of the command itself (bench/redis_clients.py). Here every
caller writes its commands on one shared connection at once and awaits a
future; replies come back in the order the commands were written (RESP
guarantees it), so a hiredis reader resolves the futures first in, first
out. The commands of all callers of one turn of the event loop go out in one
write.

What stays as with redis-py:

* connecting: redis-py's own connection object opens the socket (TLS, AUTH,
  SELECT and the connect timeout, with its error types), then this protocol
  takes the transport over;
* errors: an error reply is the exception redis-py's parser makes of it
  (NoScriptError, MovedError, ...); a command not answered within the socket
  timeout fails with redis-py's TimeoutError and one that loses its
  connection with its ConnectionError, so the circuit breaker and the callers
  see what they saw;
* a timeout closes the connection: replies still on their way could no longer
  be matched to their commands. The next call reconnects.

A caller cancelled while waiting leaves its future in the queue: its reply is
read and dropped, and the replies behind it still reach their own callers.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis._parsers.encoders import Encoder
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

Command = Sequence[Any]
"""A command and its arguments (str, bytes or int), e.g. ``("GET", name)``."""


class _Request:
    """The commands one caller wrote, and the replies read for them so far."""

    __slots__ = ("count", "deadline", "future", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], count: int, deadline: float) -> None:
        self.future = future
        self.count = count
        self.deadline = deadline
        self.replies: list[Any] = []


class _Protocol(asyncio.Protocol):
    def __init__(self, name: str, timeout: float | None) -> None:
        self.name = name
        self.timeout = timeout
        self.lost = False
        self._reader = hiredis.Reader()
        self._requests: deque[_Request] = deque()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.stream: asyncio.StreamWriter | None = None
        self._unsent: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.Transport", transport)  # (uvloop's are not subclasses)

    def send(self, data: bytes, count: int) -> asyncio.Future[list[Any]]:
        """Write *count* packed commands; the future gets their replies."""
        if self.lost or self._transport is None:
            raise RedisConnectionError(f"Connection to {self.name} closed.")
        loop = self._loop
        future: asyncio.Future[list[Any]] = loop.create_future()
        deadline = loop.time() + self.timeout if self.timeout is not None else 0.0
        self._requests.append(_Request(future, count, deadline))
        # Written once per turn of the loop, for every caller of that turn:
        # one system call (and one reply read) for many commands.
        unsent = self._unsent
        if not unsent:
            loop.call_soon(self._write)
        unsent.append(data)
        if self._timer is None and self.timeout is not None:
            self._timer = loop.call_at(deadline, self._check_deadline)
        return future

    def _write(self) -> None:
        unsent, self._unsent = self._unsent, []
        if self._transport is not None:
            self._transport.write(b"".join(unsent))

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        requests = self._requests
        try:
            while (reply := reader.gets()) is not False:
                request = requests[0]
                request.replies.append(reply)
                if len(request.replies) == request.count:
                    requests.popleft()
                    if not request.future.done():  # else its caller was cancelled
                        request.future.set_result(request.replies)
        except (hiredis.ProtocolError, IndexError) as err:  # a reply without a command
            self.close(RedisConnectionError(f"Error while reading from {self.name}: {err!r}"))

    def eof_received(self) -> bool | None:
        self.close(RedisConnectionError("Connection closed by server."))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        error = "Connection closed by server." if exc is None else f"{exc!r}"
        self.close(RedisConnectionError(f"Error while reading from {self.name}: {error}"))

    def _check_deadline(self) -> None:
        """One timer per connection, re-armed for the oldest request still
        waiting: cheaper than a timeout per call."""
        self._timer = None
        if not self._requests:
            return
        deadline = self._requests[0].deadline
        if deadline <= self._loop.time():
            self.close(RedisTimeoutError(f"Timeout reading from {self.name}"))
        else:
            self._timer = self._loop.call_at(deadline, self._check_deadline)

    def close(self, error: Exception) -> None:
        """Fail every request in flight with *error* and drop the connection."""
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        requests, self._requests = self._requests, deque()
        self._unsent = []
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()


_ENCODER = Encoder(  # type: ignore[no-untyped-call]
    encoding="utf-8", encoding_errors="strict", decode_responses=False
)


def _pack(command: Command) -> bytes:
    try:
        packed: bytes = hiredis.pack_command(tuple(command))
    except TypeError:  # e.g. an int subclass: encoded as redis-py would (or refused as it would)
        encode = _ENCODER.encode
        packed = hiredis.pack_command(tuple(encode(arg) for arg in command))  # type: ignore[no-untyped-call]
    return packed


class MixedReplies(list[Any]):
    """Replies some of which are not values: errors (as the exception redis-py
    makes of each), or commands to send another way. A plain ``list`` of
    replies holds values only, which is cheap to tell (``type(r) is list``)."""


def _raised(reply: Any) -> Any:
    if isinstance(reply, hiredis.ReplyError):
        return BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
    return reply


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class PipelinedConnection:
    """One connection to one Redis node, shared by every caller, opened on
    first use and again after it was lost.

    *connection* makes a redis-py connection (not yet connected) with the
    settings of this node: it does the connecting."""

    def __init__(self, connection: Callable[[], AbstractConnection], *, name: str) -> None:
        self.name = name
        self._new_connection = connection
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self._closed = False

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Send *commands* at once; their replies: a ``list`` of values, or
        MixedReplies with each error reply as its exception (not raised; the
        commands sent here never nest an error in an array reply). Raises
        redis-py's ConnectionError or TimeoutError if the node cannot be
        reached or does not answer in time."""
        protocol = self._protocol
        if protocol is None or protocol.lost:
            protocol = await self._connect()
        data = _pack(commands[0]) if len(commands) == 1 else b"".join(map(_pack, commands))
        replies = await protocol.send(data, len(commands))
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                return MixedReplies(map(_raised, replies))
        return replies

    async def _connect(self) -> _Protocol:
        if self._closed:
            raise RedisConnectionError(f"Connection to {self.name} closed.")
        connecting = self._connecting
        if connecting is None or connecting.done():
            connecting = self._connecting = asyncio.create_task(
                self._open(), name=f"cachecoord-redis-connect-{self.name}"
            )
            # Retrieved even if every caller was cancelled meanwhile.
            connecting.add_done_callback(_retrieve)
        try:
            # Shielded: a caller cancelled while connecting must not cancel
            # the connect the other callers wait for.
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> _Protocol:
        connection = self._new_connection()
        await connection.connect()  # type: ignore[no-untyped-call]
        writer = connection._writer
        assert writer is not None
        transport = writer.transport
        # The redis-py connection gives its transport up: it must not close
        # it when it is collected.
        connection._writer = None
        connection._reader = None
        timeout = connection.socket_timeout
        protocol = _Protocol(self.name, timeout)
        # Held: a StreamWriter closes its transport when it is collected.
        protocol.stream = writer
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._closed:
            protocol.close(RedisConnectionError(f"Connection to {self.name} closed."))
        self._protocol = protocol
        return protocol

    def close(self) -> None:
        """Close the connection; calls in flight fail with ConnectionError."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if self._protocol is not None:
            self._protocol.close(RedisConnectionError(f"Connection to {self.name} closed."))
