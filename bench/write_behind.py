"""Watching write-behind from the outside: queue depth in Redis, row writes in
PostgreSQL.

A write-behind Put is acknowledged before PostgreSQL has it, so its benchmark
must wait for the queue to drain before it can say what the Puts cost or how
many rows they wrote. Row writes are counted by a trigger the benchmark installs
on ``cachecoord.entries`` (exact, unlike the asynchronously flushed
``pg_stat_user_tables`` counters), only for the keys it names, so that the
trigger costs nothing to the other phases.
"""

from __future__ import annotations

import time

import psycopg
import redis

from cachecoord.storage.keys import KeySpace

_POLL = 0.01

_INSTALL = """
CREATE TABLE IF NOT EXISTS public.bench_row_writes (
    namespace text NOT NULL,
    key text NOT NULL,
    op text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION public.bench_count_row_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.bench_row_writes (namespace, key, op)
    VALUES (NEW.namespace, NEW.key, TG_OP);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS bench_count_row_writes ON cachecoord.entries;
"""
# Literals, not parameters: DDL takes none. Both come from the benchmark itself.
_TRIGGER = """
CREATE TRIGGER bench_count_row_writes AFTER INSERT OR UPDATE ON cachecoord.entries
FOR EACH ROW WHEN (NEW.namespace = '{namespace}' AND NEW.key LIKE '{prefix}%')
EXECUTE FUNCTION public.bench_count_row_write()
"""


class Queues:
    """The Redis Streams of one write-behind namespace (names from cachecoord's
    own key scheme, so a renamed key fails here rather than never draining)."""

    def __init__(self, redis_url: str, namespace: str, partitions: int) -> None:
        self._client = redis.Redis.from_url(redis_url, protocol=2)
        self._keys = KeySpace(namespace, partitions)

    def depth(self) -> int:
        """Queued writes not yet flushed (flushed entries are acknowledged and deleted)."""
        pipe = self._client.pipeline(transaction=False)
        for queue in self._keys.queues:
            pipe.xlen(queue)
        return sum(int(n) for n in pipe.execute())

    def dead_letters(self) -> int:
        return int(self._client.xlen(self._keys.dead_letters))

    def wait_drained(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while (depth := self.depth()) > 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"write-behind queue still holds {depth} writes after {timeout}")
            time.sleep(_POLL)

    def close(self) -> None:
        self._client.close()


class RowWrites:
    """Counts INSERTs and UPDATEs of ``cachecoord.entries`` rows of *namespace*
    whose key starts with *prefix*, from :meth:`install` on."""

    def __init__(self, dsn: str, namespace: str, prefix: str) -> None:
        if "'" in namespace + prefix or "%" in prefix:
            raise ValueError("namespace and prefix are SQL literals here; no quotes or %")
        self._dsn = dsn
        self._namespace = namespace
        self._prefix = prefix

    def install(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            conn.execute(_INSTALL)
            conn.execute(_TRIGGER.format(namespace=self._namespace, prefix=self._prefix))

    def count(self) -> int:
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM public.bench_row_writes").fetchone()
        assert row is not None
        return int(row[0])

    def remove(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            conn.execute("DROP TRIGGER IF EXISTS bench_count_row_writes ON cachecoord.entries")

    def stored(self) -> dict[str, tuple[bytes, int]]:
        """Each counted key's value and version as PostgreSQL holds them now."""
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            rows = conn.execute(
                """
                SELECT e.key, e.value, coalesce(v.version, 0) FROM cachecoord.entries e
                LEFT JOIN cachecoord.versions v USING (namespace, key)
                WHERE e.namespace = %s AND e.key LIKE %s
                """,
                (self._namespace, self._prefix + "%"),
            ).fetchall()
        return {key: (bytes(data), int(version)) for key, data, version in rows}
