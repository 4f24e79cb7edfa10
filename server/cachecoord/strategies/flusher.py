"""The write-behind flusher: moves queued writes from Redis into PostgreSQL.

Each instance runs one per write-behind namespace, as a consumer of the
namespace's queues (Redis Streams, one consumer group shared by all
instances). A flush reads up to ``flush_batch`` entries, keeps the newest
entry of each key (coalescing), and commits them in one transaction whose
version guard (``... WHERE version < EXCLUDED.version``) makes replays and
reordering harmless. Entries are acknowledged (XACK, then XDEL) only after the
commit; only then does a flushed value get its TTL.

Failures: if PostgreSQL is down, entries stay pending and are retried with
backoff. An entry PostgreSQL rejects (a constraint, a bad type) is retried
alone, with backoff, and after ``max_attempts`` moved to the dead-letter
stream with its error; the other entries of its batch are committed, so one
bad entry never blocks the queue. Its acknowledged version must not silently
give way to the older one PostgreSQL holds: the key moves on to a new, higher
version holding PostgreSQL's row (WriteBehindStore.revert), announced with
reason ``rejected``. Entries pending on an instance that died are claimed by another
after ``claim_idle``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import psycopg
from opentelemetry import trace
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from cachecoord import background, instruments, telemetry
from cachecoord.config import NamespaceSettings
from cachecoord.errors import CacheCoordError
from cachecoord.storage import envelope
from cachecoord.storage.errors import RedisError
from cachecoord.storage.expiry import jittered
from cachecoord.storage.tables import Table
from cachecoord.storage.write_behind_store import Queued, Settle, WriteBehindStore
from cachecoord.strategies.changes import Changes

log = logging.getLogger(__name__)

_ADVANCE = """
WITH advanced AS (
    INSERT INTO cachecoord.versions AS v (namespace, key, version)
    SELECT %(ns)s, k, ver FROM unnest(%(keys)s::text[], %(versions)s::bigint[]) AS u(k, ver)
    ON CONFLICT (namespace, key) DO UPDATE SET version = EXCLUDED.version
    WHERE v.version < EXCLUDED.version
    RETURNING key
), writer AS (
    SELECT set_config('cachecoord.writer', 'on', true)  -- see invalidation/triggers.py
)
SELECT key FROM advanced, writer
"""

# Errors that say "this entry is wrong", as opposed to "PostgreSQL is down".
_REJECTED = (psycopg.IntegrityError, psycopg.DataError, psycopg.ProgrammingError, CacheCoordError)
_MAX_BACKOFF = 30.0
_MAX_LINKS = 128  # a flush span links to the Puts it writes, up to this many


_TRANSIENT = (RedisError, OSError, psycopg.OperationalError, psycopg.InterfaceError)
"""Backend failures a flush waits out (logged without a traceback)."""


class Flusher:
    """Flushes one write-behind namespace; ``open()``, then ``close()``."""

    def __init__(
        self,
        settings: NamespaceSettings,
        table: Table,
        queue: WriteBehindStore,
        pool: AsyncConnectionPool[AsyncConnection],
        *,
        changes: Changes,
        consumer: str,
    ) -> None:
        self._name = settings.name
        self._settings = settings
        self._table = table
        self._queue = queue
        self._pool = pool
        self._changes = changes
        self._consumer = consumer
        self._task: asyncio.Task[None] | None = None
        self._draining = False
        self._next_reclaim = 0.0
        self.queue_stats = instruments.QueueSample(settings.name)
        """The queues as last sampled (with metrics on), for the gauges."""
        self.flushed_rows = 0
        """Rows written to PostgreSQL so far (coalesced writes count once)."""

    async def open(self) -> None:
        self._draining = False
        instruments.watch_queues(self._probe)
        if self._task is None:
            with instruments.quiet():  # polling makes no span; flushes make their own
                self._task = asyncio.create_task(self._run(), name=f"flusher-{self._name}")

    async def close(self, grace: float) -> None:
        """Drain what can be flushed within *grace* seconds, then stop."""
        instruments.unwatch_queues(self._probe)
        task, self._task = self._task, None
        if task is None:
            return
        self._draining = True
        try:
            await asyncio.wait_for(asyncio.shield(task), grace)
        except TimeoutError:
            log.warning(
                "write-behind %s: queue not drained at shutdown; left for others", self._name
            )
        await background.stop(task)

    async def _run(self) -> None:
        backoff = 0.1
        interval = self._settings.flush_interval / 1000
        while True:
            try:
                started = time.monotonic()
                batch, given_up = await self._next_batch()
                if not batch and not given_up:
                    if self._draining:
                        return
                    continue
                if batch:
                    await self._flush(batch)
                # After the batch: older writes of a given-up key that were
                # retried with it are in PostgreSQL before its revert reads it.
                for entry, error in given_up:
                    with instruments.background_span(
                        "cache.dead_letter",
                        links=[link for link in [instruments.link_to(entry.traceparent)] if link],
                        attributes={"cache.namespace": self._name, "error.type": "rejected"},
                    ):
                        await self._dead_letter(entry, error)
                    if telemetry.METRICS:
                        instruments.dead_lettered.add(1, {"cache.namespace": self._name})
                backoff = 0.1
                if len(batch) < self._settings.flush_batch and not self._draining:
                    # Let writes gather for a whole interval: Puts to one key
                    # within it become one row write (coalescing).
                    await asyncio.sleep(max(0.0, started + interval - time.monotonic()))
            except Exception as err:
                if isinstance(err, _TRANSIENT):
                    log.warning("write-behind %s: flush deferred (%s)", self._name, err)
                else:
                    # Unforeseen (a bug): it must not stop this namespace's
                    # flushing for good; the entries stay queued, tried again.
                    log.exception("write-behind %s: flush failed; retrying", self._name)
                if self._draining:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    # -- reading -------------------------------------------------------------

    async def _next_batch(self) -> tuple[list[Queued], list[tuple[Queued, str]]]:
        """Entries to flush, and entries to give up on (with their error)."""
        if time.monotonic() >= self._next_reclaim:
            self._next_reclaim = time.monotonic() + self._settings.retry_after / 2000
            if telemetry.METRICS:
                await self._sample_queues()
            reclaimed, given_up = await self._reclaim()
            if reclaimed or given_up:
                return reclaimed, given_up
        block = None if self._draining else self._settings.flush_interval
        return await self._queue.read_new(self._consumer, self._settings.flush_batch, block), []

    async def _sample_queues(self) -> None:
        """Queue depth, the oldest queued write's age, pending entries and
        dead letters, for the gauges."""
        depth = await self._queue.depth()
        self.queue_stats = instruments.QueueSample(
            self._name,
            depth=depth.depth,
            oldest_age_s=depth.oldest_age_s,
            pending=depth.pending,
            dead_letters=depth.dead_letters,
        )

    def _probe(self) -> instruments.QueueSample:
        return self.queue_stats

    async def _reclaim(self) -> tuple[list[Queued], list[tuple[Queued, str]]]:
        """Entries due for another attempt: this consumer's failed ones after
        their backoff, and those of a consumer that stopped after claim_idle;
        and the entries PostgreSQL rejected that are out of attempts, with
        their error, for the dead-letter stream."""
        retry_ms = self._settings.retry_after
        due: list[Queued] = []
        given_up: list[tuple[Queued, str]] = []
        for queue in self._queue.queues:
            pending = await self._queue.pending(queue, self._settings.flush_batch, retry_ms)
            deliveries_of: dict[str, int] = {}
            for item in pending:
                mine = item.consumer == self._consumer
                wait = min(retry_ms * 2 ** (item.deliveries - 1), _MAX_BACKOFF * 1000)
                if item.idle_ms >= (wait if mine else self._settings.claim_idle):
                    deliveries_of[item.id] = item.deliveries
            if not deliveries_of:
                continue
            claimed = await self._queue.claim(queue, self._consumer, retry_ms, list(deliveries_of))
            for entry in claimed:
                if deliveries_of.get(entry.id, 0) >= self._settings.max_attempts:
                    # Only an entry PostgreSQL *rejected* is given up on; one
                    # that could not be written (PostgreSQL down) is retried
                    # for as long as it takes: it is an acknowledged write.
                    error = await self._queue.error_of(entry.id)
                    if error:
                        given_up.append((entry, error))
                        continue
                due.append(entry)
        return due, given_up

    async def _dead_letter(self, entry: Queued, reason: str) -> None:
        """Move *entry* to the dead-letter stream; first move its key on to a
        new version of PostgreSQL's row, if the entry is still its latest write
        (WriteBehindStore.revert). Acknowledged last: if this stops half-way, the entry is
        given up on again, and REVERT does nothing the second time."""
        async with self._pool.connection() as conn:
            row = (await self._table.load(conn, [entry.key]))[entry.key]
        reverted = await self._queue.revert(
            entry.key,
            entry.version,
            row.value,
            fresh_ms=self._settings.ttl,
            message=self._changes.message(entry.key, 0, "rejected"),
        )
        if reverted:
            self._changes.made_here(entry.key, reverted)
        await self._queue.add_dead_letter(entry, reason, reverted)
        await self._acknowledge([entry])
        log.error(
            "write-behind %s: key %r version %d dead-lettered after %d attempts: %s; %s",
            self._name,
            entry.key,
            entry.version,
            self._settings.max_attempts,
            reason,
            f"the key is now at version {reverted}, holding PostgreSQL's row"
            if reverted
            else "a newer write of the key replaced it",
        )

    # -- flushing ------------------------------------------------------------

    async def _flush(self, batch: list[Queued]) -> None:
        if not telemetry.TRACING:
            await self._flush_batch(batch)
            return
        links = [instruments.link_to(e.traceparent) for e in batch[:_MAX_LINKS]]
        with instruments.background_span(
            "cache.flush",
            kind=trace.SpanKind.CONSUMER,
            links=[link for link in links if link is not None],
            attributes={
                "cache.namespace": self._name,
                "messaging.system": "redis",
                "messaging.operation.type": "process",
                "messaging.destination.name": batch[0].queue,
                "messaging.batch.message_count": len(batch),
            },
        ):
            await self._flush_batch(batch)

    async def _flush_batch(self, batch: list[Queued]) -> None:
        newest: dict[str, Queued] = {}
        for entry in batch:
            if entry.key not in newest or entry.version > newest[entry.key].version:
                newest[entry.key] = entry
        rows = list(newest.values())
        stored: dict[str, bytes] = {}
        try:
            failed = await self._commit(rows, stored, isolated=False)
        except _REJECTED:
            stored.clear()
            failed = await self._commit(rows, stored, isolated=True)
        self.flushed_rows += len(rows) - len(failed)
        if failed:
            await self._queue.record_errors({newest[k].id: error for k, error in failed.items()})
            log.warning(
                "write-behind %s: PostgreSQL rejected %d entr(y/ies), will retry: %s",
                self._name,
                len(failed),
                "; ".join(f"{k!r}: {e}" for k, e in failed.items()),
            )
        await self._acknowledge([e for e in batch if e.key not in failed])
        await self._settle_cached([e for e in rows if e.key not in failed], stored)

    async def _commit(
        self, rows: list[Queued], stored: dict[str, bytes], *, isolated: bool
    ) -> dict[str, str]:
        """Write *rows* in one transaction; with *isolated*, each in a savepoint
        so that rejected rows are reported (key -> error) and the rest commit.
        Rows as PostgreSQL stored them (mapped tables) go into *stored*."""
        failed: dict[str, str] = {}
        async with self._pool.connection() as conn, conn.transaction():
            if not isolated:
                await self._write(conn, rows, stored)
                return failed
            for row in rows:
                try:
                    async with conn.transaction():
                        await self._write(conn, [row], stored)
                except _REJECTED as err:
                    failed[row.key] = _describe(err)
                    stored.pop(row.key, None)
        return failed

    async def _write(
        self, conn: AsyncConnection, rows: list[Queued], stored: dict[str, bytes]
    ) -> None:
        table = self._table
        # The rows first, then their versions (_ADVANCE), as a Put does
        # (WriteTransaction) and other programs' change triggers do: taking
        # the version rows first deadlocked with an UPDATE of the same row.
        await table.lock(conn, [row.key for row in rows if row.kind != "r"])
        cur = await conn.execute(
            _ADVANCE,
            {
                "ns": self._name,
                "keys": [r.key for r in rows],
                "versions": [r.version for r in rows],
            },
        )
        advanced = {key async for (key,) in cur}
        for row in rows:
            if row.key not in advanced:
                continue  # PostgreSQL already holds a newer version: a replay
            if row.kind == "r":
                continue  # a revert: the row stays as it is; its version moved up
            if row.kind == "n":
                await table.delete(conn, row.key)
                continue
            prepared = table.prepare(row.key, row.payload)
            written = await table.write(conn, row.key, prepared, row.tags)
            if table.merges_rows:
                stored[row.key] = written

    async def _acknowledge(self, entries: list[Queued]) -> None:
        await self._queue.acknowledge(entries)

    async def _settle_cached(self, rows: list[Queued], stored: dict[str, bytes]) -> None:
        """Flushed values become ordinary cache entries: they get a TTL (and a
        mapped row is replaced by the row as stored), unless rewritten meanwhile."""
        settings = self._settings
        settles = []
        for row in rows:
            ttl = jittered(
                settings.negative_ttl if row.kind == "n" else settings.ttl, settings.ttl_jitter
            )
            row_now = stored.get(row.key)
            replacement = b""
            if row_now is not None:
                # The row as stored may derive other tags (defaults); its
                # clock is the write's (read before it).
                tags = self._table.row_tags(row_now, row.tags)
                clock = envelope.parse_tag_prefix(row.tag_prefix)[1]
                fresh_until = time.time_ns() // 1_000_000 + ttl
                replacement = envelope.encode(row.version, fresh_until, 0, row_now, tags, clock)
            settles.append(Settle(row.key, row.version, ttl, replacement))
        await self._queue.settle(settles)


def _describe(err: Exception) -> str:
    if isinstance(err, psycopg.Error) and err.diag.message_primary:
        return err.diag.message_primary
    return str(err).splitlines()[0] if str(err) else type(err).__name__
