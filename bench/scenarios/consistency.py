"""Scenario ``consistency`` (issue 17): the history checker, for longer.

The same run as ``tests/integration/test_history.py`` (the checker is
``tests/history_support.py``; its docstring says what is checked and with
which bound): four cachecoord instances (three in this process, one a
``cachecoord serve`` process), with near caches and a LocalCache each, one
namespace per strategy (cache-aside, write-through, write-behind, versioned
keys, and the mapped ``users`` table with change triggers); writers, readers
(Get, BatchGet, LocalCache), an invalidator and direct SQL updates, for
``--seconds`` (300 by default, 20 with ``--quick``). Faults: loads of one
key per namespace made slow inside PostgreSQL; every pub/sub connection cut
at 20 %, 50 % and 80 % of the run; Redis frozen (SIGSTOP) for 1.5 s at 35 %
and 65 %; the ``cachecoord serve`` instance killed (SIGKILL) at 75 %. One
Redis: the run on a Redis Cluster is the suite's (``test_history.py``,
without the freeze).

Figures (``RESULT`` lines), in total and per path (``redis``, ``database``,
``near``, ``local_memory``; ``not_found`` if a read ever found nothing,
which is always wrong here):

* ``stale_reads_beyond_bound``: reads older than their path's bound allows
  (target 0);
* ``reads_checked``;
* ``internal_errors``: calls answered ``INTERNAL`` or ``UNKNOWN`` (a server
  bug, whatever the fault; target 0);
* ``worst_staleness_ms``: the longest time between the acknowledgement of
  a write and the start of a read that did not reflect it (within its bound
  or not: a near cache on another instance may lag by the time its
  invalidation takes to arrive; writes made during a Redis freeze by up to
  the outbox's grace after Redis is back).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from bench.harness import Options
from bench.stack import ROOT
from local_servers import PostgresServer, RedisServer

sys.path.insert(0, str(ROOT / "tests"))

from history_support import USERS_TABLE, Faults, Report, run_history

DEFAULT_SECONDS = 300.0
QUICK_SECONDS = 20.0


def run(options: Options) -> None:
    seconds = options.seconds or (QUICK_SECONDS if options.quick else DEFAULT_SECONDS)
    workdir = Path(tempfile.mkdtemp(prefix="bench-consistency-"))
    workdir.chmod(0o755)  # PostgreSQL runs as its own user below it
    redis = RedisServer(workdir / "redis")
    postgres = PostgresServer(workdir / "postgres")
    try:
        redis.start()
        postgres.start()
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute(USERS_TABLE)
        faults = Faults(
            cut_pubsub_at=(0.2, 0.5, 0.8), freeze_redis_at=(0.35, 0.65), redis_pid=redis.pid
        )
        print(f"running {seconds:.0f} s of mixed load over 4 instances", flush=True)
        started = time.monotonic()
        report = asyncio.run(_run(workdir, redis.url, postgres.dsn, seconds, faults))
        print(f"({time.monotonic() - started:.0f} s) {report.summary()}", flush=True)
        for violation in report.violations:
            print(f"  {violation}", flush=True)
        for line in report.result_lines():
            print(line, flush=True)
    finally:
        postgres.stop()
        redis.stop()
        if options.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


async def _run(workdir: Path, url: str, dsn: str, seconds: float, faults: Faults) -> Report:
    return await run_history(
        workdir,
        [url],
        dsn,
        seconds,
        faults=faults,
        log=lambda message: print(f"  fault: {message}", flush=True),
    )
