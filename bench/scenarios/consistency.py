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

The instances also run the consistency observer (issue 21) on
``OBSERVE`` of the changes, checked 5 s after each: ``consistency_checks``,
``consistency_violations`` and ``consistency_nines`` (-log10 of the
violation rate; with no violation, log10 of the checks: what they can show).

Then what the observer costs (``observer_cpu_ratio``): two ``cachecoord
serve`` processes over one Redis and PostgreSQL, one with the observer at
1 % (checked after 1 s), one without, take Puts in turn (each hears the
other's changes too, as instances do); server CPU per Put, the CPU window
held open past the checks' delay; the median over runs of on / off.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import redis.asyncio as aioredis

from bench import messages
from bench.harness import Harness, Options
from bench.report import Phase, Report, cpu_us
from bench.stack import ROOT
from cachecoord.consistency import nines
from cachecoord.storage.consistency_log import ConsistencyLog
from local_servers import PostgresServer, RedisServer

sys.path.insert(0, str(ROOT / "tests"))

from history_support import NAMESPACES, USERS_TABLE, Faults, Workload, run_history
from history_support import Report as History

DEFAULT_SECONDS = 300.0
QUICK_SECONDS = 20.0
OBSERVE = 0.1

COST_NAMESPACE = """
[namespaces.observed]
kind = "managed"
strategy = "cache-aside"
"""
COST_SAMPLE = 0.01
COST_DELAY_S = 1.0
COST_KEYS = 500
COST_CALLS = 3_000
COST_RUNS = 7


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
        checks, violations = asyncio.run(_observed(redis.url, seconds))
        print(f"RESULT consistency_checks={checks}", flush=True)
        print(f"RESULT consistency_violations={violations}", flush=True)
        print(f"RESULT consistency_nines={nines(checks, violations):.2f}", flush=True)
    finally:
        postgres.stop()
        redis.stop()
        if options.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    _observer_cost(options)


async def _run(workdir: Path, url: str, dsn: str, seconds: float, faults: Faults) -> History:
    return await run_history(
        workdir,
        [url],
        dsn,
        seconds,
        faults=faults,
        workload=Workload(observe=OBSERVE),
        log=lambda message: print(f"  fault: {message}", flush=True),
    )


async def _observed(url: str, seconds: float) -> tuple[int, int]:
    """What the instances' observers counted (every namespace, the whole run)."""
    client = aioredis.Redis.from_url(url)
    try:
        log = ConsistencyLog(client)
        minutes = int(seconds // 60) + 3
        counts = [await log.counts(namespace, minutes) for namespace in NAMESPACES]
    finally:
        await client.aclose()
    return sum(c.checks for c in counts), sum(c.violations for c in counts)


OFF = Phase("put_observer_off", "Put, observer off")
ON = Phase("put_observer_1", "Put, observer at 1 %")


def _observer_cost(options: Options) -> None:
    report = Report("consistency: what the observer costs a Put (server CPU)")
    with Harness(options, COST_NAMESPACE) as harness:
        off = harness.stack.servers[0]
        on = harness.stack.add_server(
            "observed",
            env={
                "CACHECOORD_SERVER_CONSISTENCY_SAMPLE": str(COST_SAMPLE),
                "CACHECOORD_SERVER_CONSISTENCY_DELAY": f"{int(COST_DELAY_S * 1000)}ms",
            },
        )
        keys = [f"k{i}" for i in range(COST_KEYS)]
        warmup = [messages.put("observed", key, b"warm") for key in keys]
        calls = options.size(COST_CALLS)
        measured = [messages.put("observed", keys[i % COST_KEYS], b"%d" % i) for i in range(calls)]

        def settle() -> None:  # the CPU window stays open past the checks' delay
            time.sleep(COST_DELAY_S + 0.2)

        for number in range(options.runs_or(COST_RUNS)):
            report.new_run()
            for phase, server in ((OFF, off), (ON, on))[:: 1 if number % 2 else -1]:
                # Held open past the delay: the checks of this phase's Puts count.
                sample = harness.measure(
                    "Put",
                    warmup,
                    measured,
                    server=server,
                    settle=lambda: time.sleep(COST_DELAY_S + 0.2),
                )
                report.add(phase, sample)
    report.result("observer_cpu_ratio", report.paired(ON.name, OFF.name, cpu_us))
    report.finish()
    report.save(options, "consistency")
