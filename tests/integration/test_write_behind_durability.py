"""Write-behind durability under SIGKILL (design 3.4, README "Guarantees"):
an acknowledged Put survives a crash of the cachecoord process, and, with
Redis' AOF at ``appendfsync always``, a crash of Redis itself.

Twenty clients write their own keys through a real ``cachecoord serve``
process while PostgreSQL is held up by a lock, so at the crash nothing has
been flushed: every acknowledged write is only in Redis (queued, or read by a
flusher and not acknowledged). A write whose call failed may or may not have
landed; the final value of each key in PostgreSQL must be its last
acknowledged value or one of those.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from strategy_support import (
    FAST_RECONNECT,
    ServeProcess,
    entries_locked,
    managed_rows,
    poll,
    queue_depth,
    redis_client,
    serve_config,
    unique_namespace,
    write_behind,
)

from cachecoord_client import AsyncClient, CacheCoordError
from local_servers import RedisServer, free_port

CLIENTS = 20
KEYS_PER_CLIENT = 3
PARTITIONS = 4
ACKED_BEFORE_CRASH = 600


@dataclass
class KeyHistory:
    """What the writer of one key knows about it."""

    acked: bytes | None = None
    acked_version: int = 0
    failed: list[bytes] = field(default_factory=list)
    """Values whose Put failed: each may or may not have been applied."""


class Writers:
    """CLIENTS concurrent clients, each writing its own keys in turn until
    its first failed call."""

    def __init__(self, target: str, namespace: str) -> None:
        self.target = target
        self.namespace = namespace
        self.keys = {
            f"c{c}-k{k}": KeyHistory() for c in range(CLIENTS) for k in range(KEYS_PER_CLIENT)
        }
        self.acks = 0
        self.errors: Counter[str] = Counter()
        self._progress = asyncio.Condition()

    async def run(self) -> None:
        await asyncio.gather(*(self._client(c) for c in range(CLIENTS)))

    async def acknowledged(self, count: int) -> None:
        """Wait until *count* Puts have been acknowledged in all."""
        async with self._progress:
            await asyncio.wait_for(self._progress.wait_for(lambda: self.acks >= count), 20)

    async def _client(self, c: int) -> None:
        async with AsyncClient(self.target, options=FAST_RECONNECT) as client:
            n = 0
            while True:
                key = f"c{c}-k{n % KEYS_PER_CLIENT}"
                value = f"{key}:{n}".encode()
                n += 1
                history = self.keys[key]
                try:
                    version = await client.put(self.namespace, key, value, timeout=5)
                except CacheCoordError as err:
                    history.failed.append(value)
                    self.errors[err.code.name] += 1
                    return
                history.acked, history.acked_version = value, version
                history.failed.clear()  # superseded: each came before the acked one
                async with self._progress:
                    self.acks += 1
                    self._progress.notify_all()

    def lost(self, rows: dict[str, tuple[bytes, int]]) -> dict[str, str]:
        """Keys whose PostgreSQL row is not their last acknowledged write (or a
        later write whose call failed), with what is wrong."""
        lost = {}
        for key, history in self.keys.items():
            if history.acked is None:
                continue
            value, version = rows.get(key, (b"<no row>", 0))
            if value != history.acked and value not in history.failed:
                lost[key] = f"acked {history.acked!r}, PostgreSQL has {value!r}"
            elif version < history.acked_version:
                lost[key] = f"acked version {history.acked_version}, PostgreSQL has {version}"
        return lost


@dataclass
class Deployment:
    """A write-behind namespace of its own, served on one address."""

    redis: RedisServer
    dsn: str
    tmp: Path
    namespace: str = field(default_factory=lambda: unique_namespace("durable"))
    target: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")

    def process(self, name: str) -> ServeProcess:
        """A ``cachecoord serve`` of the namespace; *name* is its instance id
        (and so its consumer name in the queues' consumer group)."""
        config = serve_config(
            self.tmp,
            listen=self.target,
            redis_url=self.redis.url,
            postgres_url=self.dsn,
            instance_id=name,
            namespaces=write_behind(self.namespace, partitions=PARTITIONS),
        )
        return ServeProcess(config, self.target, self.tmp / f"{name}.log")

    async def drained(self) -> tuple[int, int]:
        """(queued, pending) once the queues are empty, or after 20 s."""
        return await poll(
            lambda: queue_depth(self.redis.url, self.namespace, PARTITIONS),
            lambda depth: depth == (0, 0),
            within=20,
        )

    async def dead_letters(self) -> int:
        async with redis_client(self.redis.url) as client:
            return int(await client.xlen(f"cc:wb:{{{self.namespace}}}:dead"))


@pytest_asyncio.fixture(loop_scope="session")
async def volatile_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A Redis of the test's own, without persistence: a cachecoord crash
    must not need it."""
    server = RedisServer(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.stop)


@pytest_asyncio.fixture(loop_scope="session")
async def durable_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A Redis of the test's own, with AOF and ``appendfsync always``."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.stop)


@pytest.mark.timeout(60)
async def test_no_acknowledged_write_is_lost_when_cachecoord_is_killed(
    volatile_redis: RedisServer, own_database: str, tmp_path: Path
) -> None:
    deployment = Deployment(volatile_redis, own_database, tmp_path)
    # The restarted process has another name: it must claim the dead one's
    # pending entries (after claim_idle), not just find them its own.
    first, second = deployment.process("first"), deployment.process("second")
    writers = Writers(deployment.target, deployment.namespace)
    try:
        await first.start()
        async with entries_locked(own_database):  # nothing reaches PostgreSQL yet
            load = asyncio.create_task(writers.run())
            await writers.acknowledged(ACKED_BEFORE_CRASH)
            await first.kill()
            await asyncio.wait_for(load, 10)  # every client saw its call fail
            at_kill = await queue_depth(volatile_redis.url, deployment.namespace, PARTITIONS)
        await second.start()
        drained = await deployment.drained()
        rows = await managed_rows(own_database, deployment.namespace)
    finally:
        await first.terminate()
        await second.terminate()

    queued, pending = at_kill
    assert queued >= writers.acks > 0, f"{at_kill}: writes were flushed before the kill"
    assert pending > 0, "no flush was in progress at the kill"
    assert drained == (0, 0), second.output()
    assert await deployment.dead_letters() == 0
    assert writers.lost(rows) == {}
    assert set(writers.errors) == {"UNAVAILABLE"}, writers.errors


@pytest.mark.timeout(60)
async def test_no_acknowledged_write_is_lost_when_redis_is_killed_with_aof(
    durable_redis: RedisServer, own_database: str, tmp_path: Path
) -> None:
    deployment = Deployment(durable_redis, own_database, tmp_path)
    server = deployment.process("server")
    writers = Writers(deployment.target, deployment.namespace)
    try:
        await server.start()
        async with entries_locked(own_database):  # nothing reaches PostgreSQL yet
            load = asyncio.create_task(writers.run())
            await writers.acknowledged(ACKED_BEFORE_CRASH)
            await asyncio.to_thread(durable_redis.kill)
            await asyncio.wait_for(load, 10)  # every client saw its call fail
            await asyncio.to_thread(durable_redis.start)  # replays the AOF
            after = await queue_depth(durable_redis.url, deployment.namespace, PARTITIONS)
        drained = await deployment.drained()
        rows = await managed_rows(own_database, deployment.namespace)
    finally:
        await server.terminate()

    queued, pending = after
    assert queued >= writers.acks > 0, f"{after}: acknowledged writes missing after the restart"
    assert pending > 0, "no flush was in progress at the kill"
    assert drained == (0, 0), server.output()
    assert await deployment.dead_letters() == 0
    assert writers.lost(rows) == {}
    assert set(writers.errors) == {"UNAVAILABLE"}, (writers.errors, server.output())
