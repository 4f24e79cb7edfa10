"""Helpers shared by the Watch and LocalCache tests: tuned and extra instances,
cutting an instance's pub/sub subscription or a client's connection, and
reading events with a bound.

Not a conftest (see strategy_support.py for why).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from strategy_support import named, serving

from cachecoord.app import App
from cachecoord.storage.subscription import Messages, Subscriber
from cachecoord_client import AsyncClient, WatchEvent, WatchEventKind
from conftest import NAMESPACES, settings_for

HEARTBEAT = WatchEventKind.HEARTBEAT


@asynccontextmanager
async def instance(
    tmp: Path,
    redis_url: str,
    postgres_url: str,
    name: str,
    *,
    cluster: bool = False,
    namespaces: str = NAMESPACES,
    **server: Any,
) -> AsyncIterator[tuple[App, AsyncClient]]:
    """An in-process instance named *name*, serving *namespaces*, with
    *server* settings replaced (e.g. ``watch_backlog=100``), and a client of
    it; *cluster*: on a Redis Cluster (*redis_url* is one node's)."""
    settings = settings_for(tmp, redis_url, postgres_url, namespaces=namespaces, cluster=cluster)
    settings = named(settings, name)
    settings = dataclasses.replace(settings, server=dataclasses.replace(settings.server, **server))
    async with serving(settings) as running:
        yield running


async def kill_pubsub_connections(redis_url: str) -> int:
    """Cut every pub/sub connection of that Redis, as a network blip would."""
    client = aioredis.Redis.from_url(redis_url, protocol=2)
    try:
        return int(await client.client_kill_filter(_type="pubsub"))
    finally:
        await client.aclose()


@asynccontextmanager
async def cut_subscriptions(kill: Callable[[], Awaitable[int]], *apps: App) -> AsyncIterator[None]:
    """Cut the pub/sub connections (*kill*) and keep the instances of this
    process (*apps* among them) from subscribing again until the block
    ends; on entry, every app of *apps* has noticed the cut."""
    gate = asyncio.Event()
    original = Subscriber.subscribe

    @asynccontextmanager
    async def held(self: Subscriber, channels: Iterable[str]) -> AsyncIterator[Messages]:
        await gate.wait()
        async with original(self, channels) as messages:
            yield messages

    Subscriber.subscribe = held  # type: ignore[method-assign]
    try:
        assert await kill() >= 1
        async with asyncio.timeout(5):
            for app in apps:
                assert app.bus is not None
                while app.bus.subscribed.is_set():  # noqa: ASYNC110 (the bus has no event for it)
                    await asyncio.sleep(0.01)
        yield
    finally:
        Subscriber.subscribe = original  # type: ignore[method-assign]
        gate.set()


async def next_event(
    events: AsyncIterator[WatchEvent], *, within: float = 5.0, heartbeats: bool = False
) -> WatchEvent:
    """The next event (skipping heartbeats unless asked for), failing after *within* s,
    without its resume_token (events are compared by what they say; the
    tokens are tested in test_replay_log.py and test_watch_replay_client.py)."""
    async with asyncio.timeout(within):
        while True:
            event = await anext(events)
            if heartbeats or event.kind is not HEARTBEAT:
                return dataclasses.replace(event, resume_token="")


class CuttableLink:
    """A TCP proxy to 127.0.0.1:*port* whose connections the test can cut,
    as a network failure would, without stopping the server behind it."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.up = True
        self.port = 0

    async def __aenter__(self) -> CuttableLink:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def cut(self) -> None:
        """Close every connection; new ones are closed at once until `restore`."""
        self.up = False
        for writer in self._writers:
            writer.close()

    def restore(self) -> None:
        self.up = True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}
            writer.close()
            up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


def watchers(app: App) -> int:
    """How many Watch streams the instance serves (its WatchHub's count).

    The hub is only reachable through the Cache's private attribute: App
    does not expose it (reported; a gauge metric would want it too)."""
    assert app.cache is not None
    return len(app.cache._watch_hub)
