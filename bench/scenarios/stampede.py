"""Scenario ``stampede`` (issue 4): coordination under concurrency.

Three ``cachecoord serve`` processes share one Redis (with ``--cluster``, a
private Redis Cluster of 3 primaries and 3 replicas) and one PostgreSQL; every
read of the benchmark's row takes 50 ms and is counted (bench/slow_rows.py).
Gets are sent by this process over one channel per instance; latency is per
call, from the moment the call starts to its answer.

Per run:

* **stampede**: the key of namespace ``stampede`` (ttl 10 s, no stale window)
  is read once at the start of the run and left to expire in Redis while the
  other phases run; the moment it is gone, 1,000 concurrent Gets spread
  round-robin over the three instances ask for it. Target: exactly one
  database load, p99 within 50 ms of the query time.
* **hit burst**: the same 1,000 concurrent Gets for a key that is cached: what
  the burst of RPCs alone costs on this machine, to read the stampede's
  latency against (``stampede_p99_over_hit_burst_p99_ms``, the same figure as
  ``p99_over_hit_p99_ms``, is the stampede's p99 minus this burst's, per run).
* **echo burst**: 1,000 concurrent calls of the echo floor (bench/floor.py: a
  grpc.aio handler that returns its request), spread round-robin over three
  echo server processes (one per cachecoord instance), one channel each, the
  request being the row's JSON as a Get hit answers it: what a burst of empty
  RPCs costs in Python on this machine, with no Redis or PostgreSQL at all.
* **naive**: the seed article's cache-aside (bench/naive.py), 1,000 concurrent
  coroutines in this process, for the same row, its cache key just expired
  (absent), with 30 PostgreSQL connections (the three instances' pools together).
* **swr** and **xfetch**: a hot key under a steady 400 Gets/s (open loop, spread
  over the instances) for 3.5 s, across three expiries (ttl 1 s): with
  ``stale_window = "5s"`` (XFetch off), then with ``early_refresh_beta = 1``
  (no stale window). A *wait* is an answer from the DATABASE layer: its caller
  waited for a load. Target: 0. Answers slower than 40 ms are counted too (a
  caller on another instance that waited for the lease holder's fill is
  answered from REDIS, but late).
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc

from bench import floor, results, slow_rows
from bench.cluster import AsyncRedis, Cluster
from bench.harness import Options
from bench.loadgen import use_uvloop
from bench.naive import naive_cache_aside
from cachecoord.storage.keys import KeySpace
from cachecoord_client import AsyncClient, Layer

INSTANCES = 3
BURST = 1_000
RATE = 400  # Gets per second in the steady phases
STEADY_S = 3.5
NAIVE_DB_CONNECTIONS = 30  # three instances x postgres.max_connections (10)
NAIVE_REDIS_CONNECTIONS = 64  # as cachecoord's redis.max_connections
# Long enough for the other phases of a run to fit in while the stampede's key
# waits to expire, and for XFetch to stay out of its burst: a burst inflates the
# load time the holder measures (its event loop is saturated), and with a TTL
# of a few seconds the burst's own hits would refresh the key early.
STAMPEDE_TTL = "10s"
SLOW_MS = 40.0
SETTLE_S = 0.3  # lets background refreshes finish before loads are counted
KEY = slow_rows.KEY


def namespaces(stampede_ttl: str) -> str:
    """The TOML of the namespaces, all over the one slow row."""
    return f"""
[namespaces.stampede]
kind = "mapped"
table = "{slow_rows.TABLE}"
key_column = "id"
ttl = "{stampede_ttl}"
ttl_jitter = 0

[namespaces.hits]
kind = "mapped"
table = "{slow_rows.TABLE}"
key_column = "id"
ttl = "1h"

[namespaces.swr]
kind = "mapped"
table = "{slow_rows.TABLE}"
key_column = "id"
ttl = "1s"
ttl_jitter = 0
stale_window = "5s"
early_refresh_beta = 0

[namespaces.xfetch]
kind = "mapped"
table = "{slow_rows.TABLE}"
key_column = "id"
ttl = "1s"
ttl_jitter = 0
early_refresh_beta = 1
"""


@dataclass(frozen=True, slots=True)
class Answer:
    ms: float
    layer: Layer
    stale: bool


@dataclass(frozen=True, slots=True)
class Burst:
    """One burst of concurrent calls: their latencies and the loads they caused."""

    latencies: list[float]
    loads: int
    from_database: int = 0
    """Answers from the DATABASE layer (the lease holder's own callers)."""
    load_ms: int = 0
    """The load time the lease holder stored with the value (XFetch's delta)."""

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99)


@dataclass(frozen=True, slots=True)
class Steady:
    """A steady phase: waits (DATABASE answers), stale and slow answers, loads."""

    answers: list[Answer]
    loads: int

    @property
    def waits(self) -> int:
        return sum(a.layer is Layer.DATABASE for a in self.answers)

    @property
    def stale(self) -> int:
        return sum(a.stale for a in self.answers)

    @property
    def slow(self) -> int:
        return sum(a.ms >= SLOW_MS for a in self.answers)

    @property
    def p99(self) -> float:
        return percentile([a.ms for a in self.answers], 99)


@dataclass(frozen=True, slots=True)
class Run:
    stampede: Burst
    hits: Burst
    echo: Burst
    naive: Burst
    swr: Steady
    xfetch: Steady


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def run(options: Options) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="cachecoord-bench-"))
    failed = True
    try:
        started = time.monotonic()
        ttl = "4s" if options.quick else STAMPEDE_TTL
        with ExitStack() as stack:
            context = multiprocessing.get_context("spawn")
            echoes = [floor.EchoServer(context) for _ in range(INSTANCES)]
            for echo in echoes:
                stack.callback(echo.close)
            cluster = stack.enter_context(
                Cluster(
                    workdir,
                    namespaces(ttl),
                    instances=INSTANCES,
                    prepare=slow_rows.prepare,
                    redis_cluster=options.cluster,
                )
            )
            print(
                f"stack up in {time.monotonic() - started:.1f} s: {INSTANCES} cachecoord "
                f"processes on {', '.join(cluster.targets)}, echo floor on "
                f"{', '.join(echo.target for echo in echoes)}; work directory {workdir}",
                flush=True,
            )
            print(f"Redis: {cluster.describe_redis()}", flush=True)
            use_uvloop()
            asyncio.run(_measure(cluster, [echo.target for echo in echoes], options))
            cluster.check_alive()
        failed = False
    finally:
        if failed or options.keep:
            print(f"bench: work directory kept: {workdir} (cachecoord-N.log are there)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


async def _measure(cluster: Cluster, echo_targets: list[str], options: Options) -> None:
    calls = max(200, BURST // 5) if options.quick else BURST
    seconds = 1.5 if options.quick else STEADY_S
    runs: list[Run] = []
    clients = [AsyncClient(target, default_timeout=30) for target in cluster.targets]
    channels = [grpc.aio.insecure_channel(target) for target in echo_targets]
    echoes = [channel.unary_unary(floor.METHOD, None, None) for channel in channels]
    loads = await slow_rows.Loads.connect(cluster.postgres.dsn)
    redis = cluster.redis_client()
    try:
        query = await slow_rows.query_ms(cluster.database_url)
        for client in clients:  # connect every channel, fill the cached key
            row = (await client.get("hits", KEY)).value
        for echo_call in echoes:  # connect every echo channel
            await echo_call(row, timeout=30)
        for number in range(1, options.runs + 1):
            # The stampede's key is filled first and expires while the others run.
            await clients[0].get("stampede", KEY)
            hits = await _hit_burst(clients, loads, calls)
            echo = await _echo_burst(echoes, row, calls)
            naive = await _naive(cluster, loads, calls)
            swr = await _steady(clients, loads, "swr", seconds)
            xfetch = await _steady(clients, loads, "xfetch", seconds)
            stampede = await _stampede(clients, redis, loads, calls)
            one = Run(stampede, hits, echo, naive, swr, xfetch)
            _show(number, one)
            runs.append(one)
    finally:
        for client in clients:
            await client.close()
        for channel in channels:
            await channel.close(None)
        await redis.aclose()
        await loads.close()
    _report(runs, query, calls)
    _save(options, runs, calls)


async def _timed_get(client: AsyncClient, namespace: str) -> Answer:
    started = time.perf_counter()
    got = await client.get(namespace, KEY)
    took = 1000 * (time.perf_counter() - started)
    if not got.found or got.version < 1:
        raise RuntimeError(f"Get {namespace}/{KEY} answered found={got.found} v{got.version}")
    return Answer(took, got.layer, got.stale)


async def _burst(clients: list[AsyncClient], namespace: str, calls: int) -> list[Answer]:
    return await asyncio.gather(
        *(_timed_get(clients[i % len(clients)], namespace) for i in range(calls))
    )


async def _stampede(
    clients: list[AsyncClient], redis: AsyncRedis, loads: slow_rows.Loads, calls: int
) -> Burst:
    """Wait for the filled entry to expire in Redis, then the burst."""
    # The entry's Redis key (storage/keys.py) has PX = ttl.
    name = KeySpace("stampede").value(KEY)
    deadline = time.monotonic() + 30
    while await redis.exists(name):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not expire within 30 s")
        await asyncio.sleep(0.005)
    before = await loads.count()
    answers = await _burst(clients, "stampede", calls)
    await asyncio.sleep(SETTLE_S)
    loaded = await loads.count() - before
    # The envelope (design 3): version:fresh_until_ms:load_ms:payload.
    stored = cast("bytes | None", await redis.get(name))
    return Burst(
        [a.ms for a in answers],
        loaded,
        sum(a.layer is Layer.DATABASE for a in answers),
        int(stored.split(b":")[2]) if stored else 0,
    )


async def _hit_burst(clients: list[AsyncClient], loads: slow_rows.Loads, calls: int) -> Burst:
    before = await loads.count()
    answers = await _burst(clients, "hits", calls)
    if any(a.layer is not Layer.REDIS for a in answers):
        raise RuntimeError("the hit burst was not all Redis hits")
    return Burst([a.ms for a in answers], await loads.count() - before)


async def _echo_burst(
    echoes: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]], payload: bytes, calls: int
) -> Burst:
    """*calls* concurrent echoes of *payload*, round-robin over the echo servers."""

    async def timed(i: int) -> float:
        started = time.perf_counter()
        reply = await echoes[i % len(echoes)](payload, timeout=30)
        took = 1000 * (time.perf_counter() - started)
        if reply != payload:
            raise RuntimeError("the echo floor answered something else than its request")
        return took

    return Burst(list(await asyncio.gather(*(timed(i) for i in range(calls)))), 0)


async def _naive(cluster: Cluster, loads: slow_rows.Loads, calls: int) -> Burst:
    async with naive_cache_aside(
        cluster.redis_client(NAIVE_REDIS_CONNECTIONS),
        cluster.database_url,
        redis_connections=NAIVE_REDIS_CONNECTIONS,
        db_connections=NAIVE_DB_CONNECTIONS,
    ) as naive:
        # Just expired: the key is gone from Redis, as EXPIRE leaves it.
        await naive.redis.delete(naive.cache_key(KEY))
        before = await loads.count()

        async def timed() -> float:
            started = time.perf_counter()
            answer = await naive.get_user_profile(KEY)
            if answer.value is None:
                raise RuntimeError("the naive cache-aside did not find the row")
            return 1000 * (time.perf_counter() - started)

        latencies = await asyncio.gather(*(timed() for _ in range(calls)))
    return Burst(list(latencies), await loads.count() - before)


async def _steady(
    clients: list[AsyncClient], loads: slow_rows.Loads, namespace: str, seconds: float
) -> Steady:
    """An open loop of RATE Gets per second for *seconds*, after a first fill."""
    await clients[0].get(namespace, KEY)
    before = await loads.count()
    loop = asyncio.get_running_loop()
    started = loop.time()
    tasks = []
    for i in range(round(RATE * seconds)):
        delay = started + i / RATE - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_timed_get(clients[i % len(clients)], namespace)))
    answers = await asyncio.gather(*tasks)
    await asyncio.sleep(SETTLE_S)
    return Steady(answers, await loads.count() - before)


def _show(number: int, one: Run) -> None:
    for name in ("stampede", "hits", "echo", "naive", "swr", "xfetch"):
        phase = getattr(one, name)
        if isinstance(phase, Burst):
            extra = (
                f", {phase.from_database} answered from DATABASE, load timed by the holder "
                f"at {phase.load_ms} ms"
                if name == "stampede"
                else ""
            )
            what = (
                "echoes (no database)"
                if name == "echo"
                else f"Gets: {phase.loads} database load(s)"
            )
            print(
                f"  run {number}: {name:<9} {len(phase.latencies)} concurrent {what}, "
                f"p50 {phase.p50:.0f} ms, p99 {phase.p99:.0f} ms{extra}",
                flush=True,
            )
        else:
            print(
                f"  run {number}: {name:<9} {len(phase.answers)} Gets at {RATE}/s: "
                f"{phase.waits} waits (DATABASE answers), {phase.stale} stale, "
                f"{phase.slow} over {SLOW_MS:.0f} ms, {phase.loads} load(s), "
                f"p99 {phase.p99:.0f} ms",
                flush=True,
            )


def _save(options: Options, runs: list[Run], calls: int) -> None:
    """The latencies of the bursts, every run pooled, for ``python -m bench plot``."""
    phases = []
    for name, label in (
        ("stampede", "stampede (expired key)"),
        ("hits", "hit burst (cached key)"),
        ("echo", f"echo floor burst ({INSTANCES} echo servers)"),
        ("naive", "naive cache-aside"),
    ):
        pcts, ms = results.latency_distribution(
            t / 1000 for r in runs for t in getattr(r, name).latencies
        )
        phases.append(results.PhaseFigures(name, label, math.nan, latency_pct=pcts, latency_ms=ms))
    title = f"stampede: bursts of {calls} concurrent Gets over {INSTANCES} instances"
    results.save(options, "stampede", title, phases, {}, runs=len(runs))


def _report(runs: list[Run], query: float, calls: int) -> None:
    stampede, hits, naive = (
        [r.stampede for r in runs],
        [r.hits for r in runs],
        [r.naive for r in runs],
    )
    swr, xfetch = [r.swr for r in runs], [r.xfetch for r in runs]
    results: dict[str, float] = {
        "query_ms": query,
        "db_loads": max(b.loads for b in stampede),
        "p50_ms": statistics.median(b.p50 for b in stampede),
        "p99_ms": statistics.median(b.p99 for b in stampede),
        "hit_p50_ms": statistics.median(b.p50 for b in hits),
        "hit_p99_ms": statistics.median(b.p99 for b in hits),
        "p99_over_hit_p99_ms": statistics.median(r.stampede.p99 - r.hits.p99 for r in runs),
        "echo_burst_p50_ms": statistics.median(r.echo.p50 for r in runs),
        "echo_burst_p99_ms": statistics.median(r.echo.p99 for r in runs),
        "stampede_p99_over_hit_burst_p99_ms": statistics.median(
            r.stampede.p99 - r.hits.p99 for r in runs
        ),
        "naive_db_loads": max(b.loads for b in naive),
        "naive_p50_ms": statistics.median(b.p50 for b in naive),
        "naive_p99_ms": statistics.median(b.p99 for b in naive),
        "swr_waits": sum(s.waits for s in swr),
        "swr_slow": sum(s.slow for s in swr),
        "swr_stale": sum(s.stale for s in swr),
        "swr_loads": sum(s.loads for s in swr),
        "swr_p99_ms": statistics.median(s.p99 for s in swr),
        "xfetch_waits": sum(s.waits for s in xfetch),
        "xfetch_slow": sum(s.slow for s in xfetch),
        "xfetch_loads": sum(s.loads for s in xfetch),
        "xfetch_p99_ms": statistics.median(s.p99 for s in xfetch),
    }
    print(f"\n== stampede: {len(runs)} run(s), {calls} concurrent Gets per burst ==")
    print(f"query: {query:.1f} ms (median of 5 direct executions as the reader role)")
    bound = query + 50
    targets = [
        (
            "exactly 1 database load per stampede",
            all(b.loads == 1 for b in stampede),
            f"loads per run: {', '.join(str(b.loads) for b in stampede)}",
        ),
        (
            f"stampede p99 <= query + 50 ms = {bound:.0f} ms",
            results["p99_ms"] <= bound,
            f"p99 {results['p99_ms']:.0f} ms; the same burst of cached hits: "
            f"p99 {results['hit_p99_ms']:.0f} ms; of echo floor calls: "
            f"p99 {results['echo_burst_p99_ms']:.0f} ms",
        ),
        ("swr_waits = 0", results["swr_waits"] == 0, f"{results['swr_waits']:.0f}"),
        ("xfetch_waits = 0", results["xfetch_waits"] == 0, f"{results['xfetch_waits']:.0f}"),
    ]
    for label, met, detail in targets:
        print(f"target {label}: {'met' if met else 'NOT met'} ({detail})")
    print(
        "db_loads and naive_db_loads: the largest of any run; *_waits, *_slow, *_stale, "
        "*_loads: totals over runs; latencies: medians over runs"
    )
    print()
    for name, value in results.items():
        shown = f"{value:.1f}" if name.endswith("_ms") else f"{value:.0f}"
        print(f"RESULT {name}={shown}")
