"""A table whose every row read takes 50 ms and is counted: the "slow query"
of the stampede benchmark.

A mapped namespace needs a real table (cachecoord requires a unique index on
the key column, which a view cannot have), and PostgreSQL has no trigger on
SELECT; a generated column or a DEFAULT is computed when a row is written, not
when it is read. What does run on every read of a row is a row-level security
policy: ``hot`` has a SELECT policy whose check, ``slow_read(id)``, sleeps
50 ms and inserts a row into ``load_log``. The table holds a single row, so
any plan calls the check exactly once per query that reads it, and
``count(*) FROM load_log`` is the exact number of loads, whoever made them
(cachecoord or the naive client). Superusers bypass row security, so readers
connect as the ordinary role ``bench_reader``.
"""

from __future__ import annotations

import statistics
import time

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

ROLE = "bench_reader"
TABLE = "hot"
KEY = "1"
QUERY_SECONDS = 0.05

_SETUP = f"""
CREATE ROLE {ROLE} LOGIN;
CREATE TABLE load_log (
    id bigserial PRIMARY KEY,
    key integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION slow_read(k integer) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_sleep({QUERY_SECONDS});
    INSERT INTO load_log (key) VALUES (k);
    RETURN true;
END $$;
CREATE TABLE {TABLE} (id integer PRIMARY KEY, name text NOT NULL, score integer NOT NULL);
INSERT INTO {TABLE} VALUES ({KEY}, 'the hot key', 42);
ALTER TABLE {TABLE} ENABLE ROW LEVEL SECURITY;
CREATE POLICY slow_read ON {TABLE} FOR SELECT TO {ROLE} USING (slow_read(id));
GRANT SELECT ON {TABLE} TO {ROLE};
GRANT INSERT ON load_log TO {ROLE};
GRANT USAGE ON SEQUENCE load_log_id_seq TO {ROLE};
"""

# What the naive client runs; cachecoord's own query reads the same row.
NAIVE_QUERY = f"SELECT row_to_json(t)::text FROM {TABLE} t WHERE id = %s"


def prepare(admin_dsn: str) -> str:
    """Create the role, the table and the counter as the superuser of
    *admin_dsn*; return the URL readers connect with (as ``bench_reader``)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(_SETUP)
        # cachecoord creates its own schema at start-up.
        conn.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(conn.info.dbname), sql.Identifier(ROLE)
            )
        )
    return make_conninfo(admin_dsn, user=ROLE)


class Loads:
    """Counts rows read from the slow table, over a superuser connection (which
    the policy neither slows down nor counts)."""

    def __init__(self, conn: psycopg.AsyncConnection) -> None:
        self._conn = conn

    @classmethod
    async def connect(cls, admin_dsn: str) -> Loads:
        return cls(await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True))

    async def count(self) -> int:
        cur = await self._conn.execute("SELECT count(*) FROM load_log")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def close(self) -> None:
        await self._conn.close()


async def query_ms(reader_dsn: str, times: int = 5) -> float:
    """Median time of the naive query as a reader runs it (policy included)."""
    took = []
    async with await psycopg.AsyncConnection.connect(reader_dsn, autocommit=True) as conn:
        for _ in range(times):
            started = time.perf_counter()
            cur = await conn.execute(NAIVE_QUERY, (int(KEY),))
            await cur.fetchone()
            took.append(1000 * (time.perf_counter() - started))
    return statistics.median(took)
