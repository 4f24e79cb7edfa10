"""Scenario ``profile``: where a Get hit's server CPU goes (from Redis, and from
the near cache).

cachecoord's App runs inside this process, on uvloop as ``cachecoord serve``
runs it, over a private Redis and PostgreSQL; a spawned client process (the
load generator of every scenario) sends Get hits on 1,000 keys filled into
Redis first (namespace ``reads``), then on the same keys in a namespace with a
near cache (``near``), ``--conc`` in flight. Per path, two measured windows of
the same calls:

1. **plain**: no profiler; the CPU of every thread of this process is read
   (psutil, /proc) before and after, so the event-loop thread is told apart
   from gRPC core's own threads (their names come from /proc).
2. **profiled**: cProfile on the event-loop thread only, timing with
   ``time.thread_time`` (CPU of that thread, so time other threads spend is
   never charged to a Python function), enabled right after the warm-up and
   disabled after the last reply.

cProfile sees Python functions and C functions called from Python (a redis-py
method, ``hiredis.Reader.gets``, a uvloop transport's ``write``). It does not
see what runs with no Python caller: grpc.aio's Cython layer (cygrpc: the
server's RPC loop, its completion-queue callbacks, deserializing the request
and serializing the reply) and uvloop's own loop (polling, socket reads,
callbacks). That is the *unattributed* part: event-loop thread CPU minus the
time cProfile attributed. The profiler's own cost inflates the Python share:
compare CPU per call with and without it (both printed).
"""

from __future__ import annotations

import asyncio
import cProfile
import logging
import multiprocessing
import pstats
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg

from bench import messages
from bench.harness import Options, method
from bench.loadgen import ClientReport, Job, Worker, use_uvloop
from bench.stack import Stack
from cachecoord.app import App
from cachecoord.config import load
from cachecoord_client import AsyncClient, Layer
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb

NAMESPACES = """
[namespaces.reads]
kind = "managed"
strategy = "cache-aside"
ttl = "1h"

[namespaces.near]
kind = "managed"
strategy = "cache-aside"
ttl = "1h"
near_cache_entries = 2000
near_cache_ttl = "1h"
"""

HOT_KEYS = 1_000
CALLS = 10_000
WARMUP = 1_000
TOP = 15
# Functions whose cumulative time (own + callees) is printed, by file and name.
INCLUSIVE = [
    ("cachecoord/rpc/status.py", "handle", "cachecoord's handler (Get, all it awaits)"),
    ("cachecoord/storage/redis_store.py", "get", "  of which EntryStore.get (redis-py GET)"),
    ("asyncio/tasks.py", "wait", "asyncio.wait (grpc.aio's request loop)"),
]

# Where a function's own time goes, by its file or (for C functions) its name;
# the first rule that matches wins.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("cachecoord (our code)", ("/cachecoord/",)),
    ("redis-py + hiredis", ("/redis/", "hiredis")),
    ("grpc (Python-visible)", ("/grpc/", "grpc", "cygrpc")),
    ("protobuf", ("/google/protobuf/", "google._upb", "upb")),
    ("opentelemetry API", ("/opentelemetry/",)),
    ("asyncio + uvloop (Python-visible)", ("/asyncio/", "uvloop", "_asyncio")),
]
OTHER = "other Python (stdlib, builtins)"
UNATTRIBUTED = "not seen by cProfile (grpc Cython + uvloop C)"
SLUGS = {
    "cachecoord (our code)": "cachecoord",
    "redis-py + hiredis": "redis",
    "grpc (Python-visible)": "grpc_python",
    "protobuf": "protobuf",
    "opentelemetry API": "opentelemetry",
    "asyncio + uvloop (Python-visible)": "asyncio",
    OTHER: "other_python",
    UNATTRIBUTED: "unattributed",
}


@dataclass(frozen=True, slots=True)
class ReadPath:
    """A Get-hit path to profile: its namespace, layer and RESULT prefix."""

    namespace: str
    layer: Layer
    label: str
    prefix: str


PATHS = [
    ReadPath("reads", Layer.REDIS, "Get hit (Redis)", "profile"),
    ReadPath("near", Layer.NEAR, "Get hit (near cache)", "profile_near"),
]


@dataclass(frozen=True, slots=True)
class Window:
    """One measured window of Get hits against the in-process App."""

    client: ClientReport
    seconds: float
    threads: dict[str, float]
    """CPU seconds per thread name (the event loop is "event loop")."""

    @property
    def calls(self) -> int:
        return self.client.calls

    @property
    def cpu_us(self) -> float:
        return 1e6 * sum(self.threads.values()) / self.calls


def run(options: Options) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="cachecoord-bench-"))
    try:
        with Stack(workdir, NAMESPACES, serve=False) as stack:
            stack.config.write_text(stack.config_text())
            settings = load(stack.config, {})
            logging.basicConfig(level=logging.WARNING)
            use_uvloop()
            measured = asyncio.run(_measure(App(settings), stack, options))
        if options.keep:
            for path, (_, _, stats) in zip(PATHS, measured, strict=True):
                dump = workdir / f"get-hit-{path.namespace}.pstats"
                stats.dump_stats(dump)
                print(f"cProfile statistics: {dump} (python -m pstats FILE)")
    finally:
        if options.keep:
            print(f"bench: work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for path, (plain, profiled, stats) in zip(PATHS, measured, strict=True):
        _report(path, plain, profiled, stats)


async def _measure(
    app: App, stack: Stack, options: Options
) -> list[tuple[Window, Window, pstats.Stats]]:
    await app.start()  # creates cachecoord's schema
    keys = [f"r{i}" for i in range(HOT_KEYS)]
    async with await psycopg.AsyncConnection.connect(stack.postgres.dsn, autocommit=True) as conn:
        for path in PATHS:
            await conn.execute(
                "INSERT INTO cachecoord.entries (namespace, key, value) "
                "SELECT %s, k, %s FROM unnest(%s::text[]) AS k",
                (path.namespace, messages.value(options.payload), keys),
            )
    worker = Worker(multiprocessing.get_context("spawn"), 0)
    loop = asyncio.get_running_loop()
    measured = []
    try:
        target = f"127.0.0.1:{app.port}"
        async with AsyncClient(target, default_timeout=30) as client:
            for path in PATHS:
                for start in range(0, len(keys), 100):
                    await client.batch_get(path.namespace, keys[start : start + 100])
                entries = await client.batch_get(path.namespace, keys[:100])
                if not all(e.found and e.layer is path.layer for e in entries):
                    raise RuntimeError(f"{path.namespace}: not in {path.layer.value} after a fill")
        for path in PATHS:
            ns = path.namespace
            warmup = [messages.get(ns, keys[i % len(keys)]) for i in range(options.size(WARMUP))]
            calls = [messages.get(ns, keys[i % len(keys)]) for i in range(options.size(CALLS))]
            job = Job(target, method("Get"), warmup, calls, options.concurrency, sample_every=100)
            plain = await _window(worker, job, None)
            profiler = cProfile.Profile(time.thread_time)
            profiled = await _window(worker, job, profiler)
            layer = pb.LAYER_NEAR if path.layer is Layer.NEAR else pb.LAYER_REDIS
            for raw in (plain.client.samples, profiled.client.samples):
                messages.check_get(raw, layer)
            measured.append((plain, profiled, pstats.Stats(profiler)))
        return measured
    finally:
        await loop.run_in_executor(None, worker.close)
        await app.stop()


async def _window(worker: Worker, job: Job, profiler: cProfile.Profile | None) -> Window:
    loop = asyncio.get_running_loop()
    worker.submit(job)
    await loop.run_in_executor(None, worker.wait_warm)
    before = _thread_cpu()
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    worker.go()
    report = await loop.run_in_executor(None, worker.wait_report)
    if profiler is not None:
        profiler.disable()
    seconds = time.perf_counter() - started
    after = _thread_cpu()
    threads: dict[str, float] = defaultdict(float)
    for tid, (name, cpu) in after.items():
        threads[name] += cpu - before.get(tid, (name, 0.0))[1]
    if report.errors:
        raise RuntimeError(f"{report.errors} Gets failed; first: {report.first_error}")
    return Window(report, seconds, dict(threads))


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of every thread of this process, with a readable name."""
    main = threading.main_thread().native_id
    found = {}
    for thread in psutil.Process().threads():
        if thread.id == main:
            name = "event loop"
        else:
            try:
                name = Path(f"/proc/self/task/{thread.id}/comm").read_text().strip()
            except OSError:
                name = "?"
        found[thread.id] = (name, thread.user_time + thread.system_time)
    return found


def _category(filename: str, function: str) -> str:
    where = f"{filename} {function}"
    for category, marks in CATEGORIES:
        if any(mark in where for mark in marks):
            return category
    return OTHER


def _report(path: ReadPath, plain: Window, profiled: Window, stats: pstats.Stats) -> None:
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    raw = stats.stats  # type: ignore[attr-defined]
    own: dict[str, float] = defaultdict(float)
    for (filename, _, function), (_, _, tottime, _, _) in raw.items():
        own[_category(filename, function)] += tottime
    loop_cpu = profiled.threads.get("event loop", 0.0)
    own[UNATTRIBUTED] = max(0.0, loop_cpu - sum(own.values()))
    print(f"\n== profile: {path.label}, App in-process on uvloop ==")
    for name, window in (("plain", plain), ("profiled", profiled)):
        threads = ", ".join(
            f"{thread} {1e6 * cpu / window.calls:.0f}"
            for thread, cpu in sorted(window.threads.items(), key=lambda item: -item[1])
            if cpu > 0
        )
        print(
            f"{name:<9} {window.calls / window.seconds:>7,.0f} calls/s, "
            f"{window.cpu_us:>5,.0f} us CPU per call; per thread (us/call): {threads}"
        )
    print(f"\nevent-loop thread, profiled window, {1e6 * loop_cpu / profiled.calls:.0f} us/call:")
    for category, seconds in sorted(own.items(), key=lambda item: -item[1]):
        print(
            f"  {category:<46} {100 * seconds / loop_cpu:5.1f} %  "
            f"{1e6 * seconds / profiled.calls:6.1f} us/call"
        )
    print("\ninclusive time (the function and everything it calls), profiled window:")
    for suffix, function, label in INCLUSIVE:
        cumulative = sum(
            values[3]
            for (filename, _, name), values in raw.items()
            if filename.endswith(suffix) and name == function
        )
        print(
            f"  {label:<46} {100 * cumulative / loop_cpu:5.1f} %  "
            f"{1e6 * cumulative / profiled.calls:6.1f} us/call"
        )
    print(f"\ntop {TOP} functions by own time (profiled window):")
    top = sorted(raw.items(), key=lambda item: -item[1][2])[:TOP]
    for key, (_, calls, tottime, _, callers) in top:
        print(
            f"  {100 * tottime / loop_cpu:5.1f} %  {1e6 * tottime / profiled.calls:6.1f} us/call "
            f"{calls / profiled.calls:6.2f} calls/Get  {_where(key)[:90]}"
        )
        if isinstance(callers, dict) and callers:
            caller = max(callers, key=lambda c: callers[c][1])
            print(f"{'':>36}mostly from {_where(caller)[:80]}")
    grpc_threads = sum(cpu for name, cpu in plain.threads.items() if name != "event loop")
    prefix = path.prefix
    results = {
        f"{prefix}_plain_rps": plain.calls / plain.seconds,
        f"{prefix}_plain_cpu_us": plain.cpu_us,
        f"{prefix}_profiled_cpu_us": profiled.cpu_us,
        f"{prefix}_overhead_ratio": profiled.cpu_us / plain.cpu_us,
        f"{prefix}_event_loop_cpu_us": 1e6 * plain.threads.get("event loop", 0.0) / plain.calls,
        f"{prefix}_other_threads_cpu_us": 1e6 * grpc_threads / plain.calls,
    }
    for category, seconds in own.items():
        results[f"{prefix}_share_{SLUGS[category]}_ratio"] = seconds / loop_cpu
    print()
    for name, value in results.items():
        print(
            f"RESULT {name}={value:.3f}" if name.endswith("ratio") else f"RESULT {name}={value:.1f}"
        )


def _where(key: tuple[str, int, str]) -> str:
    filename, line, function = key
    return f"{_short(filename)}:{line}({function})" if line else function


def _short(filename: str) -> str:
    for mark in ("site-packages/", "server/", "lib/python3.11/"):
        if mark in filename:
            return filename.split(mark, 1)[1]
    return filename
