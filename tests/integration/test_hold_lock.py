"""HoldLock through real gRPC against a real Redis (design 1, 4.3 and 10).

A HoldLock stream holds its lock while it is open: the server renews it past
its TTL and releases it the moment the stream ends, whether the client lets
go, cancels, or dies. Streams cancelled or abandoned in bulk leave no tasks,
memory or lock keys behind: grpc.aio can leak what cancelled streams had in
flight (grpc #43360), and since grpcio 1.83 it never cancels a call that its
client merely dropped (grpc #43462), so both are measured here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from cli_support import CLI, cli_env
from strategy_support import ServeProcess, serve_config

from cachecoord.app import App
from cachecoord.config import Duration
from cachecoord.storage import keys
from cachecoord_client import (
    AsyncClient,
    CacheCoordError,
    Client,
    DeadlineExceeded,
    Lock,
    LockLost,
    LockNotAcquired,
    Unavailable,
    WatchEventKind,
    WatchStream,
)
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2_grpc as pb_grpc
from conftest import settings_for
from local_servers import PostgresServer, RedisServer, free_port

ABORTED = grpc.StatusCode.ABORTED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
HoldCall = grpc.aio.StreamStreamCall[pb.HoldLockRequest, pb.HoldLockResponse]

# A client process that holds a lock until it is killed.
HOLDER_PROCESS = """
import asyncio, sys
from cachecoord_client import AsyncClient

async def hold(target, name):
    async with AsyncClient(target) as client:
        async with client.hold_lock(name, ttl_ms=30_000):
            print("acquired", flush=True)
            await asyncio.sleep(3600)

asyncio.run(hold(sys.argv[1], sys.argv[2]))
"""


@pytest.fixture
def name() -> str:
    """A lock name no other test uses."""
    return f"hold-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def target(app: App) -> str:
    return f"127.0.0.1:{app.port}"


@pytest_asyncio.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain Redis client, to look at (and tamper with) lock keys."""
    client = aioredis.Redis.from_url(redis_server.url, protocol=2)
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def stub(target: str) -> AsyncIterator[pb_grpc.CacheCoordServiceAsyncStub]:
    """The generated stub on a channel of its own, for wire-level checks."""
    async with grpc.aio.insecure_channel(target) as channel:
        yield pb_grpc.CacheCoordServiceStub(channel)


def acquire(name: str, ttl_ms: int = 30_000, wait_timeout_ms: int = 0) -> pb.HoldLockRequest:
    return pb.HoldLockRequest(
        acquire=pb.HoldLockRequest.Acquire(
            name=name, ttl_ms=ttl_ms, wait_timeout_ms=wait_timeout_ms
        )
    )


async def assert_held(client: AsyncClient, name: str) -> None:
    """Someone holds *name*: an acquire that does not wait is refused with ABORTED."""
    with pytest.raises(LockNotAcquired):
        await client.acquire_lock(name, ttl_ms=1_000, wait_timeout_ms=0)


async def seconds_until_acquired(
    client: AsyncClient, name: str, let_go: Callable[[], Awaitable[object]]
) -> float:
    """Start a waiter on *name*, call *let_go*, and time how long the waiter then needs."""
    waiter = asyncio.create_task(client.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=5_000))
    try:
        await asyncio.sleep(0.1)  # the waiter reaches the server and waits
        assert not waiter.done(), "the waiter got a lock that is held"
        started = time.monotonic()
        await let_go()
        lock = await waiter
        waited = time.monotonic() - started
    finally:
        waiter.cancel()
    await client.release_lock(name, lock.token)
    return waited


async def holding(
    client: AsyncClient, name: str, ttl_ms: int = 30_000
) -> tuple[asyncio.Task[None], asyncio.Event]:
    """A task holding *name* until the event is set; returned once it holds it."""
    acquired, leave = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with client.hold_lock(name, ttl_ms=ttl_ms):
            acquired.set()
            await leave.wait()

    holder = asyncio.create_task(hold())
    await asyncio.wait_for(acquired.wait(), 5)
    return holder, leave


async def test_holder_gets_token_and_fencing_token(client: AsyncClient, name: str) -> None:
    before = await client.acquire_lock(name, ttl_ms=10_000)
    await client.release_lock(name, before.token)

    async with client.hold_lock(name, ttl_ms=10_000) as lock:
        assert lock.name == name
        assert lock.token
        assert lock.fencing_token > before.fencing_token


async def test_another_acquirer_is_refused_while_held(client: AsyncClient, name: str) -> None:
    async with client.hold_lock(name, ttl_ms=10_000):
        await assert_held(client, name)
        with pytest.raises(LockNotAcquired):
            async with client.hold_lock(name, ttl_ms=10_000, wait_timeout_ms=200):
                pytest.fail("two holders at once")


async def test_waiting_holder_gets_the_lock_when_the_first_lets_go(
    client: AsyncClient, name: str
) -> None:
    first_done = asyncio.Event()

    async def second() -> Lock:
        async with client.hold_lock(name, ttl_ms=10_000, wait_timeout_ms=5_000) as lock:
            assert first_done.is_set(), "both held the lock at once"
            return lock

    async with client.hold_lock(name, ttl_ms=10_000) as first:
        waiter = asyncio.create_task(second())
        await asyncio.sleep(0.1)
        assert not waiter.done()
        first_done.set()
    got = await asyncio.wait_for(waiter, 2)

    assert got.fencing_token > first.fencing_token


async def test_ending_the_stream_releases_at_once(client: AsyncClient, name: str) -> None:
    holder, leave = await holding(client, name)

    async def let_go() -> None:
        leave.set()
        await holder

    waited = await seconds_until_acquired(client, name, let_go)

    assert waited < 1.0, f"released after {waited:.2f} s: the TTL (30 s) freed it, not the end"


async def test_cancelling_the_holder_releases_at_once(client: AsyncClient, name: str) -> None:
    holder, _ = await holding(client, name)

    async def cancel() -> None:
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)

    waited = await seconds_until_acquired(client, name, cancel)

    assert waited < 1.0, f"released after {waited:.2f} s: the TTL (30 s) freed it, not the end"


async def test_renewal_keeps_the_lock_past_its_ttl(client: AsyncClient, name: str) -> None:
    async with client.hold_lock(name, ttl_ms=300):
        await asyncio.sleep(1.5)  # five TTLs
        await assert_held(client, name)

    lock = await client.acquire_lock(name, ttl_ms=1_000)
    await client.release_lock(name, lock.token)


async def test_killed_client_process_frees_the_lock_within_a_second(
    client: AsyncClient, target: str, name: str
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER_PROCESS, target, name, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        assert line == b"acquired\n", line
        await assert_held(client, name)

        async def kill() -> None:
            process.kill()  # SIGKILL: no finally, no goodbye; the kernel closes the socket
            await process.wait()

        waited = await seconds_until_acquired(client, name, kill)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert waited < 1.0, f"released {waited:.2f} s after the kill (TTL 30 s)"


async def test_a_lock_held_by_a_killed_instance_lasts_its_ttl_at_most(
    client: AsyncClient,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path: Path,
    name: str,
) -> None:
    """An instance SIGKILLed while it holds a lock for a HoldLock stream
    releases nothing: the lock outlives it until its TTL runs out (renewals
    stopped), no longer, and its client learns that the stream broke."""
    target = f"127.0.0.1:{free_port()}"
    config = serve_config(
        tmp_path,
        listen=target,
        redis_url=redis_server.url,
        postgres_url=postgres_server.dsn,
        instance_id="doomed",
        namespaces='[namespaces.unused]\nkind = "managed"\n',
    )
    doomed = ServeProcess(config, target, tmp_path / "doomed.log")
    await doomed.start()
    try:
        async with AsyncClient(target) as on_doomed:
            holder, leave = await holding(on_doomed, name, ttl_ms=2_000)
            await asyncio.sleep(1.0)  # renewed at least once: the TTL alone would have ended
            await assert_held(client, name)
            await doomed.kill()
            killed = time.monotonic()
            got = await client.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=10_000)
            waited = time.monotonic() - killed
            leave.set()
            with pytest.raises(CacheCoordError):
                await holder
    finally:
        await doomed.terminate()
    await client.release_lock(name, got.token)

    assert 0.5 < waited < 3.0, f"acquired {waited:.2f} s after the kill (TTL 2 s)"


async def test_lost_lock_is_reported_when_the_block_ends(
    client: AsyncClient, redis: aioredis.Redis, name: str
) -> None:
    async def hold_while_redis_loses_it() -> None:
        async with client.hold_lock(name, ttl_ms=300):
            await redis.delete(keys.lock_key(name))  # Redis lost it (e.g. a failover)
            await asyncio.sleep(0.5)  # a renewal finds it gone

    with pytest.raises(LockLost) as lost:
        await hold_while_redis_loses_it()

    assert lost.value.code is ABORTED
    assert name in lost.value.details


async def test_lost_lock_sends_lost_then_ends_with_aborted(
    stub: pb_grpc.CacheCoordServiceAsyncStub, redis: aioredis.Redis, name: str
) -> None:
    call: HoldCall = stub.HoldLock(None)
    await call.write(acquire(name, ttl_ms=300))
    first = await call.read()
    assert isinstance(first, pb.HoldLockResponse)
    assert first.WhichOneof("kind") == "acquired"

    await redis.set(keys.lock_key(name), "someone-else")  # another holder, as after expiry
    event = await asyncio.wait_for(call.read(), 2)

    assert isinstance(event, pb.HoldLockResponse)
    assert event.WhichOneof("kind") == "lost"
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await call.read()
    assert ended.value.code() is ABORTED
    assert await redis.get(keys.lock_key(name)) == b"someone-else", "released another's lock"
    await redis.delete(keys.lock_key(name))


async def test_keep_alives_and_release_end_the_stream_ok(
    stub: pb_grpc.CacheCoordServiceAsyncStub, client: AsyncClient, name: str
) -> None:
    call: HoldCall = stub.HoldLock(None)
    await call.write(acquire(name))
    assert isinstance(await call.read(), pb.HoldLockResponse)

    await call.write(pb.HoldLockRequest(keep_alive=pb.HoldLockRequest.KeepAlive()))
    await call.write(pb.HoldLockRequest())  # no kind: a keep-alive too
    await asyncio.sleep(0.05)
    await assert_held(client, name)
    await call.write(pb.HoldLockRequest(release=pb.HoldLockRequest.Release()))

    assert not isinstance(await call.read(), pb.HoldLockResponse)  # EOF
    assert await call.code() is grpc.StatusCode.OK
    lock = await client.acquire_lock(name, ttl_ms=1_000)
    await client.release_lock(name, lock.token)


@pytest.mark.parametrize(
    "requests",
    [
        pytest.param([], id="no-message"),
        pytest.param([pb.HoldLockRequest(release=pb.HoldLockRequest.Release())], id="release"),
        pytest.param([pb.HoldLockRequest()], id="keep-alive"),
    ],
)
async def test_stream_must_start_with_acquire(
    stub: pb_grpc.CacheCoordServiceAsyncStub, requests: list[pb.HoldLockRequest]
) -> None:
    call: HoldCall = stub.HoldLock(None)
    for request in requests:
        await call.write(request)
    await call.done_writing()

    with pytest.raises(grpc.aio.AioRpcError) as rejected:
        await call.read()

    assert rejected.value.code() is INVALID_ARGUMENT
    assert "acquire" in (rejected.value.details() or "")


async def test_unparsable_message_is_rejected_as_invalid_argument(
    target: str, client: AsyncClient, name: str
) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        hold_lock = channel.stream_stream(
            "/cachecoord.v1.CacheCoordService/HoldLock",
            request_serializer=None,  # raw bytes on the wire
            response_deserializer=None,
        )
        call = hold_lock(None)
        await call.write(acquire(name).SerializeToString())
        assert await call.read()  # acquired

        await call.write(b"\xff\xff\xff")  # not protobuf

        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await call.read()
    assert rejected.value.code() is INVALID_ARGUMENT
    lock = await client.acquire_lock(name, ttl_ms=1_000)
    await client.release_lock(name, lock.token)


async def test_second_acquire_is_rejected_and_releases_the_lock(
    stub: pb_grpc.CacheCoordServiceAsyncStub, client: AsyncClient, name: str
) -> None:
    call: HoldCall = stub.HoldLock(None)
    await call.write(acquire(name))
    assert isinstance(await call.read(), pb.HoldLockResponse)

    await call.write(acquire(name))

    with pytest.raises(grpc.aio.AioRpcError) as rejected:
        await call.read()
    assert rejected.value.code() is INVALID_ARGUMENT
    lock = await client.acquire_lock(name, ttl_ms=1_000)
    await client.release_lock(name, lock.token)


async def test_a_holder_that_gives_up_waiting_never_takes_the_lock(
    client: AsyncClient, target: str, name: str
) -> None:
    async def async_wait() -> None:
        async with client.hold_lock(name, ttl_ms=10_000, wait_timeout_ms=5_000, timeout=0.3):
            pytest.fail("two holders at once")

    def sync_wait() -> None:
        with (
            Client(target) as sync,
            sync.hold_lock(name, ttl_ms=10_000, wait_timeout_ms=5_000, timeout=0.3),
        ):
            pytest.fail("two holders at once")

    holder, leave = await holding(client, name)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await async_wait()
    with pytest.raises(DeadlineExceeded):
        await asyncio.to_thread(sync_wait)
    assert time.monotonic() - started < 2.0

    leave.set()
    await holder
    # The abandoned waits ended with their streams: the lock is free, not taken by them.
    lock = await client.acquire_lock(name, ttl_ms=1_000, wait_timeout_ms=0)
    await client.release_lock(name, lock.token)


@pytest.mark.parametrize(
    ("ttl_ms", "wait_timeout_ms", "field"),
    [
        pytest.param(0, 0, "ttl_ms", id="zero-ttl"),
        pytest.param(86_400_001, 0, "ttl_ms", id="ttl-over-a-day"),
        pytest.param(1_000, -1, "wait_timeout_ms", id="negative-wait"),
    ],
)
async def test_invalid_acquire_is_rejected_naming_the_field(
    client: AsyncClient, name: str, ttl_ms: int, wait_timeout_ms: int, field: str
) -> None:
    with pytest.raises(CacheCoordError) as rejected:
        async with client.hold_lock(name, ttl_ms=ttl_ms, wait_timeout_ms=wait_timeout_ms):
            pytest.fail("acquired with invalid input")

    assert rejected.value.code is INVALID_ARGUMENT, rejected.value
    assert field in rejected.value.details


# The blocking client, run in a thread: the server shares this event loop.


async def test_sync_client_holds_until_the_block_ends(
    client: AsyncClient, target: str, name: str
) -> None:
    inside, leave = threading.Event(), threading.Event()

    def hold() -> Lock:
        with Client(target) as sync, sync.hold_lock(name, ttl_ms=300) as lock:
            inside.set()
            leave.wait(10)
            return lock

    holder = asyncio.create_task(asyncio.to_thread(hold))
    assert await asyncio.to_thread(inside.wait, 10)
    await asyncio.sleep(0.5)  # past the TTL: renewed
    await assert_held(client, name)
    with pytest.raises(LockNotAcquired):
        await asyncio.to_thread(_sync_hold_without_waiting, target, name)

    waited = await seconds_until_acquired(client, name, lambda: _leave(leave, holder))

    assert waited < 1.0
    assert (await holder).name == name


async def test_sync_client_reports_a_lost_lock(
    redis: aioredis.Redis, target: str, name: str
) -> None:
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with Client(target) as sync, sync.hold_lock(name, ttl_ms=300):
            inside.set()
            leave.wait(10)

    holder = asyncio.create_task(asyncio.to_thread(hold))
    assert await asyncio.to_thread(inside.wait, 10)
    await redis.delete(keys.lock_key(name))
    await asyncio.sleep(0.5)

    with pytest.raises(LockLost):
        await _leave(leave, holder)


def _sync_hold_without_waiting(target: str, name: str) -> None:
    with Client(target) as sync, sync.hold_lock(name, ttl_ms=1_000):
        pytest.fail("two holders at once")


async def _leave(leave: threading.Event, holder: asyncio.Task[object]) -> object:
    leave.set()
    return await holder


# Leaks (design 10: grpc #43360, #43462).


async def test_a_thousand_cancelled_and_abandoned_streams_leave_nothing_behind(
    client: AsyncClient, redis: aioredis.Redis, target: str
) -> None:
    # The first time 1000 streams are open at once, client and server (both
    # in this process) take ~40 MiB that malloc keeps for reuse: warm up at
    # full size, so that the measured round shows what stays, not the peak.
    await churn(client, redis, target, streams=1_000)
    tasks_before = await settled_task_count(len(asyncio.all_tasks()))
    rss_before, heap_before = psutil.Process().memory_info().rss, heap_in_use()

    await churn(client, redis, target, streams=1_000)

    tasks_after = await settled_task_count(tasks_before)
    rss_grown = (psutil.Process().memory_info().rss - rss_before) / 2**20
    heap_grown = heap_in_use() - heap_before
    print(
        f"\n1000 HoldLock streams: tasks {tasks_before} -> {tasks_after}, RSS {rss_grown:+.1f} MiB,"
        f" malloc heap in use {heap_grown / 1000:+.0f} B per stream"
    )
    assert tasks_after <= tasks_before, [t.get_name() for t in asyncio.all_tasks()]
    assert rss_grown < 20, f"RSS grew by {rss_grown:.1f} MiB"
    # RSS hides small leaks (grpc #43360 loses ~100 B per cancelled batch);
    # glibc's count of bytes in use does not.
    assert heap_grown < 1_000 * 1_000, f"{heap_grown / 1000:.0f} B per stream still in use"


async def churn(client: AsyncClient, redis: aioredis.Redis, target: str, streams: int) -> None:
    """Open *streams* HoldLock streams and end them all the ways a client can.

    Two fifths hold distinct locks and are cancelled by the client; one fifth
    wait for a lock held by another and are cancelled while waiting; two
    fifths hold distinct locks on a channel that is then closed with the calls
    merely dropped, as a client that exits or loses its connection does.
    Every lock must be free afterwards, without any TTL running out.
    """
    prefix = f"churn-{uuid.uuid4().hex[:8]}"
    held, waiting = streams * 2 // 5, streams // 5
    abandoned = streams - held - waiting
    blocker = await client.acquire_lock(f"{prefix}-busy", ttl_ms=60_000)
    holders = await hold_until_cancelled(client, [f"{prefix}-h{i}" for i in range(held)])
    waiters = [
        asyncio.create_task(_hold_forever(client, f"{prefix}-busy", asyncio.Event()))
        for _ in range(waiting)
    ]
    async with grpc.aio.insecure_channel(target) as channel:
        stub: pb_grpc.CacheCoordServiceAsyncStub = pb_grpc.CacheCoordServiceStub(channel)
        for start in range(0, abandoned, 100):
            names = [f"{prefix}-a{i}" for i in range(start, min(start + 100, abandoned))]
            await asyncio.gather(*(_open_and_drop(stub, n) for n in names))
        await asyncio.sleep(0.1)  # the waiters reach the server
        for task in holders + waiters:
            task.cancel()
        await asyncio.gather(*holders, *waiters, return_exceptions=True)
    await client.release_lock(f"{prefix}-busy", blocker.token)
    await until_no_lock_keys(redis, prefix)


async def hold_until_cancelled(client: AsyncClient, names: list[str]) -> list[asyncio.Task[None]]:
    """Tasks holding each of *names*, returned once every one holds its lock."""
    tasks = []
    for start in range(0, len(names), 100):
        acquired = [asyncio.Event() for _ in names[start : start + 100]]
        tasks += [
            asyncio.create_task(_hold_forever(client, name, event))
            for name, event in zip(names[start : start + 100], acquired, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in acquired)), 10)
    return tasks


async def _hold_forever(client: AsyncClient, name: str, acquired: asyncio.Event) -> None:
    async with client.hold_lock(name, ttl_ms=30_000, wait_timeout_ms=30_000):
        acquired.set()
        await asyncio.Event().wait()


async def _open_and_drop(stub: pb_grpc.CacheCoordServiceAsyncStub, name: str) -> None:
    call: HoldCall = stub.HoldLock(None)
    await call.write(acquire(name))
    response = await call.read()
    assert isinstance(response, pb.HoldLockResponse)
    assert response.WhichOneof("kind") == "acquired"
    # The call is dropped here, not cancelled: only the channel's close ends it.


async def until_no_lock_keys(redis: aioredis.Redis, prefix: str, within: float = 5.0) -> None:
    """Wait until no lock named *prefix*... exists in Redis (fencing counters stay)."""
    deadline = time.monotonic() + within
    while True:
        left = [k async for k in redis.scan_iter(match=keys.lock_key(f"{prefix}*"), count=1000)]
        if not left:
            return
        assert time.monotonic() < deadline, f"{len(left)} locks left held, e.g. {left[:3]}"
        await asyncio.sleep(0.05)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (field, ctypes.c_size_t)
        for field in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap_in_use() -> int:
    """Bytes malloc has handed out and not got back (glibc), C and Python alike; 0 elsewhere."""
    libc = ctypes.CDLL(None)
    mallinfo2 = getattr(libc, "mallinfo2", None)
    if mallinfo2 is None:
        return 0
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


async def settled_task_count(baseline: int, within: float = 5.0) -> int:
    """The number of tasks once it is back to *baseline*, or after *within* seconds."""
    for _ in range(int(within / 0.05)):
        if len(asyncio.all_tasks()) <= baseline:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # and it stays there
    return len(asyncio.all_tasks())


# Connection recycling, Redis freezes and losses (issue 18): an instance of
# this test's own, on a Redis of its own (frozen with SIGSTOP), that closes
# every connection after half a second and kills what is left on it one
# second later.

RECYCLING = {"max_connection_age": 500, "max_connection_age_grace": 1_000}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


@asynccontextmanager
async def own_instance(
    redis_server: RedisServer, postgres: PostgresServer, tmp: Path, **server: int
) -> AsyncIterator[App]:
    settings = settings_for(tmp, redis_server.url, postgres.dsn)
    durations: dict[str, Any] = {key: Duration(value) for key, value in server.items()}
    instance = App(replace(settings, server=replace(settings.server, **durations)))
    await instance.start()
    try:
        yield instance
    finally:
        await instance.stop()


@pytest_asyncio.fixture
async def recycling(
    own_redis: RedisServer, postgres_server: PostgresServer, tmp_path: Path
) -> AsyncIterator[App]:
    async with own_instance(own_redis, postgres_server, tmp_path, **RECYCLING) as instance:
        yield instance


@contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """Redis stops answering (its process is stopped) until the block ends."""
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def refused_throughout(client: AsyncClient, name: str, until: asyncio.Event) -> int:
    """Try to take *name* every 50 ms until *until* is set; the number of tries
    (each refused: the test fails at the first one that gets the lock)."""
    tries = 0
    while not until.is_set():
        with contextlib.suppress(LockNotAcquired, Unavailable, DeadlineExceeded):
            got = await client.acquire_lock(name, ttl_ms=10_000, timeout=2)
            raise AssertionError(f"a second client got the held lock {name!r}: {got}")
        tries += 1
        await asyncio.sleep(0.05)
    return tries


async def test_a_hold_outlives_many_connection_ages_and_nobody_else_gets_it(
    recycling: App, name: str
) -> None:
    """The server closes the holder's connection every 0.5 s and kills its
    streams 1 s later: the hold is handed off and resumed each time, the
    token and fencing token unchanged, and the competitor is refused all
    along. (Without the hand-off the kill releases the lock and the
    competitor takes it.)"""
    target = f"127.0.0.1:{recycling.port}"
    done = asyncio.Event()
    async with AsyncClient(target) as holder_client, AsyncClient(target) as other:
        async with holder_client.hold_lock(name, ttl_ms=2_000) as lock:
            competitor = asyncio.create_task(refused_throughout(other, name, done))
            await asyncio.sleep(5)  # ten connection ages, five grace periods
            done.set()
            tries = await competitor
            assert not lock.lost
            lock.check()
        after = await other.acquire_lock(name, ttl_ms=1_000)
    assert tries > 10  # the competitor kept trying (the bound allows for a loaded machine)
    assert after.fencing_token > lock.fencing_token


async def test_a_sync_hold_outlives_many_connection_ages(recycling: App, name: str) -> None:
    target = f"127.0.0.1:{recycling.port}"
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def stop_competing() -> None:
        done.set()
        await competitor  # its last try ends while the lock is still held

    def hold() -> Lock:
        with Client(target) as sync, sync.hold_lock(name, ttl_ms=2_000) as lock:
            time.sleep(4)
            assert not lock.lost
            # Only then release: a try still in flight would rightly get the lock.
            asyncio.run_coroutine_threadsafe(stop_competing(), loop).result(timeout=10)
        return lock

    async with AsyncClient(target) as other:
        holder = asyncio.create_task(asyncio.to_thread(hold))
        await asyncio.sleep(0.3)
        competitor = asyncio.create_task(refused_throughout(other, name, done))
        lock = await holder
        after = await other.acquire_lock(name, ttl_ms=1_000)
    assert after.fencing_token > lock.fencing_token


async def test_a_hold_is_resumed_on_another_instance_when_its_own_drains(
    redis_server: RedisServer, postgres_server: PostgresServer, tmp_path: Path, name: str
) -> None:
    """SIGTERM (App.stop, which `cachecoord serve` runs on it) hands every
    hold off; the client resumes it on the next instance it reaches, and
    the lock stays held, renewed there, past its TTL."""
    async with (
        own_instance(redis_server, postgres_server, tmp_path) as second,
        AsyncClient(f"127.0.0.1:{second.port}") as other,
    ):
        first = App(settings_for(tmp_path, redis_server.url, postgres_server.dsn))
        await first.start()
        # pick_first: the first address while it answers, then the second.
        target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"
        try:
            async with AsyncClient(target) as client, client.hold_lock(name, ttl_ms=1_500) as lock:
                await assert_held(other, name)
                await first.stop()  # drains: hands the hold off, refuses its resume
                await asyncio.sleep(2.0)  # past the TTL: held only if resumed elsewhere
                await assert_held(other, name)
                lock.check()
        finally:
            await first.stop()
        after = await other.acquire_lock(name, ttl_ms=1_000)  # released when the block ended
    assert after.fencing_token > lock.fencing_token


async def test_a_redis_freeze_shorter_than_the_ttl_does_not_lose_a_held_lock(
    recycling: App, own_redis: RedisServer, name: str
) -> None:
    """Redis stops answering for 2 s (renewals time out after 1 s) while a
    lock with a 4 s TTL is held: renewals are retried until one gets through,
    and the lock is never lost or taken by anyone else."""
    raw = aioredis.Redis.from_url(own_redis.url, protocol=2)
    try:
        async with AsyncClient(f"127.0.0.1:{recycling.port}") as client:
            async with client.hold_lock(name, ttl_ms=4_000) as lock:
                await asyncio.sleep(1.5)  # renewed once
                with frozen(own_redis):
                    await asyncio.sleep(2.0)
                await asyncio.sleep(3.0)  # renewed again, and past the last good renewal's TTL
                assert await raw.get(keys.lock_key(name)) == lock.token.encode()
                lock.check()
            assert not await raw.exists(keys.lock_key(name))
    finally:
        await raw.aclose()


async def test_the_block_is_interrupted_within_a_second_of_a_loss(
    client: AsyncClient, redis: aioredis.Redis, name: str
) -> None:
    lost_at = 0.0
    blocked = asyncio.Event()

    async def hold() -> None:
        nonlocal lost_at
        async with client.hold_lock(name, ttl_ms=600) as lock:
            blocked.set()
            await asyncio.sleep(30)  # the work: it must not run on without the lock
        raise AssertionError(f"the block ran on after losing {lock}")

    holder = asyncio.create_task(hold())
    await asyncio.wait_for(blocked.wait(), 5)
    await redis.set(keys.lock_key(name), "someone-else")  # another holder, as after expiry
    lost_at = time.monotonic()
    with pytest.raises(LockLost):
        await asyncio.wait_for(holder, 5)
    interrupted = time.monotonic() - lost_at
    await redis.delete(keys.lock_key(name))

    assert interrupted < 1.0, f"the block learnt of the loss {interrupted:.2f} s later"


async def test_the_sync_holder_is_told_within_a_second_of_a_loss(
    target: str, redis: aioredis.Redis, name: str
) -> None:
    told = threading.Event()
    acquired = threading.Event()

    def hold() -> float:
        seen = 0.0

        def work(sync: Client) -> None:
            nonlocal seen
            with sync.hold_lock(name, ttl_ms=600) as lock:
                acquired.set()
                assert told.wait(5)
                assert lock.wait_lost(5)
                seen = time.monotonic()
                assert lock.lost
                lock.check()  # raises LockLost

        with Client(target) as sync, pytest.raises(LockLost):
            work(sync)
        return seen

    holder = asyncio.create_task(asyncio.to_thread(hold))
    assert await asyncio.to_thread(acquired.wait, 5)
    await redis.set(keys.lock_key(name), "someone-else")
    lost_at = time.monotonic()
    told.set()
    seen = await holder
    await redis.delete(keys.lock_key(name))

    assert seen - lost_at < 1.0, f"told {seen - lost_at:.2f} s after the loss"


async def test_a_stream_without_a_first_message_ends_with_invalid_argument(
    own_redis: RedisServer, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    async with (
        own_instance(
            own_redis, postgres_server, tmp_path, lock_first_message_timeout=300
        ) as instance,
        grpc.aio.insecure_channel(f"127.0.0.1:{instance.port}") as channel,
    ):
        call: HoldCall = pb_grpc.CacheCoordServiceStub(channel).HoldLock(None)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(call.read(), 5)
    assert ended.value.code() is INVALID_ARGUMENT


async def test_a_resume_with_a_token_that_no_longer_holds_the_lock_is_lost(
    stub: pb_grpc.CacheCoordServiceAsyncStub, client: AsyncClient, name: str
) -> None:
    lock = await client.acquire_lock(name, ttl_ms=10_000)
    await client.release_lock(name, lock.token)
    call: HoldCall = stub.HoldLock(None)
    resume = pb.HoldLockRequest.Resume(name=name, token=lock.token, ttl_ms=10_000)
    await call.write(pb.HoldLockRequest(resume=resume))

    event = await asyncio.wait_for(call.read(), 5)
    assert isinstance(event, pb.HoldLockResponse)
    assert event.WhichOneof("kind") == "lost"
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await call.read()
    assert ended.value.code() is ABORTED


async def test_a_resuming_watch_gets_a_reset_and_later_events_across_recycling(
    recycling: App,
) -> None:
    key = uuid.uuid4().hex
    async with (
        AsyncClient(f"127.0.0.1:{recycling.port}") as client,
        client.watch(["blobs"], resume=True) as events,
    ):
        kinds: list[tuple[WatchEventKind, str]] = []
        deadline = time.monotonic() + 5
        while ("reconnecting" not in [r for _, r in kinds]) and time.monotonic() < deadline:
            event = await asyncio.wait_for(anext(events), 5)
            kinds.append((event.kind, event.reason))
        assert (WatchEventKind.RESET, "reconnecting") in kinds, kinds
        # Invalidated again and again: one made while the stream reconnects
        # (it is recycled every 0.5 s) is missed, which the RESET said.
        invalidating = asyncio.create_task(invalidate_repeatedly(client, key))
        try:
            while True:
                event = await asyncio.wait_for(anext(events), 5)
                if event.kind is WatchEventKind.INVALIDATION and event.key == key:
                    break
        finally:
            invalidating.cancel()


async def invalidate_repeatedly(client: AsyncClient, key: str) -> None:
    while True:
        with contextlib.suppress(Unavailable):
            await client.invalidate("blobs", [key])
        await asyncio.sleep(0.1)


async def test_cachecoord_lock_terminates_its_command_when_the_lock_is_lost(
    target: str, redis: aioredis.Redis, name: str
) -> None:
    """``cachecoord lock NAME -- CMD`` sends CMD SIGTERM within a second of
    losing the lock, and exits 64 + ABORTED, not with CMD's own code."""
    script = 'trap "echo terminated; exit 0" TERM; echo held; while :; do sleep 0.05; done'
    proc = await asyncio.create_subprocess_exec(
        CLI,
        "lock",
        "--target",
        target,
        "--ttl-ms",
        "600",
        name,
        "--",
        "sh",
        "-c",
        script,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"held\n"
        await redis.set(keys.lock_key(name), "someone-else")
        lost_at = time.monotonic()
        line = await asyncio.wait_for(proc.stdout.readline(), 5)
        terminated = time.monotonic() - lost_at
        code = await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await redis.delete(keys.lock_key(name))

    assert line == b"terminated\n"
    assert terminated < 1.0, f"SIGTERM came {terminated:.2f} s after the loss"
    assert code == 64 + grpc.StatusCode.ABORTED.value[0]


async def test_a_resume_needs_the_lock_prefix_like_an_acquire(
    redis_server: RedisServer, postgres_server: PostgresServer, tmp_path: Path, name: str
) -> None:
    """With [auth] on, a token whose lock_prefixes do not cover the name may
    not take the lock over with `resume`, even with the holder's token."""
    (tmp_path / "admin.token").write_text("admin-secret-0123456789abcdef")
    (tmp_path / "locker.token").write_text("locker-secret-0123456789abcdef")
    section = f"""
[auth]
enabled = true

[[auth.tokens]]
name = "admin"
token_file = "{tmp_path / "admin.token"}"
lock_prefixes = ["*"]

[[auth.tokens]]
name = "locker"
token_file = "{tmp_path / "locker.token"}"
lock_prefixes = ["report-"]
"""
    settings = settings_for(tmp_path, redis_server.url, postgres_server.dsn, extra=section)
    instance = App(settings)
    await instance.start()
    try:
        address = f"127.0.0.1:{instance.port}"
        async with AsyncClient(address, token="admin-secret-0123456789abcdef") as admin:
            lock = await admin.acquire_lock(name, ttl_ms=10_000)
            async with grpc.aio.insecure_channel(address) as channel:
                call: HoldCall = pb_grpc.CacheCoordServiceStub(channel).HoldLock(
                    None, metadata=(("authorization", "Bearer locker-secret-0123456789abcdef"),)
                )
                resume = pb.HoldLockRequest.Resume(name=name, token=lock.token, ttl_ms=10_000)
                await call.write(pb.HoldLockRequest(resume=resume))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await asyncio.wait_for(call.read(), 5)
            await admin.release_lock(name, lock.token)  # still the admin's
    finally:
        await instance.stop()
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_a_resuming_sync_watch_gets_a_reset_and_later_events_across_recycling(
    recycling: App,
) -> None:
    key = uuid.uuid4().hex
    address = f"127.0.0.1:{recycling.port}"
    reconnected = threading.Event()
    streams: list[WatchStream] = []

    def watch() -> list[tuple[WatchEventKind, str]]:
        seen: list[tuple[WatchEventKind, str]] = []
        with Client(address) as sync, sync.watch(["blobs"], resume=True) as events:
            streams.append(events)
            for event in events:
                seen.append((event.kind, event.reason))
                if event.reason == "reconnecting":
                    reconnected.set()
                if event.kind is WatchEventKind.INVALIDATION and event.key == key:
                    return seen
        return seen

    watcher = asyncio.create_task(asyncio.to_thread(watch))
    try:
        assert await asyncio.to_thread(reconnected.wait, 10)
        async with AsyncClient(address) as client:
            invalidating = asyncio.create_task(invalidate_repeatedly(client, key))
            try:
                seen = await asyncio.wait_for(asyncio.shield(watcher), 10)
            finally:
                invalidating.cancel()
    finally:
        for stream in streams:  # a failed test must not leave the thread blocked
            stream.close()
    assert (WatchEventKind.RESET, "reconnecting") in seen
    assert seen[-1][0] is WatchEventKind.INVALIDATION


async def test_a_hold_that_waited_longer_than_its_ttl_keeps_the_lock_it_got(
    client: AsyncClient, name: str
) -> None:
    # The TTL runs from the call that took the lock, not from when the wait
    # for it began: a hold that waited 1 s for a 300 ms TTL was declared lost
    # at its first renewal (and the lock it had just been granted released).
    first = await client.acquire_lock(name, ttl_ms=1_000)
    async with client.hold_lock(name, ttl_ms=300, wait_timeout_ms=5_000) as lock:
        assert lock.fencing_token > first.fencing_token
        await asyncio.sleep(1.0)  # about ten renewals
        await assert_held(client, name)


async def test_closing_the_client_interrupts_its_hold_block(target: str, name: str) -> None:
    # Closing the channel cancels the stream (the server releases the lock):
    # the block must not run on as if it still held it.
    holder_client = AsyncClient(target)
    entered = asyncio.Event()

    async def block() -> None:
        async with holder_client.hold_lock(name, ttl_ms=5_000):
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(block())
    await asyncio.wait_for(entered.wait(), 5)
    await holder_client.close()
    with pytest.raises(LockLost):
        await asyncio.wait_for(task, 2)
