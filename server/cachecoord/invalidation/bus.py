"""The instance's pub/sub subscription, on a connection of its own.

Pub/sub messages sent while a subscriber is disconnected are lost, so the bus
never lets redis-py reconnect silently: every drop goes through ``on_reset``
(listeners must assume they missed messages), then the bus resubscribes and
calls ``on_reset`` again once subscribed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis.asyncio as redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

log = logging.getLogger(__name__)

Handler = Callable[[bytes], None]


class Bus:
    """Dispatches messages of subscribed channels to handlers."""

    def __init__(self, url: str, *, reconnect_delay: float = 0.5) -> None:
        self._client = redis.Redis.from_url(
            url,
            protocol=2,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=2,
            health_check_interval=5,
        )
        self._handlers: dict[str, Handler] = {}
        self._reset_handlers: list[Callable[[], None]] = []
        self._reconnect_delay = reconnect_delay
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    def on(self, channel: str, handler: Handler) -> None:
        """Call *handler* with each message's payload (register before open)."""
        self._handlers[channel] = handler

    def on_reset(self, handler: Callable[[], None]) -> None:
        """Call *handler* whenever messages may have been missed."""
        self._reset_handlers.append(handler)

    async def open(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cachecoord-bus")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._client.aclose()

    async def _run(self) -> None:
        while True:
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
                await pubsub.aclose()  # type: ignore[no-untyped-call]
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
