"""Cache-aside: PostgreSQL first, then drop the cached copy.

The next read loads the new row under a lease. The drop happens after the
commit; if it cannot (Redis down, instance killed), the outbox row committed
with the write makes the drainer do it later.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cachecoord.config import NamespaceSettings
from cachecoord.model import Deleted
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


class CacheAside:
    """Cache-aside's writes (a WritePolicy)."""

    def __init__(
        self, table: Table, store: EntryStore, backends: Backends, changes: Changes
    ) -> None:
        self.name = changes.name
        self._store = store
        self._outbox = backends.outbox
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
    ) -> int:
        # No tag clock: nothing is cached here; the next read's fill reads it.
        return await self._writes.put(key, value, expected_version, ttl_ms, tags=tags)

    async def delete(self, key: str, expected_version: int | None) -> Deleted:
        return await self._writes.delete(key, expected_version)

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
        """Bring Redis up to date with a committed write (here: drop the entry)."""
        reason = "put" if stored is not None else "delete"
        message = self._changes.message(key, recorded.version, reason).encode()
        try:
            await self._store.invalidate({key: message})
        except RedisError as err:
            log.warning("invalidation of %s/%s left to the outbox: %s", self.name, key, err)
            return
        finally:
            # After Redis: a Get here that read the old copy from Redis before
            # the drop may not keep it in the near cache, nor serve it after
            # the answer (our own message may come back after the answer).
            self._changes.made_here(key, recorded.version)
        self._outbox.done(recorded.outbox_id)


def build(
    settings: NamespaceSettings, table: Table, store: EntryStore, backends: Backends
) -> Strategy:
    reader = Reader(settings, table, store, backends.pool, origin=backends.origin)
    changes = Changes(settings.name, backends.origin, reader)
    writes = CacheAside(table, store, backends, changes)
    return Strategy(
        settings, table=table, store=store, reader=reader, writes=writes, changes=changes
    )


CACHE_ASIDE = StrategyKind(build)
