"""The hot read commands' pipelined connections (storage/hot_path.py,
storage/pipelined.py) against real Redis servers: every caller gets its own
reply, whatever is cancelled; a Redis that is killed or frozen fails the call
with the exception redis-py raises, and the next call after it is back
reconnects; lost scripts are loaded again; on a cluster, a command sent to a
node that no longer owns its slot is answered through redis-py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tls_certs import Pki, make_pki

from cachecoord.config import Duration, RedisSettings
from cachecoord.storage.hot_path import HotPath
from cachecoord.storage.keys import KeySpace
from cachecoord.storage.redis_store import Client, EntryStore, connect
from local_servers import RedisCluster, RedisServer, free_port

TIMEOUT_MS = 300


def _hot_path(client: Client) -> HotPath:
    hot_path = getattr(client, "hot_path", None)
    assert isinstance(hot_path, HotPath)
    return hot_path


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        if (pid := server.pid) is not None:
            os.kill(pid, signal.SIGCONT)  # if a test left it frozen
        server.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def client(redis_server: RedisServer) -> AsyncIterator[Client]:
    client = connect(RedisSettings(url=redis_server.url))
    yield client
    await client.aclose()


def _short_timeouts(url: str, *, cluster: bool = False) -> RedisSettings:
    return RedisSettings(
        url=url, cluster=cluster, socket_timeout=Duration(TIMEOUT_MS), pool_timeout=Duration(500)
    )


async def test_concurrent_gets_each_get_their_own_value(client: Client) -> None:
    names = [f"hot-{uuid.uuid4().hex}" for _ in range(500)]
    await client.mset({name: name.encode() * 3 for name in names})
    hot_path = _hot_path(client)
    replies = await asyncio.gather(*(hot_path.execute([n], [("GET", n)]) for n in names))
    assert [reply[0] for reply in replies] == [name.encode() * 3 for name in names]


async def test_a_cancelled_call_does_not_shift_the_replies(client: Client) -> None:
    names = [f"hot-{uuid.uuid4().hex}" for _ in range(200)]
    await client.mset({name: name.encode() for name in names})
    hot_path = _hot_path(client)
    calls = [asyncio.create_task(hot_path.execute([n], [("GET", n)])) for n in names]
    await asyncio.sleep(0)  # every call has written its command
    for call in calls[::2]:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    assert all(call.cancelled() for call in calls[::2])
    assert [call.result()[0] for call in calls[1::2]] == [n.encode() for n in names[1::2]]
    # And the connection still pairs commands with their replies.
    assert await hot_path.execute([names[0]], [("GET", names[0])]) == [names[0].encode()]


async def test_error_replies_are_redis_py_exceptions_and_keep_the_order(client: Client) -> None:
    name = f"hot-{uuid.uuid4().hex}"
    await client.rpush(name, "x")  # a list: GET on it is WRONGTYPE
    store = EntryStore(client, KeySpace(f"hot-{uuid.uuid4().hex[:6]}"), generations=False)
    replies = await _hot_path(client).execute([name] * 2, [("GET", name), ("LLEN", name)])
    assert type(replies[0]).__name__ == "ResponseError"
    assert replies[1] == 1
    assert await store.get("missing") is None


async def test_a_frozen_redis_times_out_as_with_redis_py_and_the_next_call_reconnects(
    own_redis: RedisServer,
) -> None:
    client = connect(_short_timeouts(own_redis.url))
    store = EntryStore(client, KeySpace("frozen"), generations=False)
    plain = aioredis.Redis.from_url(own_redis.url, socket_timeout=TIMEOUT_MS / 1000)
    try:
        await client.set(store.keys.value("k"), b"v")
        assert await store.get("k") == b"v"
        pid = own_redis.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(RedisTimeoutError):
                await plain.get(store.keys.value("k"))
            with pytest.raises(RedisTimeoutError):
                await store.get("k")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await store.get("k") == b"v"  # a new connection: no stale reply
    finally:
        await plain.aclose()
        await client.aclose()


async def test_a_killed_redis_is_a_connection_error_as_with_redis_py_until_it_is_back(
    own_redis: RedisServer,
) -> None:
    client = connect(_short_timeouts(own_redis.url))
    store = EntryStore(client, KeySpace("killed"), generations=True)
    plain = aioredis.Redis.from_url(own_redis.url, socket_timeout=TIMEOUT_MS / 1000)
    try:
        assert await store.get("k") is None  # connected
        await asyncio.to_thread(own_redis.kill)
        with pytest.raises(RedisConnectionError):
            await plain.get("k")
        for _ in range(2):  # the connection lost, then refused
            with pytest.raises(RedisConnectionError):
                await store.get("k")
        await asyncio.to_thread(own_redis.restart)
        # A fresh Redis has no scripts: NOSCRIPT, loaded, run again.
        assert await store.get("k") is None
        assert await store.take_leases({"k": "token"}, 5000) == {"k": True}
    finally:
        await plain.aclose()
        await client.aclose()


async def test_scripts_are_loaded_again_after_script_flush(client: Client) -> None:
    store = EntryStore(client, KeySpace(f"flush-{uuid.uuid4().hex[:6]}"), generations=True)
    assert await store.take_leases({"a": "t1", "b": "t2"}, 5000) == {"a": True, "b": True}
    await client.script_flush()
    filled = await store.fill_many(
        {"a": ("t1", b"1:a", 60_000, b"n"), "b": ("t2", b"1:b", 60_000, b"n")}
    )
    assert filled == {"a": True, "b": True}
    await client.script_flush()
    assert await store.get_many(["a", "b", "c"]) == [b"1:a", b"1:b", None]


async def test_closing_the_client_fails_calls_in_flight_as_connection_errors(
    redis_server: RedisServer,
) -> None:
    client = connect(RedisSettings(url=redis_server.url))
    store = EntryStore(client, KeySpace("closing"), generations=False)
    await store.get("k")
    pending = asyncio.create_task(_hot_path(client).execute(["k"], [("BLPOP", "nothing", 5)]))
    await asyncio.sleep(0.05)
    await client.aclose()
    with pytest.raises(RedisConnectionError):
        await pending


def test_on_uvloop_the_connection_is_taken_over_and_lost_as_a_connection_error(
    own_redis: RedisServer,
) -> None:
    async def run() -> None:
        client = connect(_short_timeouts(own_redis.url))
        store = EntryStore(client, KeySpace("uvloop"), generations=False)
        try:
            await client.set(store.keys.value("k"), b"v")
            values = await asyncio.gather(*(store.get("k") for _ in range(100)))
            assert values == [b"v"] * 100
            await asyncio.to_thread(own_redis.kill)
            with pytest.raises(RedisConnectionError):
                await store.get("k")
            await asyncio.to_thread(own_redis.restart)
            assert await store.get("k") is None  # no AOF: an empty Redis
        finally:
            await client.aclose()

    uvloop.run(run())


@pytest_asyncio.fixture(loop_scope="session")
async def cluster_client(redis_cluster: RedisCluster) -> AsyncIterator[aioredis.RedisCluster]:
    client = connect(RedisSettings(url=redis_cluster.url, cluster=True))
    assert isinstance(client, aioredis.RedisCluster)
    await client.initialize()
    yield client
    await client.aclose()


async def test_on_a_cluster_batches_across_slots_get_their_own_values(
    cluster_client: aioredis.RedisCluster,
) -> None:
    store = EntryStore(cluster_client, KeySpace(f"c-{uuid.uuid4().hex[:6]}"), generations=False)
    keys = [f"k{i}" for i in range(60)]
    for key in keys[::2]:
        await cluster_client.set(store.keys.value(key), key.encode())
    expected = [key.encode() if i % 2 == 0 else None for i, key in enumerate(keys)]
    assert await store.get_many(keys) == expected
    assert await asyncio.gather(*(store.get(key) for key in keys)) == expected
    versioned = EntryStore(cluster_client, KeySpace(f"v-{uuid.uuid4().hex[:6]}"), generations=True)
    leases = await versioned.take_leases({key: "t" for key in keys}, 5000)
    assert set(leases.values()) == {True}
    fills = {key: ("t", f"1:{key}".encode(), 60_000, b"n") for key in keys}
    assert set((await versioned.fill_many(fills)).values()) == {True}
    assert await versioned.get_many(keys) == [f"1:{key}".encode() for key in keys]


async def test_on_a_cluster_a_moved_reply_is_answered_through_redis_py(
    cluster_client: aioredis.RedisCluster,
) -> None:
    """The slot map says another primary owns the key's slot (as after a slot
    migration or a failover): that node answers MOVED, and redis-py follows
    it and corrects the map."""
    store = EntryStore(cluster_client, KeySpace(f"m-{uuid.uuid4().hex[:6]}"), generations=True)
    assert await store.take_leases({"k": "t"}, 5000) == {"k": True}
    assert await store.fill_many({"k": ("t", b"1:v", 60_000, b"n")}) == {"k": True}
    name = store.keys.generation("k")
    slot = cluster_client.keyslot(name)
    nodes = cluster_client.nodes_manager
    owner = nodes.get_node_from_slot(slot)
    other = next(n for n in cluster_client.get_primaries() if n.name != owner.name)
    nodes.slots_cache[slot] = [other]  # stale
    assert await store.get("k") == b"1:v"
    assert nodes.get_node_from_slot(slot).name == owner.name  # corrected by redis-py
    nodes.slots_cache[slot] = [other]
    assert await store.get_many(["k"]) == [b"1:v"]


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, int, Pki]]:
    """A Redis that also listens with TLS (clients need no certificate)."""
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    server = RedisServer(
        tmp_path / "redis",
        extra_args=[
            *("--tls-port", str(tls_port)),
            *("--tls-cert-file", str(pki.server.cert_file)),
            *("--tls-key-file", str(pki.server.key_file)),
            *("--tls-ca-cert-file", str(pki.ca.cert_file)),
            *("--tls-auth-clients", "no"),
        ],
    )
    server.start()
    try:
        yield server, tls_port, pki
    finally:
        server.stop()


async def _reads_over_tls(tls_port: int, pki: Pki) -> None:
    url = f"rediss://localhost:{tls_port}/0"
    client = connect(RedisSettings(url=f"{url}?ssl_ca_certs={pki.ca.cert_file}"))
    store = EntryStore(client, KeySpace("tls"), generations=True)
    try:
        await client.set(store.keys.generation("k"), b"0")
        await client.set(f"{store.keys.value('k')}:g0", b"1:v")
        assert await asyncio.gather(*(store.get("k") for _ in range(50))) == [b"1:v"] * 50
        assert await store.take_leases({"other": "t"}, 5000) == {"other": True}
    finally:
        await client.aclose()
    untrusted = connect(RedisSettings(url=url))  # the system's CAs: not this one
    try:
        with pytest.raises(RedisConnectionError):
            await EntryStore(untrusted, KeySpace("tls"), generations=False).get("k")
    finally:
        await untrusted.aclose()


async def test_over_tls_the_hot_path_reads_and_refuses_an_untrusted_server(
    tls_redis: tuple[RedisServer, int, Pki],
) -> None:
    _, tls_port, pki = tls_redis
    await _reads_over_tls(tls_port, pki)


def test_over_tls_on_uvloop_too(tls_redis: tuple[RedisServer, int, Pki]) -> None:
    _, tls_port, pki = tls_redis
    uvloop.run(_reads_over_tls(tls_port, pki))
