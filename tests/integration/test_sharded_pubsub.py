"""Sharded pub/sub on Redis Cluster (``redis.sharded_pubsub``, on by default
with ``redis.cluster``): a change goes out on its log partition's shard
channel, on the node owning the partition's slot only; every instance
subscribes on every primary; a node's subscription that drops makes the
instance catch up from the log. ``sharded_pubsub = false`` keeps the
classic, broadcast channel ``cc:inv:<ns>``.

Two instances on the session's cluster (conftest's cluster_backend), each
given a different node's URL, serving a namespace of this module's own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from strategy_support import named, poll, serving, unique_namespace
from watch_support import cut_subscriptions, next_event

from cachecoord.app import App
from cachecoord.invalidation.messages import Invalidation
from cachecoord.storage.keys import KeySpace
from cachecoord_client import AsyncClient, Layer, WatchEventKind
from conftest import Backend
from local_servers import RedisCluster

NEAR = """
[namespaces.{name}]
kind = "managed"
ttl = "5m"
near_cache_entries = 1000
near_cache_ttl = "60s"
"""

Pair = tuple[tuple[App, AsyncClient], tuple[App, AsyncClient]]


@pytest.fixture(scope="module")
def namespace() -> str:
    return unique_namespace("sharded")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pair(
    cluster_backend: Backend, namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Pair]:
    tmp = tmp_path_factory.mktemp("sharded")
    urls = cluster_backend.urls
    namespaces = NEAR.format(name=namespace)
    first = cluster_backend.settings(tmp, url=urls[0], namespaces=namespaces)
    second = cluster_backend.settings(tmp, url=urls[4], namespaces=namespaces)
    async with (
        serving(named(first, "sharded-a")) as a,
        serving(named(second, "sharded-b")) as b,
    ):
        yield a, b


@pytest_asyncio.fixture(loop_scope="session")
async def cluster(cluster_backend: Backend) -> AsyncIterator[aioredis.RedisCluster]:
    client = aioredis.RedisCluster.from_url(cluster_backend.url)
    await client.initialize()
    try:
        yield client
    finally:
        await client.aclose()


def new_key() -> str:
    return f"k-{uuid.uuid4().hex[:12]}"


def node_url(node: aioredis.cluster.ClusterNode) -> str:
    return f"redis://{node.host}:{node.port}"


def owner(cluster: aioredis.RedisCluster, channel: str) -> str:
    """The URL of the primary owning *channel*'s slot."""
    node = cluster.get_node_from_key(channel)
    assert node is not None
    return node_url(node)


def keys_on_every_primary(cluster: aioredis.RedisCluster, space: KeySpace) -> list[str]:
    """Fresh keys whose partitions' channels are owned by every primary."""
    by_node: dict[str, str] = {}
    while len(by_node) < len(cluster.get_primaries()):
        key = new_key()
        by_node.setdefault(owner(cluster, space.channel_of(space.partition(key))), key)
    return list(by_node.values())


class Listener:
    """A plain pub/sub connection to one node, as an external program's."""

    def __init__(self, pubsub: aioredis.client.PubSub) -> None:
        self.pubsub = pubsub

    async def next(self, *, within: float = 5.0) -> tuple[str, dict[str, object]]:
        async with asyncio.timeout(within):
            while True:
                message = await self.pubsub.get_message(timeout=within)
                if message is not None and message["type"] in ("message", "smessage"):
                    return message["channel"].decode(), json.loads(message["data"])


@asynccontextmanager
async def listening(url: str, *, shard: str = "", classic: str = "") -> AsyncIterator[Listener]:
    """SSUBSCRIBE to *shard* or SUBSCRIBE to *classic* on the node at *url*,
    confirmed."""
    async with AsyncExitStack() as stack:
        node = aioredis.Redis.from_url(url, protocol=2)
        stack.push_async_callback(node.aclose)
        pubsub = node.pubsub(ignore_subscribe_messages=True)
        stack.push_async_callback(pubsub.aclose)
        if shard:
            await pubsub.ssubscribe(shard)
        else:
            await pubsub.subscribe(classic)
        confirmation = await pubsub.parse_response(block=True, timeout=5)
        assert confirmation is not None
        yield Listener(pubsub)


def near_of(client: AsyncClient, namespace: str) -> Callable[[str], Awaitable[Layer]]:
    async def layer(key: str) -> Layer:
        got = await poll(
            partial(client.get, namespace, key), lambda g: g.layer is Layer.NEAR, within=2
        )
        return got.layer

    return layer


async def test_a_change_goes_out_on_its_shard_channel_and_is_not_broadcast(
    pair: Pair, namespace: str, cluster: aioredis.RedisCluster, cluster_backend: Backend
) -> None:
    (_, a), _ = pair
    space = KeySpace(namespace, sharded=True)
    key = new_key()
    partition = space.partition(key)
    channel = space.channel_of(partition)
    home = owner(cluster, channel)
    async with AsyncExitStack() as stack:
        shard = await stack.enter_async_context(listening(home, shard=channel))
        classic = [
            await stack.enter_async_context(listening(url, classic=space.channel))
            for url in cluster_backend.urls
        ]
        version = await a.put(namespace, key, b"v")
        got, message = await shard.next()
        assert got == channel
        assert (message["key"], message["partition"], message["version"]) == (
            key,
            partition,
            version,
        )
        # A marker published classically from the same node after the change
        # reaches every node's classic subscriber first: the change did not.
        publisher = aioredis.Redis.from_url(home, protocol=2)
        stack.push_async_callback(publisher.aclose)
        marker = Invalidation(namespace, "marker", 0, "invalidate", "test")
        await publisher.publish(space.channel, marker.encode())
        for listener in classic:
            channel_got, first = await listener.next()
            assert (channel_got, first["key"]) == (space.channel, "marker")


async def test_changes_on_every_primary_reach_the_other_instances_near_cache_and_watch(
    pair: Pair, namespace: str, cluster: aioredis.RedisCluster
) -> None:
    (_, a), (_, b) = pair
    keys = keys_on_every_primary(cluster, KeySpace(namespace, sharded=True))
    for key in keys:
        await a.put(namespace, key, b"old")
        assert await near_of(b, namespace)(key) is Layer.NEAR
    async with b.watch([namespace]) as events:
        assert (await next_event(events)).kind is WatchEventKind.RESET  # subscribed
        for key in keys:
            await a.put(namespace, key, b"new")
        changed = {(await next_event(events)).key for _ in keys}
    assert changed == set(keys)
    for key in keys:
        got = await b.get(namespace, key)
        assert got.value == b"new", key


async def test_a_node_subscription_cut_is_caught_up_from_the_log_keeping_the_near_cache(
    pair: Pair, namespace: str, cluster: aioredis.RedisCluster
) -> None:
    (app_a, a), (app_b, b) = pair
    space = KeySpace(namespace, sharded=True)
    changed, kept = keys_on_every_primary(cluster, space)[:2]
    for key in (changed, kept):
        await a.put(namespace, key, b"old")
        assert await near_of(b, namespace)(key) is Layer.NEAR
    home = owner(cluster, space.channel_of(space.partition(changed)))

    async def kill_on_home() -> int:
        node = aioredis.Redis.from_url(home, protocol=2)
        try:
            return int(await node.client_kill_filter(_type="pubsub"))
        finally:
            await node.aclose()

    async with cut_subscriptions(kill_on_home, app_a, app_b):
        await a.put(namespace, changed, b"new")  # published while b hears nothing
    assert app_b.bus is not None
    await asyncio.wait_for(app_b.bus.subscribed.wait(), 5)
    got = await b.get(namespace, changed)
    assert got.value == b"new"
    still = await b.get(namespace, kept)
    assert (still.value, still.layer) == (b"old", Layer.NEAR)


async def test_with_sharded_pubsub_off_changes_go_out_on_the_classic_channel(
    cluster_backend: Backend, tmp_path: Path
) -> None:
    namespace = unique_namespace("classic")
    settings = cluster_backend.settings(tmp_path, namespaces=NEAR.format(name=namespace))
    settings = dataclasses.replace(
        settings, redis=dataclasses.replace(settings.redis, sharded_pubsub=False)
    )
    async with (
        listening(cluster_backend.urls[-1], classic=KeySpace(namespace).channel) as classic,
        serving(named(settings, "classic")) as (_, client),
    ):
        key = new_key()
        await client.put(namespace, key, b"v")
        channel, message = await classic.next()
        assert (channel, message["key"]) == (KeySpace(namespace).channel, key)


async def replica_of(primary: str) -> str:
    """The URL of a replica of the primary at *primary*."""
    node: Any = aioredis.Redis.from_url(primary, protocol=2)
    try:
        myid = (await node.execute_command("CLUSTER", "MYID")).decode()
        lines = await node.execute_command("CLUSTER", "REPLICAS", myid)
    finally:
        await node.aclose()
    address = lines[0].decode().split()[1].split("@")[0]
    return f"redis://{address}"


async def failover_to(url: str) -> None:
    node: Any = aioredis.Redis.from_url(url, protocol=2)
    try:
        await node.execute_command("CLUSTER", "FAILOVER")
    finally:
        await node.aclose()


async def test_a_failover_ends_the_node_subscription_and_it_moves_to_the_new_primary(
    pair: Pair, namespace: str, cluster: aioredis.RedisCluster, redis_cluster: RedisCluster
) -> None:
    """A manual failover takes the slots from the node: Redis pushes
    sunsubscribe, the instance subscribes on the new primary, catches up,
    and keeps its near cache."""
    _, (app_b, b) = pair
    assert app_b.bus is not None
    space = KeySpace(namespace, sharded=True)
    changed, kept = keys_on_every_primary(cluster, space)[:2]
    for key in (changed, kept):
        await pair[0][1].put(namespace, key, b"old")
        assert await near_of(b, namespace)(key) is Layer.NEAR
    home = owner(cluster, space.channel_of(space.partition(changed)))
    replica = await replica_of(home)
    dropped = asyncio.Event()
    app_b.bus.on_drop(dropped.set)
    await failover_to(replica)
    try:
        await asyncio.wait_for(dropped.wait(), 10)
        await asyncio.wait_for(app_b.bus.subscribed.wait(), 10)
        await pair[0][1].put(namespace, changed, b"new")
        got = await poll(partial(b.get, namespace, changed), lambda g: g.value == b"new", within=2)
        assert got.value == b"new"
        still = await b.get(namespace, kept)
        assert (still.value, still.layer) == (b"old", Layer.NEAR)
    finally:
        await failover_to(home)
        await asyncio.to_thread(redis_cluster.wait_ok, 30)
