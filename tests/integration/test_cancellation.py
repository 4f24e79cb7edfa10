"""A call its client cancels (or whose deadline passes) while the server is
still working on it: no error in the server's log, and no Redis connection
beyond ``redis.max_connections`` (issue 20, item 6).

The instance runs on a Redis of its own, so CLIENT LIST counts only its
connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from strategy_support import ServeProcess, redis_client, serve_config

from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2_grpc as pb_grpc
from conftest import NAMESPACES
from local_servers import PostgresServer, RedisServer, free_port

MAX_CONNECTIONS = 8


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def serve(
    own_redis: RedisServer, postgres_server: PostgresServer, tmp_path: Path
) -> AsyncIterator[ServeProcess]:
    """``cachecoord serve`` (uvloop, as in production) with a narrow Redis pool."""
    listen = f"127.0.0.1:{free_port()}"
    config = serve_config(
        tmp_path,
        listen=listen,
        redis_url=own_redis.url,
        postgres_url=postgres_server.dsn,
        instance_id="cancelled",
        namespaces=NAMESPACES,
    )
    text = config.read_text()
    config.write_text(
        text.replace(
            f'url = "{own_redis.url}"',
            f'url = "{own_redis.url}"\nmax_connections = {MAX_CONNECTIONS}',
        )
    )
    process = ServeProcess(config, listen, tmp_path / "serve.log")
    await process.start()
    try:
        yield process
    finally:
        await process.terminate()


async def redis_connections(url: str) -> int:
    """Connections of clients other than the one asking."""
    async with redis_client(url) as client:
        listed = await client.client_list()
    return len(listed) - 1


async def cancel_many(stub: pb_grpc.CacheCoordServiceAsyncStub, rounds: int) -> None:
    """Start Gets and BatchGets of keys nobody cached (each loads PostgreSQL
    through Redis) and cancel them part-way."""
    for n in range(rounds):
        calls: list[Any] = []
        for i in range(25):
            keys = [f"cancel-{n}-{i}-{j}" for j in range(20)]
            calls.append(stub.BatchGet(pb.BatchGetRequest(namespace="blobs", keys=keys)))
            calls.append(stub.Get(pb.GetRequest(namespace="users", key=str(10_000 + n * 25 + i))))
        await asyncio.sleep(0.001 * (n % 17))
        for call in calls:
            call.cancel()
        for call in calls:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                await call


async def test_cancelled_calls_log_no_error_and_stay_within_max_connections(
    serve: ServeProcess, own_redis: RedisServer
) -> None:
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, await redis_connections(own_redis.url))
            await asyncio.sleep(0.01)

    async with grpc.aio.insecure_channel(serve.target) as channel:
        stub: pb_grpc.CacheCoordServiceAsyncStub = pb_grpc.CacheCoordServiceStub(channel)
        await stub.Get(pb.GetRequest(namespace="users", key="1"), timeout=5)  # connected
        sampler = asyncio.create_task(sample())
        try:
            await cancel_many(stub, 200)
            await asyncio.sleep(0.5)  # cancelled handlers finish
        finally:
            sampler.cancel()
        settled = await redis_connections(own_redis.url)
        # Still serving.
        got = await stub.Get(pb.GetRequest(namespace="users", key="1"), timeout=5)
        # More work, so that the server's garbage collector runs: a leaked
        # pipeline is reported when it is collected.
        for n in range(300):
            await stub.BatchGet(
                pb.BatchGetRequest(namespace="blobs", keys=[f"after-{n}-{j}" for j in range(20)])
            )

    log = serve.output()
    errors = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]
    # The pool, plus the instance's own subscriber connections (the bus).
    subscribers = 2
    assert got.found
    assert errors == [], log
    assert peak <= MAX_CONNECTIONS + subscribers, peak
    assert settled <= MAX_CONNECTIONS + subscribers, settled
