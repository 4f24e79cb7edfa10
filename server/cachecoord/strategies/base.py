"""What every strategy shares: the read path (reads.py), the write
transaction, and invalidation."""

from __future__ import annotations

import abc
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from psycopg import AsyncConnection, Rollback
from psycopg_pool import AsyncConnectionPool
from redis.exceptions import RedisError

from cachecoord import instruments, telemetry
from cachecoord.config import NamespaceSettings
from cachecoord.errors import ConstraintViolation, Unavailable, VersionConflict
from cachecoord.invalidation.messages import Invalidation
from cachecoord.invalidation.outbox import Outbox
from cachecoord.model import Deleted, Entry
from cachecoord.storage.postgres import (
    RecordedWrite,
    database_errors,
    record_write,
    skip_implicit_version,
)
from cachecoord.storage.redis_store import EntryStore
from cachecoord.storage.tables import Table
from cachecoord.strategies.reads import Reader

log = logging.getLogger(__name__)

# Polling for another reader's fill starts fast and backs off to this.
_MAX_POLL = 0.05


@dataclass(frozen=True, slots=True)
class Backends:
    """The shared resources a strategy works with."""

    pool: AsyncConnectionPool[AsyncConnection]
    outbox: Outbox
    origin: str


_ROW_ATTEMPTS = 3
"""Transactions a write starts over when its row appeared under it."""


class Strategy(abc.ABC):
    """A namespace's caching behaviour. Subclasses define how writes reach
    PostgreSQL and Redis (:meth:`put`, :meth:`delete`)."""

    def __init__(
        self, settings: NamespaceSettings, table: Table, store: EntryStore, backends: Backends
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.table = table
        self.store = store
        self.pool = backends.pool
        self.outbox = backends.outbox
        self.origin = backends.origin
        self.reader = Reader(settings, table, store, backends.pool, origin=backends.origin)

    @classmethod
    def partitions(cls, settings: NamespaceSettings) -> int:
        """How many queue partitions the namespace's keys are grouped in (0: none)."""
        return 0

    # -- reads ---------------------------------------------------------------

    async def get(self, key: str, min_version: int = 0) -> Entry:
        return await self.reader.get(key, min_version=min_version)

    async def batch_get(
        self, keys: Sequence[str], min_versions: Mapping[str, int] | None = None
    ) -> list[Entry]:
        return await self.reader.batch_get(keys, min_versions=min_versions)

    def on_message(self, message: Invalidation) -> None:
        """A message of this namespace's channel, from any instance."""
        if message.reason == "fill":
            # Not a change: the filled version is the current one.
            if message.key is not None:
                self.reader.on_fill(message.key)
        elif self.reader.near is not None:
            self.reader.near.invalidate(message.key, message.version)

    def changed_here(self, key: str | None, version: int) -> None:
        """This instance changed *key* (Redis has the change): forget it locally
        now, not when our own message comes back, so a Get right after a Put
        here sees the Put. Called after the Redis update, so that a Get that
        read the old copy from Redis before it cannot keep it here."""
        if self.reader.near is not None:
            self.reader.near.invalidate(key, version)
        if telemetry.METRICS:
            instruments.invalidations_published.add(1, {"cache.namespace": self.name})

    def on_reset(self) -> None:
        """Messages may have been missed: nothing held locally can be trusted."""
        if self.reader.near is not None:
            self.reader.near.flush()

    # -- writes --------------------------------------------------------------

    @abc.abstractmethod
    async def put(
        self, key: str, value: bytes, expected_version: int | None, ttl_ms: int | None
    ) -> int:
        """Write *value*; return the new version."""

    @abc.abstractmethod
    async def delete(self, key: str, expected_version: int | None) -> Deleted:
        """Delete *key*; return whether a row existed and the deletion's version."""

    @asynccontextmanager
    async def _write(
        self, key: str, reason: str, expected_version: int | None, floor: int = 0
    ) -> AsyncIterator[tuple[AsyncConnection, RecordedWrite]]:
        """A transaction that bumps the key's version (to at least *floor*),
        records the outbox row, and checks *expected_version* (the writer holds
        the key's version row lock until commit, so the check cannot race)."""
        async with database_errors(), self.pool.connection() as conn:
            for _ in range(_ROW_ATTEMPTS):
                async with conn.transaction():
                    locked = await self._lock_key(conn, key, reason, floor)
                    if locked is None:
                        raise Rollback  # the row appeared meanwhile: again
                    exists, recorded = locked
                    if expected_version is not None:
                        assert floor == 0, "compare-and-set needs versions that step by one"
                        if exists is None:
                            exists = await self.table.exists(conn, key)
                        current = recorded.version - 1 if exists else 0
                        if current != expected_version:
                            raise VersionConflict(key, expected_version, current)
                    yield conn, recorded
                    return
            # A row that each attempt sees but cannot lock (row-level security
            # that lets cachecoord's role read it but not update it, say).
            raise ConstraintViolation(
                f"the row of key {key!r} could not be locked for the write; "
                "check that cachecoord's PostgreSQL role may update the table"
            )

    async def _lock_key(
        self, conn: AsyncConnection, key: str, reason: str, floor: int
    ) -> tuple[bool | None, RecordedWrite] | None:
        """Lock the key's row (mapped tables), then bump its version (which
        locks the version row): whether the row exists (None: not looked at)
        and the new version; None if the row was inserted in between.

        The change triggers of other programs' writes lock a mapped row, then
        its version row; locking them in the opposite order deadlocked with
        them. A row that did not exist could not be locked first: if another
        writer inserted it before we got the version row, start again (and
        lock it first)."""
        if not self.table.merges_rows:
            return None, await record_write(conn, self.name, key, reason, floor)
        exists = await self.table.exists(conn, key, lock=True)
        recorded = await record_write(conn, self.name, key, reason, floor)
        if not exists and await self.table.exists(conn, key):
            return None
        if recorded.version == 1 and exists:
            recorded = await skip_implicit_version(conn, self.name, key, recorded)
        return exists, recorded

    def message(self, key: str | None, version: int, reason: str) -> bytes:
        return Invalidation(self.name, key, version, reason, self.origin).encode()

    # -- invalidation --------------------------------------------------------

    async def invalidate(self, keys: Sequence[str]) -> int:
        messages = {key: self.message(key, 0, "invalidate") for key in keys}
        try:
            return await self.store.invalidate(messages)
        except RedisError as err:
            raise Unavailable(f"Redis is unavailable, nothing was invalidated: {err}") from err
        finally:
            for key in keys:  # after Redis: see CacheAside.after_commit
                self.changed_here(key, 0)

    async def invalidate_all(self) -> int:
        try:
            return await self.store.drop_namespace(self.message(None, 0, "invalidate"))
        except RedisError as err:
            raise Unavailable(f"Redis is unavailable, nothing was invalidated: {err}") from err
        finally:
            self.changed_here(None, 0)
