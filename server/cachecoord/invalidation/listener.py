"""LISTEN for changes recorded by the triggers, on a connection of its own.

LISTEN needs an autocommit connection that stays open, and is lost with it,
so after every reconnect the listener issues LISTEN again and asks the outbox
to drain: notifications sent while it was away are gone, their outbox rows
are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import psycopg

from cachecoord import background, instruments
from cachecoord.invalidation.triggers import CHANNEL

log = logging.getLogger(__name__)


class ChangeListener(background.Component):
    """Calls *on_change* for every notification, and after every (re)connect."""

    def __init__(
        self, url: str, on_change: Callable[[], None], *, reconnect_delay: float = 0.5
    ) -> None:
        self._url = url
        self._on_change = on_change
        self._reconnect_delay = reconnect_delay
        self._loop = background.Loop(self._run, name="cachecoord-listener")
        self.listening = asyncio.Event()

    async def open(self) -> None:
        """LISTEN (and keep reconnecting) in the background."""
        with instruments.quiet():  # only a reconnect makes a span
            self._loop.start()

    async def close(self) -> None:
        """Stop listening; the connection closes with the loop."""
        await self._loop.stop()

    async def _run(self) -> None:
        reconnecting = False
        while True:
            try:
                async with await self._connect(reconnecting) as conn:
                    self.listening.set()
                    self._on_change()  # the backlog, and whatever came while away
                    async for _ in conn.notifies():
                        self._on_change()
            except psycopg.Error as err:
                log.warning("change listener disconnected (%s); reconnecting", err)
            finally:
                self.listening.clear()
            reconnecting = True
            await asyncio.sleep(self._reconnect_delay)

    async def _connect(self, reconnecting: bool) -> psycopg.AsyncConnection[Any]:
        """Connect and LISTEN; a reconnect is traced (the first connect, at
        start-up, is not: an idle instance exports no span)."""
        span = instruments.background_span("cache.listener.reconnect") if reconnecting else None
        with span or contextlib.nullcontext():
            conn = await psycopg.AsyncConnection.connect(self._url, autocommit=True)
            try:
                await conn.execute(f"LISTEN {CHANNEL}")
            except BaseException:
                await conn.close()
                raise
        return conn
