"""Write-through: PostgreSQL, then the new value into Redis, before answering.

A read right after the Put, on any instance, is a hit on the new version. The
Redis write is version-guarded, so a slower writer never replaces a newer
value; if it fails, the outbox row makes the drainer drop the entry instead.
"""

from __future__ import annotations

import logging

from redis.exceptions import RedisError

from cachecoord.model import Row
from cachecoord.storage.postgres import RecordedWrite
from cachecoord.strategies.cache_aside import CacheAside

log = logging.getLogger(__name__)


class WriteThrough(CacheAside):
    async def after_commit(
        self, key: str, recorded: RecordedWrite, stored: bytes | None, ttl_ms: int | None
    ) -> None:
        _, cached, px = self.reader.fresh(
            key, Row(stored, recorded.version), load_ms=0, ttl_ms=ttl_ms
        )
        reason = "put" if stored is not None else "delete"
        try:
            await self.store.store(
                key,
                cached,
                px,
                recorded.version,
                self.message(key, recorded.version, reason),
            )
        except RedisError as err:
            log.warning("cache write of %s/%s left to the outbox: %s", self.name, key, err)
            return
        finally:
            self.changed_here(key, recorded.version)  # after Redis: see CacheAside
        self.outbox.done(recorded.outbox_id)
