"""The pub/sub connection the invalidation bus listens on.

A connection of its own that redis-py never reconnects silently (messages
sent while a subscriber is disconnected are lost, so the bus must see every
drop). On Redis Cluster it subscribes on one node (redis-py's asyncio cluster
client has no classic pub/sub): a PUBLISH, from a client or a script, is
broadcast to every node, so one node's subscriber gets every message. When
that node drops, :meth:`Subscriber.next_node` moves to the next node the
cluster client knows of (its current view, then the configured URL).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from cachecoord.storage.redis_store import Client


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


class Messages:
    """The messages of a subscription, as (channel, payload)."""

    def __init__(self, pubsub: redis.client.PubSub, wait: float = 1.0) -> None:
        self._pubsub = pubsub
        self._wait = wait

    async def next(self) -> tuple[str, bytes] | None:
        """The next message, or None if none came within a second (so that
        the caller's loop stays cancellable; raises RedisError or OSError when
        the connection drops)."""
        message = await self._pubsub.get_message(timeout=self._wait)
        if message is None or message["type"] != "message":
            return None
        return message["channel"].decode(), message["data"]


class Subscriber:
    """Subscribes to channels on *url*, or on a node of *client*'s cluster."""

    def __init__(self, url: str, client: Client | None = None) -> None:
        self._url = url
        self._cluster = client if isinstance(client, redis.RedisCluster) else None
        self._attempt = 0
        self._client = connect(url)

    @asynccontextmanager
    async def subscribe(self, channels: Iterable[str]) -> AsyncIterator[Messages]:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(*channels)
            yield Messages(pubsub)
        finally:
            await pubsub.aclose()

    async def next_node(self) -> None:
        """Cluster: move to another node, round robin over the nodes the
        cluster client knows (they change with failovers), then the
        configured URL. A single Redis: stay."""
        if self._cluster is None:
            return
        nodes = [(n.host, n.port) for n in self._cluster.get_nodes()]
        self._attempt += 1
        choice = self._attempt % (len(nodes) + 1)
        old = self._client
        if choice == len(nodes):
            self._client = connect(self._url)
        else:
            host, port = nodes[choice]
            parts = urlsplit(self._url)
            credentials = parts.netloc.rpartition("@")[0]
            netloc = f"{credentials}@" if credentials else ""
            host = f"[{host}]" if ":" in host else host
            self._client = connect(urlunsplit(parts._replace(netloc=f"{netloc}{host}:{port}")))
        await old.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()
