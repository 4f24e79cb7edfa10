"""The PostgreSQL transaction of a write: the key's version bump, its outbox
row and the compare-and-set, under the row locks in the order every writer
takes them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from psycopg import AsyncConnection, Rollback
from psycopg_pool import AsyncConnectionPool

from cachecoord.errors import ConstraintViolation, VersionConflict
from cachecoord.storage.postgres import (
    RecordedWrite,
    database_errors,
    record_write,
    skip_implicit_version,
)
from cachecoord.storage.tables import Table

_ROW_ATTEMPTS = 3
"""Transactions a write starts over when its row appeared under it."""


class WriteTransaction:
    """Opens the write transactions of one namespace."""

    def __init__(self, name: str, table: Table, pool: AsyncConnectionPool[AsyncConnection]) -> None:
        self._name = name
        self._table = table
        self._pool = pool

    @asynccontextmanager
    async def open(
        self, key: str, reason: str, expected_version: int | None, floor: int = 0
    ) -> AsyncIterator[tuple[AsyncConnection, RecordedWrite]]:
        """A transaction that bumps the key's version (to at least *floor*),
        records the outbox row, and checks *expected_version* (the writer holds
        the key's version row lock until commit, so the check cannot race)."""
        async with database_errors(), self._pool.connection() as conn:
            for _ in range(_ROW_ATTEMPTS):
                async with conn.transaction():
                    locked = await self._lock_key(conn, key, reason, floor)
                    if locked is None:
                        raise Rollback  # the row appeared meanwhile: again
                    exists, recorded = locked
                    if expected_version is not None:
                        assert floor == 0, "compare-and-set needs versions that step by one"
                        if exists is None:
                            exists = await self._table.exists(conn, key)
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
        if not self._table.merges_rows:
            return None, await record_write(conn, self._name, key, reason, floor)
        exists = await self._table.exists(conn, key, lock=True)
        recorded = await record_write(conn, self._name, key, reason, floor)
        if not exists and await self._table.exists(conn, key):
            return None
        if recorded.version == 1 and exists:
            recorded = await skip_implicit_version(conn, self._name, key, recorded)
        return exists, recorded
