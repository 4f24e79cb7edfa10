"""The instance's pub/sub subscription, on connections of its own
(storage/subscription.py: one, or on a Redis Cluster with sharded pub/sub,
one per primary; a drop of any of them is the subscription's drop).

Pub/sub messages sent while a subscriber is disconnected are lost, so the bus
never lets redis-py reconnect silently: every drop goes through ``on_drop``
and ``on_reset`` (listeners must assume they are missing messages), then the
bus resubscribes (on a Redis Cluster, on the next node and with a fresh
slot map), calls ``on_reset``
again once subscribed, and awaits every ``on_subscribed`` handler (which
catch up from the invalidation log, feed.py) before it dispatches the
messages received since. Before the first subscription, ``on_drop`` handlers
are called too: nothing was received yet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from cachecoord import background
from cachecoord.storage.errors import RedisError
from cachecoord.storage.redis_store import Client
from cachecoord.storage.subscription import Messages, Subscriber

log = logging.getLogger(__name__)

Handler = Callable[[bytes], None]


class Bus(background.Component):
    """Dispatches messages of subscribed channels to handlers."""

    def __init__(
        self,
        url: str,
        *,
        reconnect_delay: float = 0.5,
        client: Client | None = None,
    ) -> None:
        """*client*: the instance's Redis client; on a cluster, the bus
        subscribes on the nodes it knows."""
        self._subscriber = Subscriber(url, client)
        self._handlers: dict[str, Handler] = {}
        self._reset_handlers: list[Callable[[], None]] = []
        self._drop_handlers: list[Callable[[], None]] = []
        self._subscribed_handlers: list[Callable[[], Awaitable[object]]] = []
        self._reconnect_delay = reconnect_delay
        self._loop = background.Loop(self._run, name="cachecoord-bus")
        self.subscribed = asyncio.Event()

    def on(self, channel: str, handler: Handler) -> None:
        """Call *handler* with each message's payload (register before open)."""
        self._handlers[channel] = handler

    def on_reset(self, handler: Callable[[], None]) -> None:
        """Call *handler* whenever messages may have been missed (when the
        subscription drops, and again once subscribed)."""
        self._reset_handlers.append(handler)

    def on_drop(self, handler: Callable[[], None]) -> None:
        """Call *handler* when the subscription drops (and before the first)."""
        self._drop_handlers.append(handler)

    def on_subscribed(self, handler: Callable[[], Awaitable[object]]) -> None:
        """Await *handler* after each subscription, before messages are
        dispatched; if it raises RedisError, the bus subscribes again."""
        self._subscribed_handlers.append(handler)

    async def open(self) -> None:
        """Subscribe (and keep resubscribing) in the background."""
        self._loop.start()

    async def close(self) -> None:
        """Stop listening and close the subscriber's connection."""
        await self._loop.stop()
        await self._subscriber.aclose()

    async def _run(self) -> None:
        first = True
        self._call(self._drop_handlers)
        while True:
            if not first:
                await self._subscriber.next_node()
            first = False
            try:
                async with self._subscriber.subscribe(self._handlers) as messages:
                    self._reset()
                    for caught_up in self._subscribed_handlers:
                        await caught_up()
                    self.subscribed.set()
                    await self._listen(messages)
            except (RedisError, OSError) as err:
                log.warning("pub/sub connection lost (%s); resubscribing", err)
            finally:
                self.subscribed.clear()
                self._call(self._drop_handlers)
                self._reset()
            await asyncio.sleep(self._reconnect_delay)

    async def _listen(self, messages: Messages) -> None:
        while True:
            message = await messages.next()
            if message is None:
                continue
            channel, data = message
            handler = self._handlers.get(channel)
            if handler is None:
                continue
            try:
                handler(data)
            except Exception:
                log.exception("handler for %s failed", channel)

    def _reset(self) -> None:
        self._call(self._reset_handlers)

    @staticmethod
    def _call(handlers: list[Callable[[], None]]) -> None:
        for handler in handlers:
            try:
                handler()
            except Exception:
                log.exception("reset handler failed")
