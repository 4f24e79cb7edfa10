"""The read path every strategy shares.

Redis first; on a miss, PostgreSQL under a *lease*: only the reader holding
``...:lease`` loads and fills, and its fill is a compare-and-set that fails if
any write or invalidation happened since (they delete the lease). Stampedes
are stopped in layers: concurrent misses in one instance share one load
(single-flight); readers on other instances wait for the holder's fill, woken
by its fill notice (with a bounded poll as fallback), up to ``lease_wait``;
a value past its freshness but inside ``stale_window`` is served at once,
marked stale, while one reader refreshes it in the background; and a hot key
is refreshed early with probability given by XFetch (Vattani et al., VLDB
2015): when ``now - load_time * beta * ln(rand) >= fresh_until``. If Redis is
unreachable, reads are answered from PostgreSQL, except in a write-behind
namespace: there Redis holds acknowledged writes PostgreSQL may not have yet,
so those reads answer UNAVAILABLE rather than an older row as if it were fresh.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import suppress
from functools import partial

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from redis.exceptions import RedisError

from cachecoord import instruments, telemetry
from cachecoord.config import NamespaceSettings, StrategyName
from cachecoord.coordination.single_flight import SingleFlight
from cachecoord.errors import Unavailable
from cachecoord.instruments import span
from cachecoord.invalidation.messages import Invalidation
from cachecoord.invalidation.near_cache import NearCache
from cachecoord.model import Entry, Layer, Row
from cachecoord.storage import envelope
from cachecoord.storage.postgres import database_errors
from cachecoord.storage.redis_store import EntryStore
from cachecoord.storage.tables import Table

log = logging.getLogger(__name__)

# The fallback poll for another reader's fill backs off up to this.
_MAX_POLL = 0.1


class Reader:
    """Get and BatchGet of one namespace."""

    def __init__(
        self,
        settings: NamespaceSettings,
        table: Table,
        store: EntryStore,
        pool: AsyncConnectionPool[AsyncConnection],
        *,
        origin: str,
    ) -> None:
        self.settings = settings
        self.origin = origin
        self.table = table
        self.store = store
        self.pool = pool
        # Write-behind: PostgreSQL may lag the acknowledged writes, and only
        # Redis (value and queue) knows whether a key has an unflushed one.
        self._postgres_may_lag = settings.strategy is StrategyName.WRITE_BEHIND
        self._loads: SingleFlight[str, Entry] = SingleFlight(f"load-{settings.name}")
        self._refreshes: SingleFlight[str, None] = SingleFlight(f"refresh-{settings.name}")
        self._fill_waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self.near = (
            NearCache(settings.near_cache_entries, settings.near_cache_ttl)
            if settings.near_cache_entries
            else None
        )

    async def get(self, key: str) -> Entry:
        near = self.near
        if near is None:
            return await self._get(key)
        with span("cache.near", **{"cache.namespace": self.settings.name}):
            entry = near.get(key)
        if entry is not None:
            return entry
        epoch = near.epoch
        entry = await self._get(key)
        near.put(entry, epoch)
        return entry

    async def _get(self, key: str) -> Entry:
        try:
            with span("cache.redis", **{"cache.namespace": self.settings.name}):
                raw = await self.store.get(key)
        except RedisError as err:
            self._check_postgres_can_answer(err)
            log.debug("redis get failed, reading PostgreSQL: %s", err)
            return await self._load_uncached(key)
        stale: Entry | None = None
        if raw is not None:
            entry, reload = self._hit(key, raw)
            if not reload:
                return entry
            stale = entry
        if key in self._loads and telemetry.METRICS:
            instruments.coalesced.add(1, {"cache.namespace": self.settings.name})
        try:
            return await self._loads.run(key, partial(self._miss, key, stale is not None))
        except Unavailable:
            if stale is None:
                raise
            return stale  # stale-if-error: PostgreSQL is down, this is all there is

    async def batch_get(self, keys: Sequence[str]) -> list[Entry]:
        entries: dict[str, Entry] = {}
        near = self.near
        epoch = 0
        if near is not None:
            epoch = near.epoch
            for key in keys:
                if (entry := near.get(key)) is not None:
                    entries[key] = entry
        unique = [key for key in dict.fromkeys(keys) if key not in entries]
        if unique:
            entries.update(await self._batch_get(unique))
            if near is not None:
                for key in unique:
                    near.put(entries[key], epoch)
        return [entries[key] for key in keys]

    async def _batch_get(self, unique: list[str]) -> dict[str, Entry]:
        entries: dict[str, Entry] = {}
        redis_up = True
        try:
            raws = await self.store.get_many(unique)
        except RedisError as err:
            self._check_postgres_can_answer(err)
            raws, redis_up = [None] * len(unique), False
        misses = []
        stale: dict[str, Entry] = {}
        for key, raw in zip(unique, raws, strict=True):
            if raw is None:
                misses.append(key)
                continue
            entry, reload = self._hit(key, raw)
            if reload:
                misses.append(key)
                stale[key] = entry
            else:
                entries[key] = entry
        if misses:
            try:
                entries.update(await self._load_misses(misses, redis_up, reload=bool(stale)))
            except Unavailable:
                if len(stale) < len(misses):
                    raise
                entries.update(stale)  # stale-if-error for every key that needed it
        return entries

    def _check_postgres_can_answer(self, err: RedisError) -> None:
        """Redis could not be read: raise Unavailable if PostgreSQL may be
        behind acknowledged writes (write-behind), instead of serving its older
        row as fresh. A miss *seen* in Redis is fine: an unflushed value is
        never evicted nor invalidated, so there is none for that key."""
        if self._postgres_may_lag:
            raise Unavailable(
                f"Redis cannot be read, and namespace {self.settings.name!r} is write-behind: "
                f"PostgreSQL may not have its acknowledged writes yet; retry ({err})"
            ) from err

    def on_fill(self, key: str) -> None:
        """Another reader filled *key*: wake whoever waits for it here."""
        for event in self._fill_waiters.get(key, ()):
            event.set()

    def fresh(
        self, key: str, row: Row, load_ms: int, ttl_ms: int | None = None
    ) -> tuple[Entry, bytes, int]:
        """The entry for a row just read or written, its envelope and Redis PX
        (the TTL plus the stale window, during which it may be served stale)."""
        settings = self.settings
        ttl: int = settings.negative_ttl if row.value is None else ttl_ms or settings.ttl
        ttl = max(1, round(ttl * (1 + settings.ttl_jitter * (2 * random.random() - 1))))
        stored = envelope.encode(row.version, _now_ms() + ttl, load_ms, row.value)
        entry = Entry(key, row.value, row.version, Layer.DATABASE, ttl_ms=ttl)
        return entry, stored, ttl + max(settings.stale_window, settings.stale_if_error)

    def _notice(self, key: str, row: Row) -> bytes:
        return Invalidation(self.settings.name, key, row.version, "fill", self.origin).encode()

    # -- hits ----------------------------------------------------------------

    def _hit(self, key: str, raw: bytes) -> tuple[Entry, bool]:
        """The cached entry, and whether it must be reloaded before serving:
        past its TTL and the stale window, it is only kept for stale-if-error."""
        cached = envelope.decode(raw)
        now = _now_ms()
        remaining = cached.fresh_until_ms - now
        if cached.dirty:  # the newest value there is: PostgreSQL is behind it
            return Entry(
                key, cached.value, cached.version, Layer.REDIS, False, max(0, remaining)
            ), False
        stale = remaining <= 0
        reload = stale and -remaining > self.settings.stale_window
        if not reload and (
            stale or self._refresh_early(now, cached.load_ms, cached.fresh_until_ms)
        ):
            self._refreshes.spawn(
                key, partial(self._refresh, key, cached.version, cached.fresh_until_ms)
            )
        entry = Entry(key, cached.value, cached.version, Layer.REDIS, stale, max(0, remaining))
        return entry, reload

    def _refresh_early(self, now_ms: int, load_ms: int, fresh_until_ms: int) -> bool:
        beta = self.settings.early_refresh_beta
        if beta <= 0:
            return False
        # XFetch: -ln(U) is exponential, so the chance grows as expiry nears,
        # and faster for keys that take long to load.
        return now_ms - max(load_ms, 1) * beta * math.log(1.0 - random.random()) >= fresh_until_ms

    async def _refresh(self, key: str, seen_version: int, seen_fresh_until: int) -> None:
        """Reload *key* in the background if no other reader is doing it, nor
        has done it since this reader saw the entry."""
        token = secrets.token_hex(8)
        try:
            taken = await self.store.take_leases(
                {key: token}, self.settings.lease, even_if_cached=True
            )
            if taken[key] is not True:
                return
            raw = await self.store.get(key)
            if raw is not None:
                now = envelope.decode(raw)
                if (now.version, now.fresh_until_ms) != (seen_version, seen_fresh_until):
                    return  # refreshed (or rewritten) by someone else meanwhile
            rows, load_ms = await self._load([key])
            _, stored, px = self.fresh(key, rows[key], load_ms)
            await self.store.fill_many({key: (token, stored, px, self._notice(key, rows[key]))})
        except Exception as err:  # a background refresh must never surface
            log.warning("refresh of %s/%s failed: %s", self.settings.name, key, err)

    # -- misses --------------------------------------------------------------

    async def _miss(self, key: str, reload: bool = False) -> Entry:
        entries = await self._load_misses([key], redis_up=True, reload=reload)
        return entries[key]

    async def _load_misses(
        self, keys: list[str], redis_up: bool, reload: bool = False
    ) -> dict[str, Entry]:
        """One SQL query for all *keys*; fill those whose lease this reader got.
        Keys leased by another reader are waited for first (single key only);
        keys filled meanwhile are served as they are now (unless *reload*)."""
        tokens = {key: secrets.token_hex(8) for key in keys}
        leased: dict[str, bool] = {}
        found: dict[str, Entry] = {}
        if redis_up:
            with suppress(RedisError):
                taken = await self.store.take_leases(
                    tokens, self.settings.lease, even_if_cached=reload
                )
                for key, outcome in taken.items():
                    if isinstance(outcome, bytes):
                        found[key] = self._hit(key, outcome)[0]
                    else:
                        leased[key] = outcome
        if found:
            keys = [key for key in keys if key not in found]
            if not keys:
                return found
        if len(keys) == 1 and leased and not leased[keys[0]]:
            filled = await self._await_fill(keys[0])
            if filled is not None:
                return {keys[0]: filled}
        rows, load_ms = await self._load(keys)
        entries, fills = {}, {}
        for key in keys:
            entry, stored, px = self.fresh(key, rows[key], load_ms)
            entries[key] = entry
            if leased.get(key):
                fills[key] = (tokens[key], stored, px, self._notice(key, rows[key]))
        try:
            with span("cache.fill", **{"cache.namespace": self.settings.name}):
                await self.store.fill_many(fills)
        except RedisError as err:
            log.debug("fill failed: %s", err)
        return {**entries, **found}

    async def _await_fill(self, key: str) -> Entry | None:
        with span("cache.lease_wait", **{"cache.namespace": self.settings.name}):
            return await self._wait_for_fill(key)

    async def _wait_for_fill(self, key: str) -> Entry | None:
        """Wait up to lease_wait for the lease holder's fill, woken by its
        notice; the poll only covers a lost notice."""
        filled = asyncio.Event()
        waiters = self._fill_waiters[key]
        waiters.add(filled)
        if telemetry.METRICS:
            instruments.coalesced.add(1, {"cache.namespace": self.settings.name})
        try:
            deadline = time.monotonic() + self.settings.lease_wait / 1000
            poll = 0.01
            while (remaining := deadline - time.monotonic()) > 0:
                with suppress(TimeoutError):
                    await asyncio.wait_for(filled.wait(), min(poll, remaining))
                filled.clear()
                poll = min(poll * 2, _MAX_POLL)
                try:
                    raw = await self.store.get(key)
                except RedisError:
                    return None
                if raw is not None:
                    return self._hit(key, raw)[0]
            return None
        finally:
            waiters.discard(filled)
            if not waiters:
                del self._fill_waiters[key]

    async def _load_uncached(self, key: str) -> Entry:
        rows, _ = await self._load([key])
        row = rows[key]
        return Entry(key, row.value, row.version, Layer.DATABASE)

    async def _load(self, keys: Sequence[str]) -> tuple[dict[str, Row], int]:
        with span("cache.load", **{"cache.namespace": self.settings.name, "cache.keys": len(keys)}):
            async with database_errors(), self.pool.connection() as conn:
                # Only the query is timed: XFetch needs what a reload costs,
                # not how long this request waited for a connection.
                started = time.monotonic()
                rows = await self.table.load(conn, keys)
                load_ms = (time.monotonic() - started) * 1000
        if telemetry.METRICS:
            instruments.load_duration.record(load_ms, {"cache.namespace": self.settings.name})
        return rows, round(load_ms)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
