"""Wire behaviour of both clients against a canned in-process ``grpc.aio`` server.

This is the client's own unit test: the servicer answers fixed values and
records what it received (request, metadata, remaining deadline). The server
runs on its own event loop in a background thread so that the blocking client
can call it as well as the async one.
"""

# The servicer's methods are named after the RPCs by the generated base class.
# ruff: noqa: N802

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import grpc.aio
import pytest
from google.protobuf.message import Message

from cachecoord_client import (
    AsyncClient,
    CacheCoordError,
    Client,
    DeadlineExceeded,
    Deleted,
    Entry,
    Layer,
    Lock,
    LockNotAcquired,
    NamespaceNotFound,
    Unavailable,
    Value,
    VersionConflict,
    WatchEvent,
    WatchEventKind,
)
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]
Kind = Literal["async", "sync"]


@dataclass
class Received:
    """One call as the server saw it."""

    method: str
    request: Message
    metadata: dict[str, str | bytes]
    time_remaining: float | None


@dataclass
class Recorder(pb_grpc.CacheCoordServiceServicer):
    """Canned servicer: a namespace or lock name ``fail:<CODE>`` aborts with that code,
    key ``slow`` sleeps one second, key ``absent`` is not found."""

    calls: list[Received] = field(default_factory=list)
    watches_cancelled: int = 0

    async def _receive(self, method: str, request: Message, context: Context) -> None:
        self.calls.append(
            Received(
                method,
                request,
                dict(context.invocation_metadata() or ()),
                context.time_remaining(),
            )
        )
        target = str(getattr(request, "namespace", "") or getattr(request, "name", ""))
        if target.startswith("flaky:"):  # UNAVAILABLE until the N-th call of this key
            attempts = sum(1 for call in self.calls if call.request == request)
            if attempts < int(target.removeprefix("flaky:")):
                await context.abort(grpc.StatusCode.UNAVAILABLE, "canned restart")
        if target.startswith("fail:"):
            await context.abort(grpc.StatusCode[target.removeprefix("fail:")], "canned failure")
        if getattr(request, "key", "") == "slow":
            await asyncio.sleep(1.0)

    async def Get(self, request: pb.GetRequest, context: Context) -> pb.GetResponse:
        await self._receive("Get", request, context)
        if request.key == "absent":
            return pb.GetResponse(found=False)
        return pb.GetResponse(
            found=True,
            value=b'{"id": 1}',
            version=7,
            layer=pb.LAYER_REDIS,
            stale=True,
            ttl_ms=1500,
        )

    async def BatchGet(self, request: pb.BatchGetRequest, context: Context) -> pb.BatchGetResponse:
        await self._receive("BatchGet", request, context)
        return pb.BatchGetResponse(
            entries=[
                pb.Entry(key=k, found=True, value=k.encode(), version=i + 1, layer=pb.LAYER_NEAR)
                if k != "absent"
                else pb.Entry(key=k)
                for i, k in enumerate(request.keys)
            ]
        )

    async def Put(self, request: pb.PutRequest, context: Context) -> pb.PutResponse:
        await self._receive("Put", request, context)
        return pb.PutResponse(version=8)

    async def Delete(self, request: pb.DeleteRequest, context: Context) -> pb.DeleteResponse:
        await self._receive("Delete", request, context)
        return pb.DeleteResponse(deleted=True, version=9)

    async def Invalidate(
        self, request: pb.InvalidateRequest, context: Context
    ) -> pb.InvalidateResponse:
        await self._receive("Invalidate", request, context)
        return pb.InvalidateResponse(invalidated=len(request.keys) or 42)

    async def AcquireLock(
        self, request: pb.AcquireLockRequest, context: Context
    ) -> pb.AcquireLockResponse:
        await self._receive("AcquireLock", request, context)
        return pb.AcquireLockResponse(token="tok-1", fencing_token=11)

    async def ReleaseLock(
        self, request: pb.ReleaseLockRequest, context: Context
    ) -> pb.ReleaseLockResponse:
        await self._receive("ReleaseLock", request, context)
        return pb.ReleaseLockResponse()

    async def ExtendLock(
        self, request: pb.ExtendLockRequest, context: Context
    ) -> pb.ExtendLockResponse:
        await self._receive("ExtendLock", request, context)
        return pb.ExtendLockResponse()

    async def Watch(
        self, request: pb.WatchRequest, context: Context
    ) -> AsyncIterator[pb.WatchResponse]:
        """Four events (one of a kind unknown to the client), then the end of
        the stream; key_prefix ``forever`` keeps the stream open instead."""
        await self._receive("Watch", request, context)
        if request.namespaces and request.namespaces[0].startswith("fail:"):
            code = grpc.StatusCode[request.namespaces[0].removeprefix("fail:")]
            await context.abort(code, "canned failure")
        invalidation = pb.Invalidation(
            namespace="users", key="1", version=3, reason="put", origin="host-1"
        )
        finished = False
        try:
            yield pb.WatchResponse(reset=pb.Reset(reason="subscribed"))
            yield pb.WatchResponse(invalidation=invalidation)
            yield pb.WatchResponse()  # an event kind added to the contract later
            yield pb.WatchResponse(heartbeat=pb.Heartbeat())
            if request.key_prefix == "forever":
                await asyncio.Event().wait()
            finished = True
        finally:
            # Cancelled while waiting, or closed at a yield: the client went away.
            self.watches_cancelled += not finished


@dataclass
class Server:
    target: str
    recorder: Recorder

    def last(self, method: str) -> Received:
        """The only call received since the test began, checked to be ``method``."""
        assert [c.method for c in self.recorder.calls] == [method]
        return self.recorder.calls[0]


@pytest.fixture(scope="module")
def running_server() -> Iterator[Server]:
    recorder = Recorder()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="canned-grpc-server", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        pb_grpc.add_CacheCoordServiceServicer_to_server(recorder, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield Server(f"127.0.0.1:{port}", recorder)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def server(running_server: Server) -> Server:
    running_server.recorder.calls.clear()
    running_server.recorder.watches_cancelled = 0
    return running_server


class Caller:
    """Calls either client through one awaitable interface, so each test covers both."""

    def __init__(self, client: AsyncClient | Client) -> None:
        self.client = client

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.client, method)(*args, **kwargs)
        # The blocking client blocks this loop; fine, the server runs on another one.
        return await result if isinstance(self.client, AsyncClient) else result


@asynccontextmanager
async def connect(kind: Kind, target: str, **kwargs: Any) -> AsyncIterator[Caller]:
    if kind == "async":
        async with AsyncClient(target, **kwargs) as aclient:
            yield Caller(aclient)
    else:
        with Client(target, **kwargs) as client:
            yield Caller(client)


KINDS = pytest.mark.parametrize("kind", ["async", "sync"])


def assert_deadline(received: Received, expected: float) -> None:
    """Check the server saw about ``expected`` seconds left.

    gRPC sends the timeout rounded up to the precision of its wire encoding,
    so the server may see a few milliseconds more than the client asked for.
    """
    assert received.time_remaining is not None, "the call carried no deadline"
    assert expected - 1.0 < received.time_remaining <= expected + 0.05


@KINDS
@pytest.mark.asyncio
async def test_get(kind: Kind, server: Server) -> None:
    async with connect(kind, server.target) as call:
        value = await call("get", "users", "1")
    assert value == Value(
        found=True, value=b'{"id": 1}', version=7, layer=Layer.REDIS, stale=True, ttl_ms=1500
    )
    received = server.last("Get")
    assert received.request == pb.GetRequest(namespace="users", key="1")
    assert "authorization" not in received.metadata


@KINDS
@pytest.mark.asyncio
async def test_get_absent_key(kind: Kind, server: Server) -> None:
    async with connect(kind, server.target) as call:
        value = await call("get", "users", "absent")
    assert value == Value(False, b"", 0, Layer.UNSPECIFIED, False, 0)


@KINDS
@pytest.mark.asyncio
async def test_batch_get(kind: Kind, server: Server) -> None:
    async with connect(kind, server.target) as call:
        entries = await call("batch_get", "users", ["b", "absent", "a"])
        with pytest.raises(TypeError):
            await call("batch_get", "users", "abc")
    assert entries == [
        Entry("b", True, b"b", 1, Layer.NEAR, False, 0),
        Entry("absent", False, b"", 0, Layer.UNSPECIFIED, False, 0),
        Entry("a", True, b"a", 3, Layer.NEAR, False, 0),
    ]
    assert server.last("BatchGet").request == pb.BatchGetRequest(
        namespace="users", keys=["b", "absent", "a"]
    )


@KINDS
@pytest.mark.asyncio
async def test_put(kind: Kind, server: Server) -> None:
    async with connect(kind, server.target) as call:
        assert await call("put", "users", "1", b"v1") == 8
        assert await call("put", "users", "1", b"v2", expected_version=0, ttl_ms=60_000) == 8
    unconditional, conditional = (c.request for c in server.recorder.calls)
    assert isinstance(unconditional, pb.PutRequest)
    assert isinstance(conditional, pb.PutRequest)
    assert unconditional == pb.PutRequest(namespace="users", key="1", value=b"v1")
    assert not unconditional.HasField("expected_version")
    assert not unconditional.HasField("ttl_ms")
    assert conditional.HasField("expected_version")
    assert (conditional.expected_version, conditional.ttl_ms) == (0, 60_000)


@KINDS
@pytest.mark.asyncio
async def test_delete(kind: Kind, server: Server) -> None:
    async with connect(kind, server.target) as call:
        assert await call("delete", "users", "1", expected_version=3) == Deleted(True, 9)
    request = server.last("Delete").request
    assert isinstance(request, pb.DeleteRequest)
    assert request.HasField("expected_version")
    assert (request.namespace, request.key, request.expected_version) == ("users", "1", 3)


@KINDS
@pytest.mark.asyncio
async def test_invalidate(kind: Kind, server: Server) -> None:
    async with connect(kind, server.target) as call:
        assert await call("invalidate", "users", ["1", "2"]) == 2
        assert await call("invalidate", "users", all=True) == 42
    by_keys, everything = (c.request for c in server.recorder.calls)
    assert by_keys == pb.InvalidateRequest(namespace="users", keys=["1", "2"], all=False)
    assert everything == pb.InvalidateRequest(namespace="users", all=True)


@KINDS
@pytest.mark.asyncio
async def test_locks(kind: Kind, server: Server) -> None:
    async with connect(kind, server.target) as call:
        lock = await call("acquire_lock", "job", ttl_ms=30_000, wait_timeout_ms=2_000)
        assert lock == Lock(name="job", token="tok-1", fencing_token=11)
        assert await call("extend_lock", "job", lock.token, ttl_ms=60_000) is None
        assert await call("release_lock", "job", lock.token) is None
    acquire, extend, release = server.recorder.calls
    # The client chooses the token (so that it can release a lock whose
    # answer never came): a fresh random one per acquisition.
    assert len(acquire.request.token) >= 16
    assert acquire.request == pb.AcquireLockRequest(
        name="job", ttl_ms=30_000, wait_timeout_ms=2_000, token=acquire.request.token
    )
    assert extend.request == pb.ExtendLockRequest(name="job", token="tok-1", ttl_ms=60_000)
    assert release.request == pb.ReleaseLockRequest(name="job", token="tok-1")
    # The default deadline of AcquireLock covers the wait plus the usual default.
    assert_deadline(acquire, 2.0 + 5.0)
    assert_deadline(extend, 5.0)
    assert_deadline(release, 5.0)


@KINDS
@pytest.mark.asyncio
async def test_token_is_sent_as_bearer_metadata(kind: Kind, server: Server) -> None:
    async with connect(kind, server.target, token="s3cret") as call:
        await call("get", "users", "1")
        await call("acquire_lock", "job", ttl_ms=1_000)
    assert [c.metadata.get("authorization") for c in server.recorder.calls] == [
        "Bearer s3cret",
        "Bearer s3cret",
    ]


@KINDS
@pytest.mark.asyncio
async def test_deadlines(kind: Kind, server: Server) -> None:
    async with connect(kind, server.target) as call:
        await call("get", "users", "1")  # the library default, 5 s
        await call("get", "users", "1", timeout=1.5)
    async with connect(kind, server.target, default_timeout=2.5) as call:
        await call("put", "users", "1", b"v")
    library_default, explicit, client_default = server.recorder.calls
    assert_deadline(library_default, 5.0)
    assert_deadline(explicit, 1.5)
    assert_deadline(client_default, 2.5)


@KINDS
@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("NOT_FOUND", NamespaceNotFound),
        ("FAILED_PRECONDITION", VersionConflict),
        ("ABORTED", LockNotAcquired),
        ("INTERNAL", CacheCoordError),
    ],
)
@pytest.mark.asyncio
async def test_errors_are_mapped(
    kind: Kind, server: Server, code: str, cls: type[CacheCoordError]
) -> None:
    async with connect(kind, server.target) as call:
        with pytest.raises(cls) as raised:
            await call("get", f"fail:{code}", "1")
        with pytest.raises(cls):
            await call("release_lock", f"fail:{code}", "tok")
    assert type(raised.value) is cls
    assert raised.value.code is grpc.StatusCode[code]
    assert raised.value.details == "canned failure"
    assert isinstance(raised.value.__cause__, grpc.RpcError)


@KINDS
@pytest.mark.asyncio
async def test_deadline_exceeded(kind: Kind, server: Server) -> None:
    async with connect(kind, server.target) as call:
        with pytest.raises(DeadlineExceeded):
            await call("get", "users", "slow", timeout=0.2)


@KINDS
@pytest.mark.asyncio
async def test_unreachable_server_is_unavailable(kind: Kind) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with connect(kind, f"127.0.0.1:{port}") as call:
        with pytest.raises(Unavailable):
            await call("get", "users", "1")


@pytest.mark.asyncio
async def test_async_from_channel_borrows_the_channel(server: Server) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        async with AsyncClient.from_channel(channel, token="t", default_timeout=2.0) as client:
            await client.get("users", "1")
        # Closing the client left the borrowed channel open.
        await AsyncClient.from_channel(channel).get("users", "2")
    first, second = server.recorder.calls
    assert first.metadata.get("authorization") == "Bearer t"
    assert_deadline(first, 2.0)
    assert "authorization" not in second.metadata


def test_sync_from_channel_borrows_the_channel(server: Server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        with Client.from_channel(channel, token="t") as client:
            client.get("users", "1")
        Client.from_channel(channel).get("users", "2")
    assert [c.metadata.get("authorization") for c in server.recorder.calls] == ["Bearer t", None]


@pytest.mark.parametrize("cls", [AsyncClient, Client])
@pytest.mark.asyncio
async def test_constructor_validates(cls: type[AsyncClient | Client]) -> None:
    with pytest.raises(ValueError, match="default_timeout"):
        cls("127.0.0.1:1", default_timeout=0)
    with pytest.raises(ValueError, match="token"):
        cls("127.0.0.1:1", token="Bearer x\n")


def test_async_client_outside_a_running_loop_is_refused() -> None:
    with pytest.raises(RuntimeError, match="inside the running event loop"):
        AsyncClient("127.0.0.1:1")


# Watch.

WATCHED = [
    WatchEvent(WatchEventKind.RESET, reason="subscribed"),
    WatchEvent(WatchEventKind.INVALIDATION, "users", "1", False, 3, "put", "host-1"),
    WatchEvent(WatchEventKind.HEARTBEAT),
]


async def until(condition: Callable[[], bool], within: float = 5.0) -> bool:
    """Whether *condition* becomes true within *within* seconds (polled)."""
    deadline = time.monotonic() + within
    while True:
        if condition() or time.monotonic() > deadline:
            return condition()
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_async_watch_streams_events_without_a_deadline(server: Server) -> None:
    async with AsyncClient(server.target, token="t") as client:
        async with client.watch(["users", "blobs"], key_prefix="user:") as events:
            received = [event async for event in events]
        async with client.watch(["users"], timeout=2.5) as events:
            assert [event async for event in events] == WATCHED
    assert received == WATCHED  # the unknown event kind was skipped; EOF ends the iteration
    unbounded, bounded = server.recorder.calls
    assert unbounded.request == pb.WatchRequest(namespaces=["users", "blobs"], key_prefix="user:")
    assert unbounded.metadata.get("authorization") == "Bearer t"
    # A Watch is long-lived: no deadline unless asked, whatever default_timeout says.
    assert unbounded.time_remaining is None
    assert_deadline(bounded, 2.5)


def test_sync_watch_streams_events_without_a_deadline(server: Server) -> None:
    with Client(server.target, token="t") as client:
        with client.watch(["users", "blobs"], key_prefix="user:") as events:
            received = list(events)
        with client.watch(["users"], timeout=2.5) as events:
            assert list(events) == WATCHED
    assert received == WATCHED
    unbounded, bounded = server.recorder.calls
    assert unbounded.request == pb.WatchRequest(namespaces=["users", "blobs"], key_prefix="user:")
    assert unbounded.metadata.get("authorization") == "Bearer t"
    assert unbounded.time_remaining is None
    assert_deadline(bounded, 2.5)


@KINDS
@pytest.mark.asyncio
async def test_watch_failures_are_mapped(kind: Kind, server: Server) -> None:
    async with connect(kind, server.target) as call:
        with pytest.raises(TypeError):
            call.client.watch("users")
        stream = call.client.watch(["fail:NOT_FOUND"])
        with pytest.raises(NamespaceNotFound) as raised:
            await anext(stream) if isinstance(stream, AsyncIterator) else next(stream)
    assert raised.value.details == "canned failure"
    assert isinstance(raised.value.__cause__, grpc.RpcError)


@pytest.mark.asyncio
async def test_async_watch_is_cancelled_however_its_consumer_stops(server: Server) -> None:
    recorder = server.recorder
    async with AsyncClient(server.target) as client:
        # Leaving the block.
        async with client.watch(["users"], key_prefix="forever") as events:
            assert await anext(events) == WATCHED[0]
        assert await until(lambda: recorder.watches_cancelled == 1)

        # Cancelling the task that waits for an event.
        async def consume() -> None:
            async for _ in client.watch(["users"], key_prefix="forever"):
                pass

        consumer = asyncio.create_task(consume())
        assert await until(lambda: len(recorder.calls) == 2)
        await asyncio.sleep(0.05)  # the consumer waits for a fifth event
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        assert await until(lambda: recorder.watches_cancelled == 2)

        # Breaking out of a bare `async for`: the dropped stream cancels its call.
        async for _ in client.watch(["users"], key_prefix="forever"):
            break
        gc.collect()  # not needed by CPython's reference counting; for other runtimes
        assert await until(lambda: recorder.watches_cancelled == 3)


@pytest.mark.asyncio
async def test_async_aclose_from_another_task_ends_the_iteration_quietly(server: Server) -> None:
    async with AsyncClient(server.target) as client:
        events = client.watch(["users"], key_prefix="forever")
        received: list[WatchEvent] = []

        async def consume() -> None:
            async for event in events:
                received.append(event)

        consumer = asyncio.create_task(consume())
        assert await until(lambda: len(received) == 3)
        await events.aclose()
        await asyncio.wait_for(consumer, 5)  # ended, not cancelled
        await events.aclose()  # twice is fine
    assert received == WATCHED
    assert await until(lambda: server.recorder.watches_cancelled == 1)


@pytest.mark.asyncio
async def test_sync_watch_is_cancelled_on_close_even_from_another_thread(server: Server) -> None:
    recorder = server.recorder
    with Client(server.target) as client:
        with client.watch(["users"], key_prefix="forever") as events:
            assert next(events) == WATCHED[0]
        assert await until(lambda: recorder.watches_cancelled == 1)

        events = client.watch(["users"], key_prefix="forever")
        consumer = asyncio.create_task(asyncio.to_thread(list, events))
        assert await until(lambda: len(recorder.calls) == 2)
        await asyncio.sleep(0.05)  # the consumer thread blocks in next()
        events.close()
        assert await asyncio.wait_for(consumer, 5) == WATCHED
        assert await until(lambda: recorder.watches_cancelled == 2)


@KINDS
@pytest.mark.asyncio
async def test_idempotent_calls_are_retried_on_unavailable(kind: Kind, server: Server) -> None:
    async with connect(kind, server.target) as call:
        got = await call("get", "flaky:3", f"retried-{kind}")
    assert got.found
    assert [c.method for c in server.recorder.calls] == ["Get"] * 3


@KINDS
@pytest.mark.asyncio
async def test_writes_are_not_retried(kind: Kind, server: Server) -> None:
    async with connect(kind, server.target) as call:
        with pytest.raises(Unavailable):
            await call("put", "flaky:2", f"once-{kind}", b"v")
    assert [c.method for c in server.recorder.calls] == ["Put"]
