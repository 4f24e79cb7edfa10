"""The pub/sub connections the invalidation bus listens on.

Connections of their own that redis-py never reconnects silently (messages
sent while a subscriber is disconnected are lost, so the bus must see every
drop). A subscription counts as made once Redis has confirmed every channel,
so what the bus reads from the log afterwards overlaps what it receives.

Classic channels (keys.is_shard_channel false: ``cc:locks``, and
``cc:inv:<ns>`` without sharded pub/sub) are subscribed on one connection.
On Redis Cluster that is one node's (redis-py's asyncio cluster client has
no classic pub/sub): a PUBLISH, from a client or a script, is broadcast to
every node, so one node's subscriber gets every message. When the
subscription drops, :meth:`Subscriber.next_node` moves to the next node the
cluster client knows of (its current view, then the configured URL).

Shard channels (``cc:inv:{<ns>:<p>}``, redis.sharded_pubsub) are subscribed
(SSUBSCRIBE) on the primary owning each one's slot, one connection per such
primary, from the cluster client's slot map (refreshed after a drop): a
SPUBLISH reaches the subscribers of its node only. redis-py's own
cluster pub/sub would move channels between nodes by itself, hiding the
gap; here any node's drop is the subscription's drop: a lost connection, an
error (MOVED: the map was stale) or an ``sunsubscribe`` that Redis pushes
when the slot leaves the node (migration, failover) ends the whole
subscription, and the bus subscribes again and catches up from the log.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cachecoord.storage.keys import is_shard_channel
from cachecoord.storage.redis_store import Client

CONFIRM_TIMEOUT = 2.0
"""How long Redis gets to confirm a subscription's channels."""

_CONFIRMATIONS = ("subscribe", "ssubscribe")
_DELIVERIES = ("message", "smessage")
_UNSUBSCRIBED = ("unsubscribe", "sunsubscribe")


class Unsubscribed(RedisConnectionError):
    """Redis ended a subscription by itself (a shard channel's slot left the
    node: a slot migration or a failover)."""


def connect(url: str) -> redis.Redis:
    """A subscriber's connection: no retries (a drop must surface), a quick
    connect timeout, and a health check that notices a dead peer."""
    return redis.Redis.from_url(
        url,
        protocol=2,
        retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=2,
        health_check_interval=5,
    )


def node_url(url: str, host: str, port: str | int) -> str:
    """*url* (its scheme, credentials and options) pointed at another node."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@" if credentials else ""
    host = f"[{host}]" if ":" in host else host
    return urlunsplit(parts._replace(netloc=f"{netloc}{host}:{port}"))


class Messages:
    """The messages of a subscription's connections, as (channel, payload),
    in the order each connection received them."""

    def __init__(self, subscriptions: list[tuple[redis.client.PubSub, int]], wait: float = 1.0):
        """*subscriptions*: each connection's PubSub and how many channels it
        subscribed to (as many confirmations to wait for)."""
        self._wait = wait
        self._queue: asyncio.Queue[tuple[str, bytes] | BaseException] = asyncio.Queue()
        self._unconfirmed = sum(count for _, count in subscriptions)
        self._confirmed = asyncio.Event()
        self._failure: BaseException | None = None
        if not self._unconfirmed:
            self._confirmed.set()
        self._readers = [
            asyncio.create_task(self._read(pubsub), name="cachecoord-pubsub-reader")
            for pubsub, _ in subscriptions
        ]

    async def confirmed(self) -> None:
        """Wait until Redis confirmed every channel; raises RedisError if a
        connection failed or the confirmations did not come in time."""
        try:
            await asyncio.wait_for(self._confirmed.wait(), CONFIRM_TIMEOUT)
        except TimeoutError:
            raise RedisTimeoutError("the subscription was not confirmed in time") from None
        if self._failure is not None:
            raise self._failure

    async def next(self) -> tuple[str, bytes] | None:
        """The next message, or None if none came within a second (so that
        the caller's loop stays cancellable); raises RedisError or OSError
        when any connection drops or Redis ends a subscription."""
        try:
            item = await asyncio.wait_for(self._queue.get(), self._wait)
        except TimeoutError:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)

    async def _read(self, pubsub: redis.client.PubSub) -> None:
        try:
            while True:
                message = await pubsub.get_message(timeout=self._wait)
                if message is None:
                    continue
                kind = message["type"]
                if kind in _DELIVERIES:
                    self._queue.put_nowait((message["channel"].decode(), message["data"]))
                elif kind in _CONFIRMATIONS:
                    self._unconfirmed -= 1
                    if self._unconfirmed == 0:
                        self._confirmed.set()
                elif kind in _UNSUBSCRIBED:
                    channel = message["channel"].decode()
                    raise Unsubscribed(f"Redis ended the subscription to {channel} ({kind})")
        except (RedisError, OSError) as err:
            self._failure = self._failure or err
            self._confirmed.set()
            self._queue.put_nowait(err)


class Subscriber:
    """Subscribes to channels on *url*, or on the nodes of *client*'s cluster."""

    def __init__(self, url: str, client: Client | None = None) -> None:
        self._url = url
        self._cluster = client if isinstance(client, redis.RedisCluster) else None
        self._attempt = 0
        self._client = connect(url)
        self._stale_slots = False

    @asynccontextmanager
    async def subscribe(self, channels: Iterable[str]) -> AsyncIterator[Messages]:
        """Subscribe to *channels* (classic and shard channels), confirmed."""
        names = list(channels)
        classic = [c for c in names if not is_shard_channel(c)]
        sharded = [c for c in names if is_shard_channel(c)]
        async with AsyncExitStack() as stack:
            subscriptions = []
            if classic:
                pubsub = self._client.pubsub()
                stack.push_async_callback(pubsub.aclose)
                await pubsub.subscribe(*classic)
                subscriptions.append((pubsub, len(classic)))
            for url, owned in (await self._owners(sharded)).items():
                node = connect(url)
                stack.push_async_callback(node.aclose)
                pubsub = node.pubsub()
                stack.push_async_callback(pubsub.aclose)
                for channel in owned:  # one SSUBSCRIBE per slot (a command's channels share one)
                    await pubsub.ssubscribe(channel)
                subscriptions.append((pubsub, len(owned)))
            messages = Messages(subscriptions)
            stack.push_async_callback(messages.aclose)
            await messages.confirmed()
            yield messages

    async def _owners(self, channels: list[str]) -> dict[str, list[str]]:
        """The shard *channels* by the URL of the primary owning their slot
        (a single Redis owns them all)."""
        if not channels:
            return {}
        if self._cluster is None:
            return {self._url: channels}
        owners: dict[str, list[str]] = {}
        try:
            if self._stale_slots:
                await self._cluster.nodes_manager.initialize()
                self._stale_slots = False
            else:
                await self._cluster.initialize()
            for channel in channels:
                node = self._cluster.get_node_from_key(channel)
                if node is None:
                    raise RedisConnectionError(f"no node serves the slot of {channel!r}")
                owners.setdefault(node_url(self._url, node.host, node.port), []).append(channel)
        except RedisClusterException as err:  # no node reachable, a slot not covered
            self._stale_slots = True
            raise RedisConnectionError(f"no slot map to subscribe with: {err}") from err
        return owners

    async def next_node(self) -> None:
        """Cluster: after a drop, move the classic subscription to another
        node, round robin over the nodes the cluster client knows (they
        change with failovers), then the configured URL, and take a fresh
        slot map for the shard channels. A single Redis: stay."""
        if self._cluster is None:
            return
        self._stale_slots = True
        nodes = [(n.host, n.port) for n in self._cluster.get_nodes()]
        self._attempt += 1
        choice = self._attempt % (len(nodes) + 1)
        old = self._client
        if choice == len(nodes):
            self._client = connect(self._url)
        else:
            self._client = connect(node_url(self._url, *nodes[choice]))
        await old.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()
