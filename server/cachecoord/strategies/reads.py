"""The read path every strategy shares.

Redis first; on a miss, PostgreSQL under a *lease*: only the reader holding
``...:lease`` loads and fills, and its fill is a compare-and-set that fails if
any write or invalidation happened since (they delete the lease). Stampedes
are stopped in layers: concurrent misses in one instance share one load
(single-flight; a reader takes a shared result only if it joined before the
read that proves the result current, see coordination/single_flight.py, so
a Get that starts after a write was acknowledged never takes a row read
before it); readers on other instances wait for the holder's fill, woken
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
import secrets
from collections import defaultdict
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import replace
from functools import partial

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from cachecoord import instruments, telemetry
from cachecoord.clock import SYSTEM_CLOCK, SYSTEM_RANDOM, Clock, Random
from cachecoord.config import NamespaceSettings, StrategyName
from cachecoord.consistency import Versions
from cachecoord.coordination.single_flight import Shared, SingleFlight
from cachecoord.errors import Unavailable
from cachecoord.instruments import span
from cachecoord.invalidation.messages import FillNotice
from cachecoord.invalidation.near_cache import NearCache
from cachecoord.model import Entry, Layer, Row
from cachecoord.storage import envelope
from cachecoord.storage.envelope import Cached
from cachecoord.storage.errors import RedisError
from cachecoord.storage.postgres import database_errors
from cachecoord.storage.redis_store import EntryStore
from cachecoord.storage.tables import Table
from cachecoord.strategies.read_decisions import (
    FillWait,
    Read,
    decide_hit,
    fill_ttl,
    loaded_read,
    plan_misses,
)
from cachecoord.strategies.tagging import TagMarks

log = logging.getLogger(__name__)


def _marked(entry: Entry, reloaded: bool) -> Entry:
    return replace(entry, reloaded=True) if reloaded else entry


# The fallback poll for another reader's fill backs off up to this.
_MAX_POLL = 0.1


_REFRESHED: Shared[None] = Shared(None, 0)


class Reader:
    """Get and BatchGet of one namespace. What it does with what Redis and
    PostgreSQL answer is decided in read_decisions.py, by the injected
    *clock* and *rand* (the system's by default)."""

    def __init__(
        self,
        settings: NamespaceSettings,
        table: Table,
        store: EntryStore,
        pool: AsyncConnectionPool[AsyncConnection],
        *,
        origin: str,
        clock: Clock = SYSTEM_CLOCK,
        rand: Random = SYSTEM_RANDOM,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._rand = rand
        self.origin = origin
        self.table = table
        self.store = store
        self.pool = pool
        # Write-behind: PostgreSQL may lag the acknowledged writes, and only
        # Redis (value and queue) knows whether a key has an unflushed one.
        self._postgres_may_lag = settings.strategy is StrategyName.WRITE_BEHIND
        self._loads: SingleFlight[str, Read] = SingleFlight(f"load-{settings.name}")
        self._refreshes: SingleFlight[str, None] = SingleFlight(f"refresh-{settings.name}")
        self._fill_waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._tag_marks = TagMarks(store.tag_marks)
        namespace = {"cache.namespace": settings.name}
        evicted = partial(instruments.near_cache_evictions.add, 1, namespace)
        self.near = (
            NearCache(
                settings.near_cache_entries,
                settings.near_cache_ttl,
                on_evict=evicted,
                clock=clock.monotonic,
            )
            if settings.near_cache_entries
            else None
        )

    async def get(self, key: str, *, min_version: int = 0) -> Entry:
        """*key*'s entry; with *min_version* (read-your-writes), never a cached
        copy older than it: such a copy is skipped, the key read again from
        PostgreSQL, and the entry says ``reloaded``."""
        near = self.near
        skipped = False
        if near is None:
            found, reloaded = await self._get(key, min_version)
            return _marked(found.entry, reloaded)
        with span("cache.near", **{"cache.namespace": self.settings.name}):
            entry = near.get(key)
        if entry is not None:
            if entry.version >= min_version:
                return entry
            skipped = True
        began, reloaded = near.begin(key), False
        read: Read | None = None
        try:
            read, reloaded = await self._get(key, min_version)
        finally:
            if read is None:
                near.finish(key, began, None, None)
            else:
                near.finish(key, began, read.entry, read.confirmed_at)
        return _marked(read.entry, skipped or reloaded)

    async def _get(self, key: str, min_version: int = 0) -> tuple[Read, bool]:
        """Redis, else a load shared with the concurrent misses of this
        instance: taken only if it can serve this read (see single_flight.py),
        otherwise this read starts over (at most once: the load it finds then
        started after this read's miss). A copy older than *min_version* is a
        miss that must reload (never served stale); if the load still answers
        older than *min_version* (it found such a copy in Redis), this read
        reads PostgreSQL itself, bypassing Redis. Also says whether a copy was
        skipped for *min_version*."""
        stale: Entry | None = None
        below = hidden = False
        clock = 0  # the tag clock, read before any load (strategies/tagging.py)

        async def look() -> Read | None:
            nonlocal stale, below, hidden, clock
            stale = None
            started = self._clock.monotonic()
            try:
                with span("cache.redis", **{"cache.namespace": self.settings.name}):
                    raw, clock = await self.store.read(key)
                    cached = None if raw is None else envelope.decode(raw)
                    if cached is not None and cached.tags:
                        cached = await self._valid(cached, clock)
            except RedisError as err:
                self._check_postgres_can_answer(err)
                log.debug("redis get failed, reading PostgreSQL: %s", err)
                return Read(await self._load_uncached(key))
            if raw is not None and cached is None:
                hidden = True  # a tag of it was invalidated: a miss, reloaded
            if cached is not None:
                entry, reload = self._hit(key, cached)
                if entry.version < min_version:
                    below = True  # a copy older than the caller's write: a miss
                elif not reload:
                    return Read(entry, 0, started)
                else:
                    stale = entry
            if key in self._loads and telemetry.METRICS:
                instruments.coalesced.add(1, {"cache.namespace": self.settings.name})
            return None

        async def load() -> Shared[Read]:
            return await self._miss(key, clock, reload=stale is not None or below or hidden)

        try:
            read = await self._loads.read_through(key, look, load)
        except Unavailable:
            if stale is None:
                raise
            return Read(stale), False  # stale-if-error: PostgreSQL is down, all there is
        if read.entry.version < min_version:
            # Still older: the reload waited for another reader's lease and
            # found the old copy in Redis. PostgreSQL has the caller's write.
            return Read(await self._load_uncached(key)), True
        return read, below

    async def batch_get(
        self, keys: Sequence[str], *, min_versions: Mapping[str, int] | None = None
    ) -> list[Entry]:
        """The entries of *keys*, in order; *min_versions*: as :meth:`get`'s
        min_version, per key."""
        floor = min_versions or {}
        entries: dict[str, Entry] = {}
        skipped: set[str] = set()
        near = self.near
        if near is not None:
            for key in keys:
                if (entry := near.get(key)) is not None:
                    if entry.version >= floor.get(key, 0):
                        entries[key] = entry
                    else:
                        skipped.add(key)
        unique = [key for key in dict.fromkeys(keys) if key not in entries]
        if not unique:
            return [entries[key] for key in keys]
        if near is None:
            reads = await self._batch_get(unique, floor, skipped)
        else:
            began, reads = {key: near.begin(key) for key in unique}, {}
            try:
                reads = await self._batch_get(unique, floor, skipped)
            finally:
                for key in unique:
                    read = reads.get(key)
                    if read is None:
                        near.finish(key, began[key], None, None)
                    else:
                        near.finish(key, began[key], read.entry, read.confirmed_at)
        entries.update((key, _marked(read.entry, key in skipped)) for key, read in reads.items())
        return [entries[key] for key in keys]

    async def _batch_get(
        self, unique: list[str], floor: Mapping[str, int], skipped: set[str]
    ) -> dict[str, Read]:
        """Redis, then one load for the misses. A copy older than the key's
        *floor* is a miss that reloads, never served stale; its key joins
        *skipped*."""
        entries: dict[str, Read] = {}
        redis_up = True
        started = self._clock.monotonic()
        clock, hidden = 0, False
        try:
            raws, clock = await self.store.read_many(unique)
            found = [None if raw is None else envelope.decode(raw) for raw in raws]
            for i, cached in enumerate(found):
                if cached is not None and cached.tags:  # untagged: nothing to check
                    found[i] = await self._valid(cached, clock)
        except RedisError as err:
            self._check_postgres_can_answer(err)
            raws, found, redis_up = [None] * len(unique), [None] * len(unique), False
        misses = []
        stale: dict[str, Entry] = {}
        for key, raw, cached in zip(unique, raws, found, strict=True):
            if cached is None:
                misses.append(key)
                hidden = hidden or raw is not None  # a tag of it was invalidated
                continue
            entry, reload = self._hit(key, cached)
            if entry.version < floor.get(key, 0):
                misses.append(key)
                skipped.add(key)
            elif reload:
                misses.append(key)
                stale[key] = entry
            else:
                entries[key] = Read(entry, 0, started)
        if misses:
            reload = hidden or bool(stale) or any(key in skipped for key in misses)
            try:
                entries.update(await self._load_misses(misses, redis_up, clock, reload=reload))
            except Unavailable:
                if len(stale) < len(misses):
                    raise
                # stale-if-error for every key that needed it
                entries.update((key, Read(entry)) for key, entry in stale.items())
        older = [
            key for key in skipped if key in entries and entries[key].entry.version < floor[key]
        ]
        if older:  # as in _get: read from PostgreSQL, which has the callers' writes
            rows, _, _ = await self._load(older)
            entries.update(
                (key, Read(Entry(key, row.value, row.version, Layer.DATABASE)))
                for key, row in rows.items()
            )
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

    def forget(self, key: str | None, version: int) -> None:
        """*key* (None: every key) changed to *version*: the near cache drops it."""
        if self.near is not None:
            self.near.invalidate(key, version)

    def forget_tag(self, tag: str) -> None:
        """Every value carrying *tag* was invalidated: the near cache drops them."""
        if self.near is not None:
            self.near.invalidate_tag(tag)

    def forget_all(self) -> None:
        """Changes may have been missed: the near cache drops everything, and
        the tag marks kept here are read again (Redis may have lost them)."""
        self._tag_marks.forget()
        if self.near is not None:
            self.near.flush()

    def suspend(self) -> None:
        """Changes may be missing until :meth:`resume`: the near cache neither
        serves nor keeps, but holds its entries."""
        if self.near is not None:
            self.near.suspend()

    def resume(self) -> None:
        """The changes missed were applied: the near cache serves again."""
        if self.near is not None:
            self.near.resume()

    def near_cache_size(self) -> int | None:
        """Entries in the near cache; None without one."""
        return None if self.near is None else len(self.near)

    def fresh(
        self, key: str, row: Row, load_ms: int, ttl_ms: int | None = None, *, clock: int = 0
    ) -> tuple[Entry, bytes, int]:
        """The entry for a row just read or written, its envelope and Redis PX
        (the TTL plus the stale window, during which it may be served stale).
        A row with tags records the tag *clock* read before it was read or
        written (strategies/tagging.py)."""
        settings = self.settings
        ttl, px = fill_ttl(
            found=row.value is not None,
            ttl_ms=ttl_ms or settings.ttl,
            negative_ttl_ms=settings.negative_ttl,
            jitter=settings.ttl_jitter,
            stale_window_ms=settings.stale_window,
            stale_if_error_ms=settings.stale_if_error,
            rand=self._rand,
        )
        stored = envelope.encode(
            row.version, self._clock.time_ms() + ttl, load_ms, row.value, row.tags, clock
        )
        entry = Entry(key, row.value, row.version, Layer.DATABASE, ttl_ms=ttl, tags=row.tags)
        return entry, stored, px

    def _notice(self, key: str, row: Row) -> bytes:
        return FillNotice.of(self.settings.name, key, row.version, self.origin).encode()

    # -- hits ----------------------------------------------------------------

    async def _valid(self, cached: Cached, clock: int) -> Cached | None:
        """*cached*, unless one of its tags was invalidated after it was read
        (then None: a miss), the tag clock reading *clock*. A write-behind
        value not flushed yet stays: PostgreSQL is behind it (as Invalidate
        never drops it); once flushed, its tags count."""
        if not cached.tags or cached.dirty:
            return cached
        if await self._tag_marks.valid(cached.tags, cached.tag_clock, clock):
            return cached
        return None

    def _hit(self, key: str, cached: Cached) -> tuple[Entry, bool]:
        """The cached entry, and whether it must be reloaded before serving:
        past its TTL and the stale window, it is only kept for stale-if-error."""
        hit = decide_hit(
            now_ms=self._clock.time_ms(),
            fresh_until_ms=cached.fresh_until_ms,
            load_ms=cached.load_ms,
            dirty=cached.dirty,
            stale_window_ms=self.settings.stale_window,
            beta=self.settings.early_refresh_beta,
            rand=self._rand,
        )
        if hit.refresh:
            self._refreshes.spawn(
                key, partial(self._refresh, key, cached.version, cached.fresh_until_ms)
            )
        entry = Entry(
            key,
            cached.value,
            cached.version,
            Layer.REDIS,
            hit.stale,
            hit.remaining_ms,
            tags=cached.tags,
        )
        return entry, hit.reload

    async def _refresh(self, key: str, seen_version: int, seen_fresh_until: int) -> Shared[None]:
        """Reload *key* in the background if no other reader is doing it, nor
        has done it since this reader saw the entry."""
        token = secrets.token_hex(8)
        try:
            taken = await self.store.take_leases(
                {key: token}, self.settings.lease, even_if_cached=True
            )
            if taken[key] is not True:
                return _REFRESHED
            raw, clock = await self.store.read(key)
            if raw is not None:
                now = envelope.decode(raw)
                if (now.version, now.fresh_until_ms) != (seen_version, seen_fresh_until):
                    return _REFRESHED  # refreshed (or rewritten) by someone else meanwhile
            if clock == 0:
                clock = await self._started_tag_clock()
            rows, load_ms, _ = await self._load([key])
            _, stored, px = self.fresh(key, rows[key], load_ms, clock=clock)
            await self.store.fill_many({key: (token, stored, px, self._notice(key, rows[key]))})
        except Exception as err:  # a background refresh must never surface
            log.warning("refresh of %s/%s failed: %s", self.settings.name, key, err)
        return _REFRESHED

    # -- misses --------------------------------------------------------------

    async def _miss(self, key: str, clock: int, reload: bool = False) -> Shared[Read]:
        read = (await self._load_misses([key], True, clock, reload=reload))[key]
        return Shared(read, read.as_of)

    async def _load_misses(
        self, keys: list[str], redis_up: bool, clock: int, reload: bool = False
    ) -> dict[str, Read]:
        """One SQL query for all *keys*; fill those whose lease this reader got,
        with the tag *clock* read before (strategies/tagging.py).
        Keys leased by another reader are waited for first (single key only);
        keys filled meanwhile are served as they are now (unless *reload*).

        Each answer says from when it is known current (:class:`Read`): a
        value found in Redis from the Redis read; a row from the SQL query,
        or, if its fill was accepted, from the fill (no write came between
        the lease and the fill: every write deletes the lease). Only values
        that Redis confirmed (found there, or filled) may be kept by the near
        cache, and they count their age from when this load began."""
        tokens = {key: secrets.token_hex(8) for key in keys}
        taken: Mapping[str, bytes | bool] = {}
        began = self._clock.monotonic()
        if redis_up:
            mark = self._loads.tick()
            with suppress(RedisError):
                taken = await self.store.take_leases(
                    tokens, self.settings.lease, even_if_cached=reload
                )
        plan = plan_misses(keys, taken)
        found = {}
        for key, raw in plan.cached.items():
            try:
                cached = await self._valid(envelope.decode(raw), clock)
            except RedisError:
                cached = None
            # A value filled meanwhile whose tag was invalidated (or that
            # cannot be checked) is loaded like the others, but not filled.
            if cached is not None:
                found[key] = Read(self._hit(key, cached)[0], mark, began)
        load = [key for key in keys if key not in found]
        if not load:
            return found
        if plan.wait_for is not None:
            filled = await self._await_fill(plan.wait_for)
            if filled is not None:
                return {**found, plan.wait_for: filled}
        if clock == 0 and plan.fill:
            clock = await self._started_tag_clock()
        rows, load_ms, mark = await self._load(load)
        entries, fills = {}, {}
        for key in load:
            entry, stored, px = self.fresh(key, rows[key], load_ms, clock=clock)
            entries[key] = entry
            if key in plan.fill:
                fills[key] = (tokens[key], stored, px, self._notice(key, rows[key]))
        filled_mark, accepted = self._loads.tick(), {}
        try:
            with span("cache.fill", **{"cache.namespace": self.settings.name}):
                accepted = await self.store.fill_many(fills)
        except RedisError as err:
            log.debug("fill failed: %s", err)
        reads = {
            key: loaded_read(
                entry,
                filled=bool(accepted.get(key)),
                query_as_of=mark,
                fill_as_of=filled_mark,
                began=began,
            )
            for key, entry in entries.items()
        }
        return {**reads, **found}

    async def _started_tag_clock(self) -> int:
        """The tag clock, started if Redis has none (a first fill, or Redis
        lost it), read before the rows: a tagged value never records a clock
        that was not there (strategies/tagging.py). 0 if Redis cannot say:
        such a value counts as invalid once there is a clock."""
        try:
            return await self.store.started_tag_clock()
        except RedisError:
            return 0

    async def _await_fill(self, key: str) -> Read | None:
        with span("cache.lease_wait", **{"cache.namespace": self.settings.name}):
            return await self._wait_for_fill(key)

    async def _wait_for_fill(self, key: str) -> Read | None:
        """Wait up to lease_wait for the lease holder's fill, woken by its
        notice; the poll only covers a lost notice."""
        filled = asyncio.Event()
        waiters = self._fill_waiters[key]
        waiters.add(filled)
        if telemetry.METRICS:
            instruments.coalesced.add(1, {"cache.namespace": self.settings.name})
        try:
            wait = FillWait(self.settings.lease_wait, self._clock, max_poll=_MAX_POLL)
            while (timeout := wait.next_timeout()) is not None:
                with suppress(TimeoutError):
                    await asyncio.wait_for(filled.wait(), timeout)
                filled.clear()
                mark, read_at = self._loads.tick(), self._clock.monotonic()
                try:
                    raw, clock = await self.store.read(key)
                    cached = None if raw is None else await self._valid(envelope.decode(raw), clock)
                except RedisError:
                    return None
                if cached is not None:  # (an invalid value is not the fill waited for)
                    return Read(self._hit(key, cached)[0], mark, read_at)
            return None
        finally:
            waiters.discard(filled)
            if not waiters:
                del self._fill_waiters[key]

    async def _load_uncached(self, key: str) -> Entry:
        rows, _, _ = await self._load([key])
        row = rows[key]
        return Entry(key, row.value, row.version, Layer.DATABASE)

    async def _load(self, keys: Sequence[str]) -> tuple[dict[str, Row], int, int]:
        """The rows of *keys*, the query's time (ms), and a tick of the load
        flight taken just before the query: its snapshot reflects every write
        committed before that tick."""
        with span("cache.load", **{"cache.namespace": self.settings.name, "cache.keys": len(keys)}):
            async with database_errors(), self.pool.connection() as conn:
                # Only the query is timed: XFetch needs what a reload costs,
                # not how long this request waited for a connection.
                mark = self._loads.tick()
                started = self._clock.monotonic()
                rows = await self.table.load(conn, keys)
                load_ms = (self._clock.monotonic() - started) * 1000
        if telemetry.METRICS:
            attributes = {"cache.namespace": self.settings.name}
            instruments.load_duration.record(load_ms / 1000, attributes)
        return rows, round(load_ms), mark

    # -- the consistency observer ---------------------------------------------

    @property
    def postgres_may_lag(self) -> bool:
        return self._postgres_may_lag

    async def versions(self, key: str) -> Versions:
        """What the near cache, Redis and PostgreSQL hold of *key*, read in
        that order (raises RedisError if Redis cannot be read)."""
        near = self.near.get(key) if self.near is not None else None
        raw = await self.store.get(key)
        return Versions(
            near.version if near is not None else None,
            envelope.decode(raw).version if raw is not None else None,
            await self.database_version(key),
        )

    async def database_version(self, key: str) -> int:
        async with database_errors(), self.pool.connection() as conn:
            return (await self.table.load(conn, [key]))[key].version
