"""Write-through: PostgreSQL, then the new value into Redis, before answering.

A read right after the Put, on any instance, is a hit on the new version. The
Redis write is version-guarded, so a slower writer never replaces a newer
value; if it fails, the outbox row makes the drainer drop the entry instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cachecoord.config import NamespaceSettings
from cachecoord.model import Deleted, Row
from cachecoord.storage.errors import RedisError
from cachecoord.storage.postgres import RecordedWrite
from cachecoord.storage.redis_store import EntryStore
from cachecoord.storage.tables import Table
from cachecoord.strategies.base import Backends, Strategy, StrategyKind
from cachecoord.strategies.changes import Changes
from cachecoord.strategies.database_first import DatabaseFirst
from cachecoord.strategies.flusher import Flusher
from cachecoord.strategies.reads import Reader
from cachecoord.strategies.transaction import WriteTransaction

log = logging.getLogger(__name__)


class WriteThrough:
    """Write-through's writes (a WritePolicy); also write-behind's when its
    queue is full (with a version *floor*)."""

    def __init__(
        self,
        table: Table,
        store: EntryStore,
        backends: Backends,
        reader: Reader,
        changes: Changes,
    ) -> None:
        self.name = changes.name
        self._table = table
        self._store = store
        self._outbox = backends.outbox
        self._reader = reader
        self._changes = changes
        transaction = WriteTransaction(changes.name, table, backends.pool)
        self._writes = DatabaseFirst(table, transaction, self)

    async def put(
        self,
        key: str,
        value: bytes,
        expected_version: int | None,
        ttl_ms: int | None,
        tags: Sequence[str] = (),
        *,
        floor: int = 0,
    ) -> int:
        clock = await self._tag_clock() if tags or self._table.tagged else 0
        return await self._writes.put(
            key, value, expected_version, ttl_ms, floor=floor, tags=tags, clock=clock
        )

    async def _tag_clock(self) -> int:
        """The tag clock before the write: the cached value then counts as
        written no later than now (strategies/tagging.py). If Redis cannot say,
        0, older than any clock: the value counts as invalid, which at worst
        costs a reload."""
        try:
            return await self._store.started_tag_clock()
        except RedisError:
            return 0

    async def delete(self, key: str, expected_version: int | None, *, floor: int = 0) -> Deleted:
        return await self._writes.delete(key, expected_version, floor=floor)

    def flusher(self, consumer: str) -> Flusher | None:
        return None

    async def after_commit(
        self,
        key: str,
        recorded: RecordedWrite,
        stored: bytes | None,
        ttl_ms: int | None,
        tags: tuple[str, ...] = (),
        clock: int = 0,
    ) -> None:
        """Bring Redis up to date with a committed write (here: cache it,
        unless a newer version is cached)."""
        _, cached, px = self._reader.fresh(
            key, Row(stored, recorded.version, tags), load_ms=0, ttl_ms=ttl_ms, clock=clock
        )
        reason = "put" if stored is not None else "delete"
        try:
            await self._store.store(
                key,
                cached,
                px,
                recorded.version,
                self._changes.message(key, recorded.version, reason).encode(),
            )
        except RedisError as err:
            log.warning("cache write of %s/%s left to the outbox: %s", self.name, key, err)
            return
        finally:
            self._changes.made_here(key, recorded.version)  # after Redis: see CacheAside
        self._outbox.done(recorded.outbox_id)


def build(
    settings: NamespaceSettings, table: Table, store: EntryStore, backends: Backends
) -> Strategy:
    reader = Reader(settings, table, store, backends.pool, origin=backends.origin)
    changes = Changes(settings.name, backends.origin, reader)
    writes = WriteThrough(table, store, backends, reader, changes)
    return Strategy(
        settings, table=table, store=store, reader=reader, writes=writes, changes=changes
    )


WRITE_THROUGH = StrategyKind(build)
