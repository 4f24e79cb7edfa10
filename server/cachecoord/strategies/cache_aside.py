"""Cache-aside: PostgreSQL first, then drop the cached copy.

The next read loads the new row under a lease. The drop happens after the
commit; if it cannot (Redis down, instance killed), the outbox row committed
with the write makes the drainer do it later.
"""

from __future__ import annotations

import logging

from redis.exceptions import RedisError

from cachecoord.model import Deleted
from cachecoord.storage.postgres import RecordedWrite
from cachecoord.strategies.base import Strategy

log = logging.getLogger(__name__)


class CacheAside(Strategy):
    async def put(
        self, key: str, value: bytes, expected_version: int | None, ttl_ms: int | None
    ) -> int:
        prepared = self.table.prepare(key, value)
        async with self._write(key, "put", expected_version) as (conn, recorded):
            stored = await self.table.write(conn, key, prepared)
        await self.after_commit(key, recorded, stored, ttl_ms)
        return recorded.version

    async def delete(self, key: str, expected_version: int | None) -> Deleted:
        async with self._write(key, "delete", expected_version) as (conn, recorded):
            deleted = await self.table.delete(conn, key)
        await self.after_commit(key, recorded, None, None)
        return Deleted(deleted, recorded.version)

    async def after_commit(
        self, key: str, recorded: RecordedWrite, stored: bytes | None, ttl_ms: int | None
    ) -> None:
        """Bring Redis up to date with a committed write (here: drop the entry)."""
        reason = "put" if stored is not None else "delete"
        try:
            await self.store.invalidate({key: self.message(key, recorded.version, reason)})
        except RedisError as err:
            log.warning("invalidation of %s/%s left to the outbox: %s", self.name, key, err)
            return
        finally:
            # After Redis: a Get here that read the old copy from Redis before
            # the drop may not keep it in the near cache, nor serve it after
            # the answer (our own message may come back after the answer).
            self.changed_here(key, recorded.version)
        self.outbox.done(recorded.outbox_id)
