"""PostgreSQL: the connection pool, cachecoord's own schema, and the
bookkeeping every write shares (key versions and the transactional outbox)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import psycopg
import psycopg_pool
from psycopg import AsyncConnection, errors
from psycopg_pool import AsyncConnectionPool

from cachecoord.config import PostgresSettings
from cachecoord.errors import ConstraintViolation, InvalidArgument, Unavailable

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS cachecoord;
-- The authoritative version of every key written through cachecoord. Rows are
-- kept after a delete, so a key re-created later gets a higher version.
CREATE TABLE IF NOT EXISTS cachecoord.versions (
    namespace text NOT NULL,
    key text NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (namespace, key)
);
-- Values of managed namespaces (opaque bytes).
CREATE TABLE IF NOT EXISTS cachecoord.entries (
    namespace text NOT NULL,
    key text NOT NULL,
    value bytea NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, key)
);
-- Tags of managed values (InvalidateTags): added to tables made before them.
-- Looked up first: ALTER TABLE would lock the table at every start.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'cachecoord.entries'::regclass
                   AND attname = 'tags' AND NOT attisdropped) THEN
        ALTER TABLE cachecoord.entries ADD COLUMN tags text[] NOT NULL DEFAULT '{}';
    END IF;
END $$;
-- Invalidations committed with the write that causes them; deleted once Redis
-- has applied them. key NULL means the whole namespace.
CREATE TABLE IF NOT EXISTS cachecoord.outbox (
    id bigserial PRIMARY KEY,
    namespace text NOT NULL,
    key text,
    version bigint NOT NULL DEFAULT 0,
    reason text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""

# One statement: bump the key's version (locking its row until commit, which
# serialises writers of one key) and record the invalidation in the outbox.
_RECORD_WRITE = """
WITH bumped AS (
    INSERT INTO cachecoord.versions AS v (namespace, key, version)
    VALUES (%(ns)s, %(key)s, GREATEST(1, %(floor)s))
    ON CONFLICT (namespace, key) DO UPDATE SET version = GREATEST(v.version + 1, %(floor)s)
    RETURNING version
), queued AS (
    INSERT INTO cachecoord.outbox (namespace, key, version, reason)
    SELECT %(ns)s, %(key)s, version, %(reason)s FROM bumped
    RETURNING id, version
), writer AS (
    -- Our own writes invalidate by themselves: the change triggers skip them.
    SELECT set_config('cachecoord.writer', 'on', true)
)
SELECT id, version FROM queued, writer
"""


def create_pool(settings: PostgresSettings) -> AsyncConnectionPool[AsyncConnection]:
    """A pool that is opened explicitly (``await pool.open()``), inside the loop."""
    prepare = None if settings.prepare_threshold < 0 else settings.prepare_threshold

    async def configure(conn: AsyncConnection) -> None:
        conn.prepare_threshold = prepare

    return AsyncConnectionPool(
        settings.url,
        min_size=settings.min_connections,
        max_size=settings.max_connections,
        open=False,
        timeout=settings.pool_timeout / 1000,
        configure=configure,
        name="cachecoord",
    )


async def install_schema(pool: AsyncConnectionPool[AsyncConnection]) -> None:
    """Create cachecoord's tables (see install_schema_on)."""
    async with pool.connection() as conn:
        await install_schema_on(conn)


async def install_schema_on(conn: AsyncConnection) -> None:
    """Create cachecoord's tables; an advisory lock keeps instances starting at
    the same moment from racing on CREATE ... IF NOT EXISTS."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('cachecoord.schema'))")
        await conn.execute(SCHEMA)


_SKIP_IMPLICIT_VERSION = """
WITH bumped AS (
    UPDATE cachecoord.versions SET version = version + 1
    WHERE namespace = %(ns)s AND key = %(key)s RETURNING version
)
UPDATE cachecoord.outbox o SET version = b.version FROM bumped b WHERE o.id = %(id)s
RETURNING b.version
"""


@dataclass(frozen=True, slots=True)
class RecordedWrite:
    outbox_id: int
    version: int


async def record_write(
    conn: AsyncConnection, namespace: str, key: str, reason: str, floor: int = 0
) -> RecordedWrite:
    """Inside the write's transaction: the key's new version (previous + 1, or
    *floor* if higher) and its outbox row."""
    cur = await conn.execute(
        _RECORD_WRITE, {"ns": namespace, "key": key, "reason": reason, "floor": floor}
    )
    row = await cur.fetchone()
    assert row is not None
    return RecordedWrite(outbox_id=row[0], version=row[1])


async def skip_implicit_version(
    conn: AsyncConnection, namespace: str, key: str, recorded: RecordedWrite
) -> RecordedWrite:
    """The key's row existed before cachecoord first versioned it, so it was
    at the implicit version 1: the write gets version 2."""
    cur = await conn.execute(
        _SKIP_IMPLICIT_VERSION, {"ns": namespace, "key": key, "id": recorded.outbox_id}
    )
    row = await cur.fetchone()
    assert row is not None
    return RecordedWrite(outbox_id=recorded.outbox_id, version=row[0])


@asynccontextmanager
async def database_errors() -> AsyncIterator[None]:
    """Turn PostgreSQL failures into domain errors a client can act on."""
    try:
        yield
    except (errors.NotNullViolation, errors.CheckViolation) as err:
        raise InvalidArgument(f"PostgreSQL rejected the row: {_message(err)}") from None
    except psycopg.IntegrityError as err:
        raise ConstraintViolation(f"PostgreSQL rejected the row: {_message(err)}") from None
    except psycopg.DataError as err:
        raise InvalidArgument(f"PostgreSQL rejected the value: {_message(err)}") from None
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as err:
        raise Unavailable(f"PostgreSQL is unavailable: {_message(err)}") from err


def _message(err: psycopg.Error) -> str:
    return err.diag.message_primary or str(err).splitlines()[0]
