"""What every strategy shares: the read path and invalidation.

Reads go Redis, then (on a miss) PostgreSQL under a *lease*: only the reader
holding ``...:lease`` loads and fills, and its fill is a compare-and-set that
fails if any write or invalidation happened since (they delete the lease).
Concurrent misses in one instance share one load (single-flight); readers on
other instances wait for the holder's fill, up to ``lease_wait``. If Redis is
unreachable, reads are answered from PostgreSQL.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from redis.exceptions import RedisError

from cachecoord.config import NamespaceSettings
from cachecoord.coordination.single_flight import SingleFlight
from cachecoord.errors import Unavailable, VersionConflict
from cachecoord.invalidation.messages import Invalidation
from cachecoord.invalidation.outbox import Outbox
from cachecoord.model import Deleted, Entry, Layer, Row
from cachecoord.storage import envelope
from cachecoord.storage.postgres import RecordedWrite, database_errors, record_write
from cachecoord.storage.redis_store import EntryStore
from cachecoord.storage.tables import Table

log = logging.getLogger(__name__)

# Polling for another reader's fill starts fast and backs off to this.
_MAX_POLL = 0.05


@dataclass(frozen=True, slots=True)
class Backends:
    """The shared resources a strategy works with."""

    pool: AsyncConnectionPool[AsyncConnection]
    outbox: Outbox
    origin: str


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
        self._loads: SingleFlight[str, Entry] = SingleFlight(f"load-{settings.name}")

    @classmethod
    def partitions(cls, settings: NamespaceSettings) -> int:
        """How many queue partitions the namespace's keys are grouped in (0: none)."""
        return 0

    # -- reads ---------------------------------------------------------------

    async def get(self, key: str) -> Entry:
        try:
            raw = await self.store.get(key)
        except RedisError as err:
            log.debug("redis get failed, reading PostgreSQL: %s", err)
            return await self._load_uncached(key)
        if raw is not None:
            return _cached(key, raw)
        return await self._loads.run(key, partial(self._miss, key))

    async def batch_get(self, keys: Sequence[str]) -> list[Entry]:
        unique = list(dict.fromkeys(keys))
        entries: dict[str, Entry] = {}
        redis_up = True
        try:
            raws = await self.store.get_many(unique)
        except RedisError:
            raws, redis_up = [None] * len(unique), False
        misses = []
        for key, raw in zip(unique, raws, strict=True):
            if raw is None:
                misses.append(key)
            else:
                entries[key] = _cached(key, raw)
        if misses:
            entries.update(await self._load_misses(misses, redis_up))
        return [entries[key] for key in keys]

    async def _miss(self, key: str) -> Entry:
        entries = await self._load_misses([key], redis_up=True)
        return entries[key]

    async def _load_misses(self, keys: list[str], redis_up: bool) -> dict[str, Entry]:
        """One SQL query for all *keys*; fill those whose lease this reader got.
        Keys leased by another reader are waited for first (single key only)."""
        tokens = {key: secrets.token_hex(8) for key in keys}
        leased: dict[str, bool] = {}
        if redis_up:
            with suppress(RedisError):
                leased = await self.store.take_leases(tokens, self.settings.lease)
        if len(keys) == 1 and redis_up and leased and not leased[keys[0]]:
            filled = await self._await_fill(keys[0])
            if filled is not None:
                return {keys[0]: filled}
        rows, load_ms = await self._load(keys)
        entries, fills = {}, {}
        for key in keys:
            entry, stored, px = self._fresh(key, rows[key], load_ms)
            entries[key] = entry
            if leased.get(key):
                fills[key] = (tokens[key], stored, px)
        try:
            await self.store.fill_many(fills)
        except RedisError as err:
            log.debug("fill failed: %s", err)
        return entries

    async def _await_fill(self, key: str) -> Entry | None:
        """Wait up to lease_wait for the lease holder's fill to appear."""
        deadline = time.monotonic() + self.settings.lease_wait / 1000
        delay = 0.002
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_POLL)
            try:
                raw = await self.store.get(key)
            except RedisError:
                return None
            if raw is not None:
                return _cached(key, raw)
        return None

    async def _load_uncached(self, key: str) -> Entry:
        rows, _ = await self._load([key])
        row = rows[key]
        return Entry(key, row.value, row.version, Layer.DATABASE)

    async def _load(self, keys: Sequence[str]) -> tuple[dict[str, Row], int]:
        started = time.monotonic()
        async with database_errors(), self.pool.connection() as conn:
            rows = await self.table.load(conn, keys)
        return rows, round((time.monotonic() - started) * 1000)

    def _fresh(
        self, key: str, row: Row, load_ms: int, ttl_ms: int | None = None
    ) -> tuple[Entry, bytes, int]:
        """The entry for a row just read or written, its envelope and Redis PX."""
        ttl: int = self.settings.negative_ttl if row.value is None else ttl_ms or self.settings.ttl
        ttl = max(1, round(ttl * (1 + self.settings.ttl_jitter * (2 * random.random() - 1))))
        stored = envelope.encode(row.version, _now_ms() + ttl, load_ms, row.value)
        return Entry(key, row.value, row.version, Layer.DATABASE, ttl_ms=ttl), stored, ttl

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
        async with database_errors(), self.pool.connection() as conn, conn.transaction():
            recorded = await record_write(conn, self.name, key, reason, floor)
            if expected_version is not None:
                assert floor == 0, "compare-and-set needs versions that step by one"
                previous = recorded.version - 1
                current = previous if await self.table.exists(conn, key) else 0
                if current != expected_version:
                    raise VersionConflict(key, expected_version, current)
            yield conn, recorded

    def message(self, key: str | None, version: int, reason: str) -> bytes:
        return Invalidation(self.name, key, version, reason, self.origin).encode()

    # -- invalidation --------------------------------------------------------

    async def invalidate(self, keys: Sequence[str]) -> int:
        messages = {key: self.message(key, 0, "invalidate") for key in keys}
        try:
            return await self.store.invalidate(messages)
        except RedisError as err:
            raise Unavailable(f"Redis is unavailable, nothing was invalidated: {err}") from err

    async def invalidate_all(self) -> int:
        try:
            return await self.store.drop_namespace(self.message(None, 0, "invalidate"))
        except RedisError as err:
            raise Unavailable(f"Redis is unavailable, nothing was invalidated: {err}") from err


def _cached(key: str, raw: bytes) -> Entry:
    cached = envelope.decode(raw)
    ttl_ms = max(0, cached.fresh_until_ms - _now_ms())
    return Entry(key, cached.value, cached.version, Layer.REDIS, ttl_ms=ttl_ms)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
