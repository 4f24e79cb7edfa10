"""Redis Cluster mode (``redis.cluster = true``) against a private 6-node
cluster (3 primaries, 3 replicas): the strategy suite's essentials on two
instances, batches across slots, pub/sub through one node, locks, and a
primary killed under write-behind load.

Every test starts from a URL of one node only; the clients discover the rest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from strategy_support import managed_row, named, poll, serving

from cachecoord.app import App
from cachecoord.storage.keys import KeySpace
from cachecoord_client import AsyncClient, CacheCoordError, Layer
from conftest import NAMESPACES, Backend, new_database
from local_servers import PostgresServer, RedisCluster

NEAR = """
[namespaces.nearby]
kind = "managed"
ttl = "5m"
near_cache_entries = 100
near_cache_ttl = "60s"
"""


Pair = tuple[tuple[App, AsyncClient], tuple[App, AsyncClient]]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pair(
    cluster_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Pair]:
    """Two instances on the session's cluster and its database (conftest's
    cluster_backend), each given a different node's URL."""
    tmp = tmp_path_factory.mktemp("cluster")
    urls = cluster_backend.urls
    first = cluster_backend.settings(tmp, url=urls[0], namespaces=NAMESPACES + NEAR)
    second = cluster_backend.settings(tmp, url=urls[4], namespaces=NAMESPACES + NEAR)
    async with (
        serving(named(first, "cluster-a")) as a,
        serving(named(second, "cluster-b")) as b,
    ):
        yield a, b


@pytest.fixture
def clients(pair: Pair) -> tuple[AsyncClient, AsyncClient]:
    return pair[0][1], pair[1][1]


def new_key() -> str:
    return f"k-{uuid.uuid4().hex[:12]}"


async def test_instances_run_on_the_cluster_client(pair: Pair) -> None:
    app = pair[0][0]
    assert app.cache is not None
    store = app.cache._namespaces["blobs"].store
    assert isinstance(store.client, aioredis.RedisCluster)
    assert len(store.client.get_primaries()) == 3


@pytest.mark.parametrize("namespace", ["blobs", "sessions", "queued"])
async def test_put_then_get_on_both_instances(
    namespace: str, clients: tuple[AsyncClient, AsyncClient]
) -> None:
    a, b = clients
    for n in range(20):  # keys over many slots, so over every shard
        key = new_key()
        version = await a.put(namespace, key, b"%d" % n)
        for via in (b, a):
            got = await via.get(namespace, key)
            assert (got.found, got.value, got.version) == (True, b"%d" % n, version)


async def test_write_through_get_after_put_is_a_redis_hit(
    clients: tuple[AsyncClient, AsyncClient],
) -> None:
    a, b = clients
    key = new_key()
    version = await a.put("sessions", key, b"v")
    got = await b.get("sessions", key)
    assert (got.value, got.version, got.layer) == (b"v", version, Layer.REDIS)


async def test_cache_aside_put_drops_the_cached_copy(
    clients: tuple[AsyncClient, AsyncClient],
) -> None:
    a, b = clients
    key = new_key()
    await a.put("blobs", key, b"old")
    assert (await b.get("blobs", key)).layer is Layer.DATABASE
    assert (await b.get("blobs", key)).layer is Layer.REDIS
    version = await a.put("blobs", key, b"new")
    got = await b.get("blobs", key)
    assert (got.value, got.version, got.layer) == (b"new", version, Layer.DATABASE)


async def test_a_burst_beyond_max_connections_waits_for_a_connection(
    cluster_backend: Backend, tmp_path: Path
) -> None:
    """redis-py's per-node cluster pools fail at once when full; cachecoord's
    calls wait for a free connection instead, as over a single Redis's
    blocking pool, so a burst is still answered from Redis."""
    settings = cluster_backend.settings(tmp_path)
    narrow = dataclasses.replace(settings.redis, max_connections=2)
    async with serving(named(dataclasses.replace(settings, redis=narrow), "narrow")) as (_, c):
        keys = [new_key() for _ in range(200)]
        await asyncio.gather(*(c.put("sessions", key, b"v") for key in keys))  # write-through
        replies = await asyncio.gather(*(c.get("sessions", key) for key in keys))
    assert {reply.layer for reply in replies} == {Layer.REDIS}


async def test_invalidation_reaches_the_other_instances_near_cache(
    clients: tuple[AsyncClient, AsyncClient],
) -> None:
    a, b = clients
    keys = [new_key() for _ in range(10)]  # published from scripts on every shard
    for key in keys:
        await a.put("nearby", key, b"old")
        # The Put's own invalidation may reach b after its first read (pub/sub
        # crosses the cluster bus): read until b serves from its near cache.
        near = await poll(partial(b.get, "nearby", key), lambda g: g.layer is Layer.NEAR, within=2)
        assert near.layer is Layer.NEAR
    for key in keys:
        await a.put("nearby", key, b"new")
    for key in keys:
        got = await poll(partial(b.get, "nearby", key), lambda g: g.value == b"new", within=2)
        assert got.value == b"new", key


async def test_write_behind_put_reaches_postgresql(
    clients: tuple[AsyncClient, AsyncClient], cluster_backend: Backend
) -> None:
    a, _ = clients
    keys = [new_key() for _ in range(20)]  # over all 4 partitions
    versions = {key: await a.put("queued", key, key.encode()) for key in keys}
    for key in keys:
        row = await poll(
            partial(managed_row, cluster_backend.dsn, "queued", key),
            lambda r: r is not None,
            within=10,
        )
        assert row == (key.encode(), versions[key])


@pytest.mark.parametrize("namespace", ["blobs", "sessions", "queued"])
async def test_batch_get_across_slots_with_hits_and_misses(
    namespace: str, clients: tuple[AsyncClient, AsyncClient]
) -> None:
    a, b = clients
    keys = [new_key() for _ in range(30)]
    for n, key in enumerate(keys[:20]):
        await a.put(namespace, key, b"%d" % n)
    for key in keys[:10]:
        await b.get(namespace, key)  # cached in Redis (and a hit)
    assert len({KeySpace(namespace).value(k) for k in keys}) == 30

    batch = await b.batch_get(namespace, keys)

    assert [e.key for e in batch] == keys
    assert [e.found for e in batch] == [True] * 20 + [False] * 10
    assert [e.value for e in batch[:20]] == [b"%d" % n for n in range(20)]
    again = await b.batch_get(namespace, keys)
    assert all(e.layer is Layer.REDIS for e in again[:20]), [e.layer for e in again]


async def test_invalidate_many_keys_across_slots(
    clients: tuple[AsyncClient, AsyncClient],
) -> None:
    a, b = clients
    keys = [new_key() for _ in range(20)]
    for key in keys:
        await a.put("blobs", key, b"x")
        await b.get("blobs", key)
    await a.invalidate("blobs", keys)
    for key in keys:
        got = await b.get("blobs", key)
        assert (got.value, got.layer) == (b"x", Layer.DATABASE)


async def test_locks_are_exclusive_across_instances(
    clients: tuple[AsyncClient, AsyncClient],
) -> None:
    a, b = clients
    names = [f"lock-{uuid.uuid4().hex[:8]}" for _ in range(6)]
    fencing = []
    for name in names:
        lock = await a.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=0)
        with pytest.raises(CacheCoordError):
            await b.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=0)
        await a.release_lock(name, lock.token)
        again = await b.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=0)
        assert again.fencing_token > lock.fencing_token
        fencing.append(again.fencing_token)
        await b.release_lock(name, again.token)


async def test_waiter_is_woken_by_a_release_on_another_instance(
    clients: tuple[AsyncClient, AsyncClient],
) -> None:
    a, b = clients
    name = f"lock-{uuid.uuid4().hex[:8]}"
    lock = await a.acquire_lock(name, ttl_ms=30_000)
    waiting = asyncio.create_task(b.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=5_000))
    await asyncio.sleep(0.2)
    await a.release_lock(name, lock.token)
    started = asyncio.get_running_loop().time()
    got = await waiting
    assert asyncio.get_running_loop().time() - started < 1.0  # a notice, not the TTL
    await b.release_lock(name, got.token)


# -- failover ----------------------------------------------------------------

FAILOVER_NS = """
[namespaces.durable]
kind = "managed"
strategy = "write-behind"
flush_interval = "50ms"
retry_after = "200ms"
claim_idle = "1s"
max_attempts = 100
partitions = 6
wait_replicas = 1
"""


async def test_primary_killed_under_write_behind_load_loses_no_acknowledged_write(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """A cluster of this test's own: SIGKILL a primary while Puts stream in; its
    replica takes over, the instance recovers by itself, and with
    wait_replicas = 1 every acknowledged Put reaches PostgreSQL."""
    dsn = new_database(postgres_server)
    cluster = RedisCluster(tmp_path / "cluster")
    await asyncio.to_thread(cluster.start)
    try:
        own = Backend("cluster", tuple(cluster.urls), dsn)
        settings = own.settings(tmp_path, namespaces=FAILOVER_NS)
        async with serving(named(settings, "failover")) as (_, client):
            acknowledged: dict[str, int] = {}
            failed = 0
            errors: dict[str, int] = {}
            stop = asyncio.Event()

            async def writer(w: int) -> None:
                nonlocal failed
                n = 0
                while not stop.is_set():
                    key = f"w{w}-{n}"
                    n += 1
                    try:
                        acknowledged[key] = await client.put(
                            "durable", key, key.encode(), timeout=3
                        )
                    except CacheCoordError as err:
                        failed += 1
                        errors[str(err)[:150]] = errors.get(str(err)[:150], 0) + 1
                        await asyncio.sleep(0.05)

            writers = [asyncio.create_task(writer(w)) for w in range(8)]
            await asyncio.sleep(1.0)
            before = len(acknowledged)
            victim = (await asyncio.to_thread(cluster.primary_ports))[0]
            await asyncio.to_thread(cluster.kill, victim)
            await asyncio.to_thread(cluster.wait_ok, 30)
            # The promoted replica has no replica of its own, so its shard's Puts
            # cannot meet wait_replicas = 1 (UNAVAILABLE) until the old primary
            # is back, as a replica of the new one (what an operator would do).
            await asyncio.to_thread(cluster.start_node, victim)
            await asyncio.to_thread(cluster.wait_ok, 30)
            await asyncio.to_thread(cluster.wait_replicas_synced, 30)
            # Recovered by itself: Puts are acknowledged again after the failover.
            recovered = len(acknowledged)
            for _ in range(400):  # a loaded machine needs a while to settle
                await asyncio.sleep(0.1)
                if len(acknowledged) > recovered + 50:
                    break
            stop.set()
            await asyncio.gather(*writers)
            assert before > 0
            assert len(acknowledged) > recovered + 50, (
                recovered,
                len(acknowledged),
                sorted(errors.items(), key=lambda e: -e[1]),
            )

            async def stored() -> dict[str, int]:
                async with await psycopg.AsyncConnection.connect(dsn) as conn:
                    cur = await conn.execute(
                        "SELECT key, version FROM cachecoord.versions WHERE namespace = 'durable'"
                    )
                    return {k: v async for k, v in cur}

            rows = await poll(stored, lambda r: all(k in r for k in acknowledged), within=30)
            missing = [k for k in acknowledged if rows.get(k, 0) < acknowledged[k]]
            assert missing == [], f"{len(missing)} acknowledged writes lost: {missing[:10]}"
    finally:
        await asyncio.to_thread(cluster.stop)
