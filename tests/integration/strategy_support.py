"""Helpers shared by the strategy tests: extra cachecoord instances (in-process
and as ``cachecoord serve`` processes), write-behind namespace settings, and
direct looks at PostgreSQL and Redis, the way an operator would check them.

Not a conftest: a second ``conftest.py`` under tests/integration would shadow
``from conftest import settings_for`` for every other test module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar, cast

import grpc
import psycopg
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.exceptions import ResponseError

from cachecoord.app import App
from cachecoord.config import Settings, load
from cachecoord.storage import envelope
from cachecoord.storage.keys import KeySpace
from cachecoord_client import AsyncClient
from conftest import Backend

T = TypeVar("T")

CLI = str(Path(sys.executable).with_name("cachecoord"))
GROUP = "cachecoord"  # the flushers' consumer group (strategies/flusher.py)
# Reconnect quickly to a server that is (re)starting; the default backoff is 1 s and up.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
]


def unique_namespace(prefix: str) -> str:
    """A namespace name no other test (or instance) serves."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def write_behind(name: str, **options: str | int) -> str:
    """TOML of a managed write-behind namespace that flushes and retries quickly;
    *options* override or add settings (strings are quoted, ints are not)."""
    settings: dict[str, str | int] = {
        "kind": "managed",
        "strategy": "write-behind",
        "flush_interval": "50ms",
        "retry_after": "200ms",
        "claim_idle": "1s",
        "max_attempts": 3,
        "partitions": 4,
        **options,
    }
    lines = [f"[namespaces.{name}]"]
    lines += [f"{k} = {v!r}" if isinstance(v, int) else f'{k} = "{v}"' for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def named(settings: Settings, instance_id: str) -> Settings:
    """*settings* with ``server.instance_id`` set (two in-process instances
    would otherwise share host-pid, and with it one stream consumer name)."""
    return dataclasses.replace(
        settings, server=dataclasses.replace(settings.server, instance_id=instance_id)
    )


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[App, AsyncClient]]:
    """An in-process instance and a client of it; stopped on the way out."""
    app = App(settings)
    await app.start()
    try:
        async with AsyncClient(f"127.0.0.1:{app.port}") as client:
            yield app, client
    finally:
        await app.stop()


async def poll(read: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, within: float) -> T:
    """Call *read* until *done* holds for its result or *within* seconds pass;
    return the last result (the caller asserts on it, for a useful message)."""
    deadline = time.monotonic() + within
    delay = 0.01
    while True:
        result = await read()
        if done(result) or time.monotonic() >= deadline:
            return result
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


# -- PostgreSQL --------------------------------------------------------------


async def managed_row(dsn: str, namespace: str, key: str) -> tuple[bytes, int] | None:
    """(value, version) of a managed key as PostgreSQL holds it, or None."""
    rows = await managed_rows(dsn, namespace)
    return rows.get(key)


async def managed_rows(dsn: str, namespace: str) -> dict[str, tuple[bytes, int]]:
    """Every stored key of a managed namespace: key -> (value, version)."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT e.key, e.value, v.version FROM cachecoord.entries e "
            "JOIN cachecoord.versions v USING (namespace, key) WHERE namespace = %s",
            (namespace,),
        )
        return {key: (bytes(value), version) async for key, value, version in cur}


@asynccontextmanager
async def entries_locked(dsn: str) -> AsyncIterator[None]:
    """Hold an EXCLUSIVE lock on cachecoord.entries (reads pass, writes wait):
    PostgreSQL is up but every flush blocks mid-transaction, as under a slow
    database, until the block ends."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute("LOCK TABLE cachecoord.entries IN EXCLUSIVE MODE")
        try:
            yield
        finally:
            await conn.rollback()


# -- Redis -------------------------------------------------------------------


@asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


async def queue_depth(url: str, namespace: str, partitions: int) -> tuple[int, int]:
    """(entries still in the namespace's queues, entries delivered to a flusher
    but not acknowledged). Flushed entries are deleted, so (0, 0) is drained."""
    queued = pending = 0
    async with redis_client(url) as client:
        for queue in KeySpace(namespace, partitions).queues:
            queued += int(await client.xlen(queue))
            try:
                summary = await client.xpending(queue, GROUP)
            except ResponseError:
                continue  # no group yet: nothing delivered
            pending += int(summary["pending"])
    return queued, pending


async def cached_value(url: str, redis_key: str) -> bytes | None:
    """The payload of the envelope stored at *redis_key* (None: absent or "not found")."""
    async with redis_client(url) as client:
        raw = cast("bytes | None", await client.get(redis_key))
    return None if raw is None else envelope.decode(raw).value


# -- `cachecoord serve` processes --------------------------------------------


class ServeProcess:
    """A ``cachecoord serve --config FILE`` process, its output in a log file."""

    def __init__(self, config: Path, target: str, log: Path) -> None:
        self.config = config
        self.target = target
        self.log = log
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the process and wait until grpc.health.v1 reports SERVING (30 s)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CACHECOORD_")}
        with self.log.open("ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                CLI,
                "serve",
                "--config",
                str(self.config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
            )
        await self._wait_serving(30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs, nothing is drained or acknowledged."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGKILL)
        await self._proc.wait()

    async def terminate(self) -> None:
        """SIGTERM and wait (10 s); kill if it does not stop."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def _wait_serving(self, within: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + within
        request = health_pb2.HealthCheckRequest(service="")
        async with grpc.aio.insecure_channel(self.target, options=FAST_RECONNECT) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while self._proc.returncode is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"not SERVING within {within} s:\n{self.output()}")
                try:
                    response = await stub.Check(request, timeout=1)
                except grpc.aio.AioRpcError:
                    pass  # not listening yet
                else:
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.05)
        raise AssertionError(f"cachecoord serve exited:\n{self.output()}")


def serve_config(
    tmp: Path, *, listen: str, redis_url: str, postgres_url: str, instance_id: str, namespaces: str
) -> Path:
    """A TOML file for ``cachecoord serve`` (the format of conftest.settings_for)."""
    path = tmp / f"serve-{instance_id}.toml"
    path.write_text(
        f"""
[server]
listen = "{listen}"
instance_id = "{instance_id}"
shutdown_grace = "1s"

[redis]
url = "{redis_url}"

[postgres]
url = "{postgres_url}"
outbox_interval = "200ms"

{namespaces}
"""
    )
    return path


Instance = tuple[App, AsyncClient]
Start = Callable[[], Awaitable[Instance]]


@asynccontextmanager
async def instances(
    backend: Backend, tmp: Path, namespaces: str, name: str
) -> AsyncIterator[Start]:
    """Start instances (``name-1``, ``name-2``...) serving *namespaces* on one
    Redis and one database, in this process; stop them all on the way out."""
    running: list[Instance] = []

    async def start_one() -> Instance:
        config = serve_config(
            tmp,
            listen="127.0.0.1:0",
            redis_url=backend.url,
            postgres_url=backend.dsn,
            instance_id=f"{name}-{len(running) + 1}",
            namespaces=namespaces,
        )
        app = App(load(config, backend.env))
        await app.start()
        client = AsyncClient(f"127.0.0.1:{app.port}")
        running.append((app, client))
        return app, client

    try:
        yield start_one
    finally:
        for app, client in running:
            await client.close()
            await app.stop()
