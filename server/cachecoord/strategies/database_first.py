"""The writes of cache-aside and write-through: PostgreSQL first, in a
WriteTransaction, then their own step that brings Redis up to date
(``after_commit``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cachecoord.model import Deleted
from cachecoord.storage.postgres import RecordedWrite
from cachecoord.storage.tables import Table
from cachecoord.strategies.transaction import WriteTransaction


class Committed(Protocol):
    async def after_commit(
        self,
        key: str,
        recorded: RecordedWrite,
        stored: bytes | None,
        ttl_ms: int | None,
        tags: tuple[str, ...] = (),
        clock: int = 0,
    ) -> None:
        """Bring Redis up to date with a committed write (*stored*: the row as
        written, None for a deletion; *tags*: the row's; *clock*: the tag
        clock read before the write); if it cannot, the outbox row committed
        with the write makes the drainer do it later."""
        ...


class DatabaseFirst:
    """Writes PostgreSQL, then Redis (by *policy*'s ``after_commit``, looked
    up at each write), before answering."""

    def __init__(self, table: Table, transaction: WriteTransaction, policy: Committed) -> None:
        self._table = table
        self._transaction = transaction
        self._policy = policy

    async def put(
        self,
        key: str,
        value: bytes,
        expected_version: int | None,
        ttl_ms: int | None,
        *,
        floor: int = 0,
        tags: Sequence[str] = (),
        clock: int = 0,
    ) -> int:
        """Write *value* with *tags* at a version of at least *floor*; the new
        version. *clock*: the tag clock read before (strategies/tagging.py)."""
        prepared = self._table.prepare(key, value)
        async with self._transaction.open(key, "put", expected_version, floor) as (
            conn,
            recorded,
        ):
            stored = await self._table.write(conn, key, prepared, tags)
        row_tags = self._table.row_tags(stored, tags)
        await self._policy.after_commit(key, recorded, stored, ttl_ms, row_tags, clock)
        return recorded.version

    async def delete(self, key: str, expected_version: int | None, *, floor: int = 0) -> Deleted:
        async with self._transaction.open(key, "delete", expected_version, floor) as (
            conn,
            recorded,
        ):
            deleted = await self._table.delete(conn, key)
        await self._policy.after_commit(key, recorded, None, None)
        return Deleted(deleted, recorded.version)
