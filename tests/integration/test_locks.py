"""Distributed locks through real gRPC against a real Redis (design 4.3).

AcquireLock / ReleaseLock / ExtendLock: mutual exclusion, fencing tokens that
follow acquisition order (also across a Redis restart), holder-only release
and extend, waiters woken by release notices, TTL expiry, and input checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from itertools import pairwise
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from cachecoord.app import App
from cachecoord.storage.keys import lock_key
from cachecoord_client import AsyncClient, CacheCoordError, Lock
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2_grpc as pb_grpc
from conftest import settings_for
from local_servers import PostgresServer, RedisServer

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
ABORTED = grpc.StatusCode.ABORTED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def name() -> str:
    """A lock name no other test uses."""
    return f"lock-{uuid.uuid4().hex[:12]}"


async def assert_held(client: AsyncClient, name: str) -> None:
    """Someone holds *name*: an acquire that does not wait is refused with ABORTED."""
    with pytest.raises(CacheCoordError) as refused:
        await client.acquire_lock(name, ttl_ms=1_000, wait_timeout_ms=0)
    assert refused.value.code is ABORTED, refused.value


async def assert_free(client: AsyncClient, name: str) -> Lock:
    """Nobody holds *name*: an acquire that does not wait succeeds (the lock is kept)."""
    return await client.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=0)


async def test_acquire_returns_token_and_fencing_token(client: AsyncClient, name: str) -> None:
    lock = await client.acquire_lock(name, ttl_ms=10_000)

    assert lock.name == name
    assert lock.token
    assert lock.fencing_token > 0
    await client.release_lock(name, lock.token)


async def test_fencing_tokens_increase_with_each_acquisition(
    client: AsyncClient, name: str
) -> None:
    tokens = []
    for _ in range(3):
        lock = await client.acquire_lock(name, ttl_ms=10_000)
        tokens.append(lock.fencing_token)
        await client.release_lock(name, lock.token)

    assert all(a < b for a, b in pairwise(tokens)), tokens


async def test_concurrent_acquirers_never_overlap_and_fencing_follows_acquisition_order(
    client: AsyncClient, name: str
) -> None:
    inside: list[int] = []  # workers holding the lock right now
    most_inside = 0
    journal: list[tuple[str, int]] = []
    fencing_in_order: list[int] = []

    async def worker(i: int) -> None:
        nonlocal most_inside
        lock = await client.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=30_000)
        inside.append(i)
        most_inside = max(most_inside, len(inside))
        journal.append(("enter", i))
        fencing_in_order.append(lock.fencing_token)
        await asyncio.sleep(0.005)  # hold it across a few event-loop turns
        journal.append(("exit", i))
        inside.remove(i)
        await client.release_lock(name, lock.token)

    await asyncio.gather(*(worker(i) for i in range(20)))

    assert most_inside == 1
    entered = [i for event, i in journal if event == "enter"]
    assert sorted(entered) == list(range(20))
    assert journal == [event for i in entered for event in (("enter", i), ("exit", i))]
    assert all(a < b for a, b in pairwise(fencing_in_order)), fencing_in_order


async def test_release_with_wrong_token_is_refused_and_lock_stays_held(
    client: AsyncClient, name: str
) -> None:
    lock = await client.acquire_lock(name, ttl_ms=10_000)

    with pytest.raises(CacheCoordError) as refused:
        await client.release_lock(name, "not-the-token")

    assert refused.value.code is FAILED_PRECONDITION, refused.value
    await assert_held(client, name)
    await client.release_lock(name, lock.token)
    await client.release_lock(name, (await assert_free(client, name)).token)


async def test_release_twice_is_refused(client: AsyncClient, name: str) -> None:
    lock = await client.acquire_lock(name, ttl_ms=10_000)
    await client.release_lock(name, lock.token)

    with pytest.raises(CacheCoordError) as refused:
        await client.release_lock(name, lock.token)

    assert refused.value.code is FAILED_PRECONDITION, refused.value


async def test_holder_extends_lock_past_its_original_ttl(client: AsyncClient, name: str) -> None:
    lock = await client.acquire_lock(name, ttl_ms=200)

    await client.extend_lock(name, lock.token, ttl_ms=10_000)

    # Without the extension this waiter would get the lock after ~200 ms.
    with pytest.raises(CacheCoordError) as refused:
        await client.acquire_lock(name, ttl_ms=1_000, wait_timeout_ms=500)
    assert refused.value.code is ABORTED, refused.value
    await client.release_lock(name, lock.token)


async def test_extend_with_wrong_token_is_refused(client: AsyncClient, name: str) -> None:
    lock = await client.acquire_lock(name, ttl_ms=10_000)

    with pytest.raises(CacheCoordError) as refused:
        await client.extend_lock(name, "not-the-token", ttl_ms=10_000)

    assert refused.value.code is FAILED_PRECONDITION, refused.value
    await assert_held(client, name)
    await client.release_lock(name, lock.token)


async def test_acquire_without_wait_while_held_is_aborted(client: AsyncClient, name: str) -> None:
    lock = await client.acquire_lock(name, ttl_ms=10_000)
    started = time.monotonic()

    with pytest.raises(CacheCoordError) as refused:
        await client.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=0)

    assert refused.value.code is ABORTED, refused.value
    assert name in refused.value.details
    assert time.monotonic() - started < 1.0
    await client.release_lock(name, lock.token)


async def test_waiter_wakes_on_release_not_ttl(client: AsyncClient, name: str) -> None:
    holder = await client.acquire_lock(name, ttl_ms=10_000)
    started = time.monotonic()
    waiter = asyncio.create_task(client.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=5_000))
    try:
        await asyncio.sleep(0.1)  # let the waiter reach the server and start waiting
        assert not waiter.done(), f"the waiter did not wait for the holder: {waiter}"
        await client.release_lock(name, holder.token)
        got = await waiter
    finally:
        waiter.cancel()
    waited = time.monotonic() - started

    # Neither the holder's TTL (10 s) nor the wait timeout (5 s) ended the wait.
    assert waited < 2.0, f"waiter took {waited:.2f} s: woken by a timer, not the release"
    assert got.fencing_token > holder.fencing_token
    await client.release_lock(name, got.token)


async def test_expired_lock_can_be_taken_by_another(client: AsyncClient, name: str) -> None:
    first = await client.acquire_lock(name, ttl_ms=200)
    await assert_held(client, name)
    started = time.monotonic()

    second = await client.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=3_000)

    assert time.monotonic() - started < 2.0
    assert second.fencing_token > first.fencing_token
    # The first holder lost it: its token neither extends nor releases.
    late_calls: list[Callable[[], Awaitable[None]]] = [
        lambda: client.extend_lock(name, first.token, ttl_ms=10_000),
        lambda: client.release_lock(name, first.token),
    ]
    for late in late_calls:
        with pytest.raises(CacheCoordError) as refused:
            await late()
        assert refused.value.code is FAILED_PRECONDITION, refused.value
    await assert_held(client, name)
    await client.release_lock(name, second.token)


@pytest.mark.parametrize(
    ("lock_name", "ttl_ms", "wait_timeout_ms", "field"),
    [
        pytest.param("", 1_000, 0, "name", id="empty-name"),
        pytest.param("x" * 513, 1_000, 0, "name", id="name-too-long"),
        pytest.param("a\x00b", 1_000, 0, "name", id="nul-in-name"),
        pytest.param("ok", 0, 0, "ttl_ms", id="zero-ttl"),
        pytest.param("ok", 3, 0, "ttl_ms", id="ttl-below-the-minimum"),
        pytest.param("ok", -5, 0, "ttl_ms", id="negative-ttl"),
        pytest.param("ok", 86_400_001, 0, "ttl_ms", id="ttl-over-a-day"),
        pytest.param("ok", 1_000, -1, "wait_timeout_ms", id="negative-wait"),
    ],
)
async def test_acquire_rejects_invalid_input_naming_the_field(
    client: AsyncClient, lock_name: str, ttl_ms: int, wait_timeout_ms: int, field: str
) -> None:
    with pytest.raises(CacheCoordError) as rejected:
        await client.acquire_lock(lock_name, ttl_ms=ttl_ms, wait_timeout_ms=wait_timeout_ms)

    assert rejected.value.code is INVALID_ARGUMENT, rejected.value
    assert field in rejected.value.details


async def test_release_and_extend_reject_invalid_input_naming_the_field(
    client: AsyncClient, name: str
) -> None:
    lock = await client.acquire_lock(name, ttl_ms=10_000)
    calls: list[tuple[Callable[[], Awaitable[None]], str]] = [
        (lambda: client.release_lock("", lock.token), "name"),
        (lambda: client.extend_lock("", lock.token, ttl_ms=1_000), "name"),
        (lambda: client.extend_lock(name, lock.token, ttl_ms=0), "ttl_ms"),
        (lambda: client.extend_lock(name, lock.token, ttl_ms=-1), "ttl_ms"),
    ]
    for call, field in calls:
        with pytest.raises(CacheCoordError) as rejected:
            await call()
        assert rejected.value.code is INVALID_ARGUMENT, rejected.value
        assert field in rejected.value.details

    await assert_held(client, name)
    await client.release_lock(name, lock.token)


# Fencing across a Redis restart: a Redis and an instance of this test's own.


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server without persistence: a restart loses every key."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest_asyncio.fixture
async def own_app(
    own_redis: RedisServer, postgres_server: PostgresServer, tmp_path: Path
) -> AsyncIterator[App]:
    instance = App(settings_for(tmp_path, own_redis.url, postgres_server.dsn))
    await instance.start()
    try:
        yield instance
    finally:
        await instance.stop()


async def test_fencing_tokens_keep_increasing_across_a_redis_restart(
    own_redis: RedisServer, own_app: App, name: str
) -> None:
    async with AsyncClient(f"127.0.0.1:{own_app.port}") as client:
        before = await client.acquire_lock(name, ttl_ms=10_000)
        await client.release_lock(name, before.token)

        await asyncio.to_thread(own_redis.kill)
        await asyncio.to_thread(own_redis.restart)
        raw = aioredis.Redis.from_url(own_redis.url)
        try:
            # (Other keys may be back already: the instance's write-behind
            # flushers recreate their queues at once.)
            fencing = f"cc:lock:{{{name}}}:fencing"
            assert not await raw.exists(fencing), "the restart was meant to lose Redis' data"
        finally:
            await raw.aclose()

        after = await client.acquire_lock(name, ttl_ms=10_000)

    assert after.fencing_token > before.fencing_token


async def test_waiters_are_woken_when_the_subscription_drops(
    own_redis: RedisServer, own_app: App, name: str
) -> None:
    """Release notices sent while the instance's subscription was down are
    lost: when it subscribes again, every waiter tries again at once instead
    of sleeping until the holder's TTL would have run out."""
    async with AsyncClient(f"127.0.0.1:{own_app.port}") as client:
        holder = await client.acquire_lock(name, ttl_ms=30_000)
        started = time.monotonic()
        waiter = asyncio.create_task(
            client.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=20_000)
        )
        raw = aioredis.Redis.from_url(own_redis.url)
        try:
            await asyncio.sleep(0.1)  # let the waiter reach the server and start waiting
            assert not waiter.done(), f"the waiter did not wait for the holder: {waiter}"
            # The holder's lock goes without a release notice (as if the
            # notice had been published while nobody listened)...
            assert await raw.delete(lock_key(name)) == 1
            # ...and the subscription drops.
            assert await raw.client_kill_filter(_type="pubsub") == 1
            got = await asyncio.wait_for(waiter, 10)
        finally:
            waiter.cancel()
            await raw.aclose()
    waited = time.monotonic() - started
    assert waited < 5.0, f"waiter took {waited:.2f} s: woken by the holder's TTL, not the reset"
    assert got.fencing_token > holder.fencing_token


async def test_acquisitions_whose_callers_gave_up_leave_no_lock_behind(
    own_redis: RedisServer, own_app: App
) -> None:
    """200 AcquireLocks with deadlines of 1-20 ms and 50 cancelled ones, each
    for a lock of its own with a 60 s TTL: every lock left in Redis is one
    that a caller got the token of (one taken after its caller gave up is
    released at once, and none is started without time to finish)."""
    prefix = f"orphan-{uuid.uuid4().hex[:8]}"
    granted: dict[str, str] = {}

    async def acquire(client: AsyncClient, name: str, deadline: float) -> None:
        with contextlib.suppress(CacheCoordError):
            lock = await client.acquire_lock(name, ttl_ms=60_000, timeout=deadline)
            granted[name] = lock.token

    async with AsyncClient(f"127.0.0.1:{own_app.port}") as client:
        await client.acquire_lock(f"{prefix}-warm", ttl_ms=60_000)  # connected
        timed = [acquire(client, f"{prefix}-{i}", (1 + i % 20) / 1000) for i in range(200)]
        await asyncio.gather(*timed)
        cancelled = [asyncio.create_task(acquire(client, f"{prefix}-c{i}", 5)) for i in range(50)]
        await asyncio.sleep(0)
        for i, task in enumerate(cancelled):
            await asyncio.sleep(i % 5 / 1000)
            task.cancel()
        await asyncio.gather(*cancelled, return_exceptions=True)

    raw = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        orphans: dict[str, str] = {}
        for _ in range(40):  # releases of late locks run in the background: let them
            orphans = {}
            async for key in raw.scan_iter(f"cc:lock:{{{prefix}-*}}"):
                name = key.removeprefix("cc:lock:{").removesuffix("}")
                if key.endswith(":fencing") or name.endswith("-warm"):
                    continue
                token = await raw.get(key)
                if token is not None and granted.get(name) != token:
                    orphans[name] = str(token)
            if not orphans:
                break
            await asyncio.sleep(0.05)
    finally:
        await raw.aclose()

    assert orphans == {}, f"{len(orphans)} locks nobody got the token of"


async def test_a_lock_taken_with_the_callers_token_is_released_by_it_without_the_answer(
    app: App, client: AsyncClient, name: str
) -> None:
    """A caller that picks the token (AcquireLockRequest.token) can release
    the lock even if the answer never reached it; a guessable token is refused."""
    token = uuid.uuid4().hex
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.CacheCoordServiceStub(channel)
        await stub.AcquireLock(pb.AcquireLockRequest(name=name, ttl_ms=60_000, token=token))
        await assert_held(client, name)
        await client.release_lock(name, token)
        with pytest.raises(grpc.aio.AioRpcError) as short:
            await stub.AcquireLock(pb.AcquireLockRequest(name=name, ttl_ms=60_000, token="abc"))
    assert short.value.code() is INVALID_ARGUMENT
    lock = await assert_free(client, name)
    await client.release_lock(name, lock.token)
