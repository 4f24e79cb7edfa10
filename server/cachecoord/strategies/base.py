"""A strategy: the read path every namespace shares (reads.py) composed with
the namespace's write policy (cache_aside.py, write_through.py,
write_behind.py), and invalidation."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from cachecoord.config import NamespaceSettings
from cachecoord.errors import Unavailable
from cachecoord.invalidation.messages import FillNotice, Invalidation
from cachecoord.invalidation.outbox import Outbox
from cachecoord.model import Deleted, Entry
from cachecoord.storage.errors import RedisError
from cachecoord.storage.invalidation_log import InvalidationLog
from cachecoord.storage.redis_store import EntryStore
from cachecoord.storage.tables import Table
from cachecoord.strategies.changes import Changes
from cachecoord.strategies.reads import Reader

if TYPE_CHECKING:
    from cachecoord.strategies.flusher import Flusher


@dataclass(frozen=True, slots=True)
class Backends:
    """The shared resources a strategy works with."""

    pool: AsyncConnectionPool[AsyncConnection]
    outbox: Outbox
    origin: str


class WritePolicy(Protocol):
    """How a namespace's writes reach PostgreSQL and Redis."""

    async def put(
        self,
        key: str,
        value: bytes,
        expected_version: int | None,
        ttl_ms: int | None,
        tags: Sequence[str] = (),
    ) -> int:
        """Write *value* with *tags*; return the new version."""
        ...

    async def delete(self, key: str, expected_version: int | None) -> Deleted:
        """Delete *key*; return whether a row existed and the deletion's version."""
        ...

    def flusher(self, consumer: str) -> Flusher | None:
        """The background writer this policy needs (write-behind), if any."""
        ...


class Strategy:
    """A namespace's caching behaviour: reads by a :class:`Reader`, writes by
    a :class:`WritePolicy`."""

    def __init__(
        self,
        settings: NamespaceSettings,
        *,
        table: Table,
        store: EntryStore,
        reader: Reader,
        writes: WritePolicy,
        changes: Changes,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._table = table
        self._store = store
        self._reader = reader
        self._writes = writes
        self._changes = changes

    # The parts, for tests that drive them directly; the server goes through
    # the methods below.
    @property
    def table(self) -> Table:
        return self._table

    @property
    def store(self) -> EntryStore:
        return self._store

    @property
    def reader(self) -> Reader:
        return self._reader

    @property
    def channels(self) -> list[str]:
        """The Redis channels of the namespace's invalidation messages (the
        classic one, and a shard channel per log partition, storage/keys.py)."""
        return self._store.keys.channels

    def check_key(self, key: str) -> None:
        """Raise InvalidArgument for a key the namespace's table cannot hold."""
        self._table.check_key(key)

    def check_tags(self, tags: Sequence[str]) -> None:
        """Raise InvalidArgument if a Put may not give *tags* here."""
        self._table.check_tags(tags)

    def near_cache_size(self) -> int | None:
        return self._reader.near_cache_size()

    def flusher(self, consumer: str) -> Flusher | None:
        """The namespace's flusher (write-behind; not opened), else None."""
        return self._writes.flusher(consumer)

    # -- reads ---------------------------------------------------------------

    async def get(self, key: str, min_version: int = 0) -> Entry:
        return await self._reader.get(key, min_version=min_version)

    async def batch_get(
        self, keys: Sequence[str], min_versions: Mapping[str, int] | None = None
    ) -> list[Entry]:
        return await self._reader.batch_get(keys, min_versions=min_versions)

    def on_message(self, message: Invalidation) -> None:
        """A message of this namespace's channel, from any instance."""
        if isinstance(message, FillNotice):
            # Not a change: the filled version is the current one.
            if message.key is not None:
                self._reader.on_fill(message.key)
        elif message.tag is not None:
            self._reader.forget_tag(message.tag)
        else:
            self._reader.forget(message.key, message.version)

    def on_reset(self) -> None:
        """Messages were missed: nothing held locally can be trusted."""
        self._reader.forget_all()

    def on_suspend(self) -> None:
        """Messages may be missing until :meth:`on_resume` (they are being
        replayed from the invalidation log): hold, but do not serve, what is
        held locally."""
        self._reader.suspend()

    def on_resume(self) -> None:
        """The messages missed were applied (or :meth:`on_reset` was called)."""
        self._reader.resume()

    @property
    def log(self) -> InvalidationLog:
        """The namespace's invalidation log."""
        return self._store.log

    # -- writes --------------------------------------------------------------

    async def put(
        self,
        key: str,
        value: bytes,
        expected_version: int | None,
        ttl_ms: int | None,
        tags: Sequence[str] = (),
    ) -> int:
        """Write *value* with *tags*; return the new version."""
        return await self._writes.put(key, value, expected_version, ttl_ms, tags)

    async def delete(self, key: str, expected_version: int | None) -> Deleted:
        """Delete *key*; return whether a row existed and the deletion's version."""
        return await self._writes.delete(key, expected_version)

    # -- invalidation --------------------------------------------------------

    async def invalidate(self, keys: Sequence[str]) -> int:
        messages = {key: self._changes.message(key, 0, "invalidate").encode() for key in keys}
        try:
            return await self._store.invalidate(messages)
        except RedisError as err:
            raise Unavailable(f"Redis is unavailable, nothing was invalidated: {err}") from err
        finally:
            for key in keys:  # after Redis: see DropCached
                self._changes.made_here(key, 0)

    async def invalidate_tags(self, tags: Sequence[str]) -> None:
        """Hide every cached value carrying one of *tags*, on every instance
        (strategies/tagging.py), and publish one message per tag."""
        messages = {tag: self._changes.tag_message(tag).encode() for tag in tags}
        try:
            await self._store.invalidate_tags(messages)
        except RedisError as err:
            raise Unavailable(f"Redis is unavailable, no tag was invalidated: {err}") from err
        for tag in tags:  # after Redis: see DropCached
            self._changes.tag_made_here(tag)

    async def invalidate_all(self) -> int:
        try:
            return await self._store.drop_namespace(
                self._changes.message(None, 0, "invalidate").encode()
            )
        except RedisError as err:
            raise Unavailable(f"Redis is unavailable, nothing was invalidated: {err}") from err
        finally:
            self._changes.made_here(None, 0)


@dataclass(frozen=True, slots=True)
class StrategyKind:
    """How a strategy named in the configuration is built."""

    build: Callable[[NamespaceSettings, Table, EntryStore, Backends], Strategy]
    partitions: Callable[[NamespaceSettings], int] = lambda settings: settings.log_partitions
    """How many partitions the namespace's keys (and its invalidation log) are grouped in."""
    write_behind: bool = False
    """Its keys live beside its queues (keys.py)."""

    def __call__(
        self, settings: NamespaceSettings, table: Table, store: EntryStore, backends: Backends
    ) -> Strategy:
        return self.build(settings, table, store, backends)
