"""The instance's pub/sub subscription, on a connection of its own.

Pub/sub messages sent while a subscriber is disconnected are lost, so the bus
never lets redis-py reconnect silently: every drop goes through ``on_reset``
(listeners must assume they missed messages), then the bus resubscribes and
calls ``on_reset`` again once subscribed.

On Redis Cluster the bus subscribes on one node (redis-py's asyncio cluster
client has no classic pub/sub): a PUBLISH, from a client or a script, is
broadcast to every node, so one node's subscriber gets every message. When
that node drops, the bus resubscribes on the next node it knows of (the
cluster client's current view, then the configured URL).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from cachecoord import background

log = logging.getLogger(__name__)

Handler = Callable[[bytes], None]


class Bus(background.Component):
    """Dispatches messages of subscribed channels to handlers."""

    def __init__(
        self,
        url: str,
        *,
        reconnect_delay: float = 0.5,
        cluster: redis.RedisCluster | None = None,
    ) -> None:
        self._url = url
        self._cluster = cluster
        self._attempt = 0
        self._client = self._connect(url)
        self._handlers: dict[str, Handler] = {}
        self._reset_handlers: list[Callable[[], None]] = []
        self._reconnect_delay = reconnect_delay
        self._loop = background.Loop(self._run, name="cachecoord-bus")
        self.subscribed = asyncio.Event()

    def on(self, channel: str, handler: Handler) -> None:
        """Call *handler* with each message's payload (register before open)."""
        self._handlers[channel] = handler

    def on_reset(self, handler: Callable[[], None]) -> None:
        """Call *handler* whenever messages may have been missed."""
        self._reset_handlers.append(handler)

    async def open(self) -> None:
        """Subscribe (and keep resubscribing) in the background."""
        self._loop.start()

    async def close(self) -> None:
        """Stop listening and close the subscriber's connection."""
        await self._loop.stop()
        await self._client.aclose()

    @staticmethod
    def _connect(url: str) -> redis.Redis:
        return redis.Redis.from_url(
            url,
            protocol=2,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=2,
            health_check_interval=5,
        )

    async def _next_node(self) -> None:
        """Cluster: move the subscription to another node, round robin over the
        nodes the cluster client knows (they change with failovers), then the
        configured URL."""
        if self._cluster is None:
            return
        nodes = [(n.host, n.port) for n in self._cluster.get_nodes()]
        self._attempt += 1
        choice = self._attempt % (len(nodes) + 1)
        old = self._client
        if choice == len(nodes):
            self._client = self._connect(self._url)
        else:
            host, port = nodes[choice]
            parts = urlsplit(self._url)
            credentials = parts.netloc.rpartition("@")[0]
            netloc = f"{credentials}@" if credentials else ""
            host = f"[{host}]" if ":" in host else host
            self._client = self._connect(
                urlunsplit(parts._replace(netloc=f"{netloc}{host}:{port}"))
            )
        await old.aclose()

    async def _run(self) -> None:
        first = True
        while True:
            if not first:
                await self._next_node()
            first = False
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*self._handlers)
                self._reset()
                self.subscribed.set()
                await self._listen(pubsub)
            except (RedisError, OSError) as err:
                log.warning("pub/sub connection lost (%s); resubscribing", err)
            finally:
                self.subscribed.clear()
                self._reset()
                await pubsub.aclose()
            await asyncio.sleep(self._reconnect_delay)

    async def _listen(self, pubsub: redis.client.PubSub) -> None:
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is None or message["type"] != "message":
                continue
            channel = message["channel"].decode()
            handler = self._handlers.get(channel)
            if handler is None:
                continue
            try:
                handler(message["data"])
            except Exception:
                log.exception("handler for %s failed", channel)

    def _reset(self) -> None:
        for handler in self._reset_handlers:
            try:
                handler()
            except Exception:
                log.exception("reset handler failed")
