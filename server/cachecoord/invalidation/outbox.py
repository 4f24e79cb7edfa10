"""The transactional outbox: invalidations committed with their write.

Every write records its invalidation in ``cachecoord.outbox`` inside its own
transaction. Right after the commit the strategy applies it to Redis and hands
the row to :meth:`Outbox.done`, which deletes finished rows in batches. Rows
left behind (Redis down, instance killed between commit and cache delete) are
applied by the drainer, on any instance: ``FOR UPDATE SKIP LOCKED`` keeps
several instances from doing the same row twice. Re-applying an invalidation
is harmless: it only drops a cache entry. For the same reason the drainer's
own commits do not wait for the WAL to reach disk (``synchronous_commit``
off): a deletion lost in a crash only means one more harmless re-application,
and a database whose disk is slow does not hold invalidations back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Mapping

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from cachecoord import background, instruments, telemetry
from cachecoord.invalidation.messages import Invalidation
from cachecoord.storage.errors import RedisError
from cachecoord.storage.redis_store import EntryStore

log = logging.getLogger(__name__)

_DRAIN = """
DELETE FROM cachecoord.outbox WHERE id IN (
    SELECT id FROM cachecoord.outbox
    WHERE namespace = ANY(%(served)s)
      AND (reason = 'db_change' OR created_at < now() - %(grace_ms)s * interval '1 millisecond')
    ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
) RETURNING namespace, key, version, reason
"""


_NO_FLUSH_WAIT = "SET LOCAL synchronous_commit TO off"


class Outbox(background.Component):
    """Finishes committed invalidations; see the module docstring."""

    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConnection],
        stores: Mapping[str, EntryStore],
        *,
        origin: str,
        interval_ms: int,
        grace_ms: int = 2_000,
        batch: int = 500,
    ) -> None:
        self._pool = pool
        self._stores = stores
        self._origin = origin
        self._interval = interval_ms / 1000
        self._grace_ms = grace_ms
        self._batch = batch
        self._done: list[int] = []
        self._wake = asyncio.Event()
        self._loop = background.Loop(self._run, name="cachecoord-outbox")
        self.backlog: int | None = None
        """Outbox rows of the namespaces served here, as last counted (with metrics on)."""

    def wake(self) -> None:
        """Drain now (changes were recorded by the database triggers)."""
        self._wake.set()

    def done(self, outbox_id: int) -> None:
        """The invalidation of row *outbox_id* reached Redis; forget the row soon."""
        self._done.append(outbox_id)
        if len(self._done) >= self._batch:
            self._wake.set()

    async def open(self) -> None:
        """Drain every ``interval_ms`` (and when woken) in the background."""
        if self._loop.running:
            return
        instruments.watch_outbox(self._probe)
        with instruments.quiet():  # an empty drain makes no span; a real one its own
            self._loop.start()

    async def close(self) -> None:
        """Stop draining, and forget the rows already finished."""
        instruments.unwatch_outbox(self._probe)
        await self._loop.stop()
        await self._forget_done()

    async def drain(self) -> int:
        """Apply invalidations left behind for longer than the grace period."""
        started = time.time_ns()
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(_NO_FLUSH_WAIT)
            # Only namespaces served here: in a rolling deploy another instance
            # may serve a namespace this one does not know yet.
            cur = await conn.execute(
                _DRAIN,
                {"served": list(self._stores), "grace_ms": self._grace_ms, "limit": self._batch},
            )
            rows = await cur.fetchall()
            if rows:
                with instruments.background_span(
                    "cache.outbox.drain",
                    start_time=started,
                    attributes={"cache.outbox.rows": len(rows)},
                ):
                    await self._apply(rows)
            # Leaving the block commits: the rows go only once Redis has them.
        return len(rows)

    async def _apply(self, rows: list[tuple[str, str | None, int, str]]) -> None:
        by_namespace: defaultdict[str, dict[str, bytes]] = defaultdict(dict)
        for namespace, key, version, reason in rows:
            store = self._stores[namespace]
            message = Invalidation(namespace, key, version, reason, self._origin).encode()
            if key is None:
                await store.drop_namespace(message)
            else:
                by_namespace[namespace][key] = message
        for namespace, messages in by_namespace.items():
            await self._stores[namespace].invalidate(messages)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            try:
                # Changes made by other programs first: they are waiting to be
                # invalidated; finished rows only need to go eventually.
                while await self.drain() == self._batch:
                    pass
                await self._forget_done()
                if telemetry.METRICS:
                    await self._count_backlog()
            except (RedisError, psycopg.Error, OSError) as err:
                log.warning("outbox drain failed, will retry: %s", err)

    async def _count_backlog(self) -> None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM cachecoord.outbox WHERE namespace = ANY(%s)",
                (list(self._stores),),
            )
            row = await cur.fetchone()
        self.backlog = int(row[0]) if row else 0

    def _probe(self) -> int | None:
        return self.backlog

    async def _forget_done(self) -> None:
        ids, self._done = self._done, []
        if not ids:
            return
        try:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(_NO_FLUSH_WAIT)
                await conn.execute("DELETE FROM cachecoord.outbox WHERE id = ANY(%s)", (ids,))
        except psycopg.Error as err:
            # The drainer will re-apply them later; harmless.
            log.warning("could not forget %d finished outbox rows: %s", len(ids), err)
