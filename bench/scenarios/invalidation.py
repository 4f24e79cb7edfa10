"""Scenario ``invalidation`` (issue 5): how fast a change reaches the near
caches of the other instances.

Three ``cachecoord serve`` processes share one Redis (with ``--cluster``, a
private Redis Cluster of 3 primaries and 3 replicas) and one PostgreSQL and
serve the mapped namespace ``inv`` (cache-aside, Redis ttl 1 h) over the table
``inv_rows``, with a **near cache** whose ``near_cache_ttl`` (60 s) is longer
than the whole run: an entry of the near cache can only become fresh again by
an invalidation message. The table's change triggers are installed with
``cachecoord triggers install inv`` (as an operator would), so a plain
``UPDATE`` made by another program invalidates too.

Two reader processes, one per instance 2 and 3, load their instance at a
steady, moderate rate and log every answer: when it was sent, when it came
back, the ``rev`` it carried and whether it came from the near cache. Each
first measures its instance's Get capacity (``CAPACITY_CONC`` Gets in flight
for ``CAPACITY_S``), then sends ``LOAD_SHARE`` of that rate, open loop, round
robin over the keys (each key at fixed times; a late Get is sent at once, never
in a catch-up burst), so propagation is measured on a busy instance that is
not saturated. A failed Get is counted and retried; it does not end the run.
Each reader also holds a Watch stream on its instance and logs when each
key's event arrives: the instance forgets the old value (near cache) before it
sends the event, so that arrival time is the propagation time without the
polling's resolution.

This process writes, open loop, one write every ``WRITE_INTERVAL``
round-robin over ``KEYS`` keys, each write setting ``rev`` to a new,
increasing number (after a stall, late writes go out back to back):

* **put**: ``Put`` through instance 1 (the readers never read from it);
* **db**: ``UPDATE inv_rows SET rev = ...`` over psycopg, autocommit.

The propagation time of a write, per reader instance, runs from its
acknowledgement (Put returned; the UPDATE's commit returned) to the arrival of
the key's Watch event at that reader (``propagation``: the first event of the
key that arrived after the write was sent; 0 if it came before the
acknowledgement). The *visible* time runs to the moment the first Get of that
reader that answered ``rev`` >= the write's came back (so it also includes up
to one polling interval and one Get round trip). A **stale read after the
bound** is a Get sent more than ``BOUND_S`` after some write of its key was
acknowledged that still answered an older ``rev`` (target 0). Each of
``--runs`` rounds writes ``WRITES`` times per path (``QUICK_WRITES`` with
``--quick``), each path after a warm-up write per key that is not measured,
and lets the readers poll ``SETTLE_S`` more before the next path starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from multiprocessing.connection import Connection
from pathlib import Path

import psycopg

from bench.cluster import Cluster, Instance
from bench.harness import Options
from bench.loadgen import use_uvloop
from cachecoord.app import change_triggers
from cachecoord.config import load
from cachecoord_client import AsyncClient, CacheCoordError, Layer, WatchEventKind

INSTANCES = 3
NAMESPACE = "inv"
TABLE = "inv_rows"
KEYS = 8
WRITES = 200  # measured writes per path and round
QUICK_WRITES = 56
WRITE_INTERVAL = 0.025  # open loop: 40 writes/s, so each key is written every 200 ms
CAPACITY_CONC = 32
CAPACITY_S = 1.5
LOAD_SHARE = 0.5  # of the measured Get capacity
RETRY_GAP_S = 0.002
BOUND_S = 1.0
SETTLE_S = BOUND_S + 0.25  # readers keep polling this long after a phase's last write
READY_TIMEOUT = 60.0
CALL_TIMEOUT = 60.0  # generous: a stall shows up as a long propagation, not a crash
PATHS = ("put", "db")


def namespaces() -> str:
    return f"""
[namespaces.{NAMESPACE}]
kind = "mapped"
table = "{TABLE}"
key_column = "id"
ttl = "1h"
ttl_jitter = 0
near_cache_entries = 1000
near_cache_ttl = "60s"
"""


def _keys() -> list[str]:
    return [str(k) for k in range(1, KEYS + 1)]


def _prepare(payload: int) -> Callable[[str], str]:
    def prepare(admin_dsn: str) -> str:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(
                f"CREATE TABLE {TABLE} (id integer PRIMARY KEY, rev bigint NOT NULL, "
                "note text NOT NULL)"
            )
            with conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {TABLE} VALUES (%s, 0, %s)",
                    [(int(key), "x" * payload) for key in _keys()],
                )
        return admin_dsn

    return prepare


# -- the readers ---------------------------------------------------------------


@dataclass(slots=True)
class KeyLog:
    """Every Get of one key by one reader, in the order they were sent."""

    sent: array[float] = field(default_factory=lambda: array("d"))
    answered: array[float] = field(default_factory=lambda: array("d"))
    revs: array[int] = field(default_factory=lambda: array("q"))
    versions: array[int] = field(default_factory=lambda: array("q"))
    """The version cachecoord answered with (the rev is what the writer wrote)."""
    near: array[int] = field(default_factory=lambda: array("b"))
    """1 if the answer came from the instance's near cache."""
    events: array[float] = field(default_factory=lambda: array("d"))
    """When each Watch event of the key arrived."""


@dataclass(slots=True)
class ReaderLog:
    instance: str
    keys: dict[str, KeyLog]
    capacity: float = 0.0
    """Gets per second the instance answered with CAPACITY_CONC in flight."""
    rate: float = 0.0
    """Gets per second sent during the measurement (LOAD_SHARE of capacity)."""
    resets: int = 0
    """Watch RESETs after the first (events may have been missed)."""
    errors: int = 0
    """Gets that failed (each is retried after RETRY_GAP_S); not logged above."""
    first_error: str = ""


def _reader_main(conn: Connection) -> None:
    """Entry point of a reader process: wait for its instance, poll until the
    parent says stop."""
    use_uvloop()
    try:
        job = conn.recv()
        if job is None:  # the parent gave up before the cluster was up
            return
        instance, target, keys = job
        asyncio.run(_read(conn, instance, target, keys))
    except BaseException as err:  # report, so the parent fails with the reason
        with contextlib.suppress(OSError):
            conn.send(RuntimeError(f"{type(err).__name__}: {err}"))
        raise


async def _capacity(client: AsyncClient, keys: list[str]) -> float:
    """Gets per second answered with CAPACITY_CONC in flight, for CAPACITY_S."""
    loop = asyncio.get_running_loop()
    end = loop.time() + CAPACITY_S
    answered = 0

    async def worker(offset: int) -> None:
        nonlocal answered
        i = offset
        while loop.time() < end:
            await client.get(NAMESPACE, keys[i % len(keys)])
            answered += 1
            i += 1

    started = loop.time()
    await asyncio.gather(*(worker(i) for i in range(CAPACITY_CONC)))
    return answered / (loop.time() - started)


async def _read(conn: Connection, instance: str, target: str, keys: list[str]) -> None:
    logs = {key: KeyLog() for key in keys}
    result = ReaderLog(instance, logs)
    stop = False
    loop = asyncio.get_running_loop()
    clock = time.monotonic  # CLOCK_MONOTONIC: the same in every process
    async with AsyncClient(target, default_timeout=CALL_TIMEOUT) as client:
        result.capacity = await _capacity(client, keys)
        result.rate = LOAD_SHARE * result.capacity
        interval = len(keys) / result.rate  # between two Gets of one key

        async def poll(key: str, first: float) -> None:
            log = logs[key]
            due = first
            while not stop:
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                due = max(due + interval, loop.time())  # late: no catch-up burst
                sent = clock()
                try:
                    got = await client.get(NAMESPACE, key)
                except CacheCoordError as err:  # e.g. UNAVAILABLE on a starved machine
                    result.errors += 1
                    result.first_error = result.first_error or f"{type(err).__name__}: {err}"
                    await asyncio.sleep(RETRY_GAP_S)
                    continue
                answered = clock()
                if not got.found:
                    raise RuntimeError(f"Get {NAMESPACE}/{key} on {instance}: not found")
                log.sent.append(sent)
                log.answered.append(answered)
                log.revs.append(int(json.loads(got.value)["rev"]))
                log.versions.append(got.version)
                log.near.append(got.layer is Layer.NEAR)

        async def watch() -> None:
            async with client.watch([NAMESPACE], timeout=None) as events:
                first = True
                async for event in events:
                    arrived = clock()
                    if event.kind is WatchEventKind.RESET:
                        result.resets += 0 if first else 1
                        first = False
                    elif event.kind is WatchEventKind.INVALIDATION and event.key in logs:
                        logs[event.key].events.append(arrived)

        watcher = asyncio.create_task(watch())
        start = loop.time()
        tasks = [
            asyncio.create_task(poll(key, start + i * interval / len(keys)))
            for i, key in enumerate(keys)
        ]
        while not all(logs[key].revs for key in keys):
            if done := [t for t in [*tasks, watcher] if t.done()]:
                await done[0]  # raises the poller's error
            await asyncio.sleep(0.01)
        conn.send("ready")
        stopper = loop.run_in_executor(None, conn.recv)
        await asyncio.wait([stopper, watcher, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in [*tasks, watcher]:
            if task.done():
                await task  # a poller failed: raise its error
        stop = True
        await asyncio.gather(*tasks)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    conn.send(result)


class Reader:
    """A reader process, driven through a pipe. It is started before the
    cluster (a spawned Python takes a second to import grpc), then told which
    instance to poll."""

    def __init__(self, context: multiprocessing.context.SpawnContext, index: int) -> None:
        self.name = f"reader {index}"
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_reader_main, args=(child,), name=f"bench-reader-{index}", daemon=True
        )
        self._process.start()
        child.close()

    def begin(self, instance: Instance, keys: list[str]) -> None:
        """Poll *keys* on *instance*; :meth:`wait_ready` waits for the first answers."""
        self.name = f"reader of {instance.name}"
        self._conn.send((instance.name, instance.target, keys))

    def wait_ready(self) -> None:
        if self._receive(READY_TIMEOUT) != "ready":
            raise RuntimeError(f"{self.name}: expected 'ready'")

    def stop(self) -> ReaderLog:
        self._conn.send("stop")
        log = self._receive(READY_TIMEOUT)
        if not isinstance(log, ReaderLog):
            raise RuntimeError(f"{self.name}: expected its log, got {log!r}")
        return log

    def check(self) -> None:
        """Raise if the reader has failed meanwhile (it sends its error)."""
        if self._conn.poll(0):
            self._receive(0)
            raise RuntimeError(f"{self.name} sent something unexpected")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)  # only read by a reader that was never begun
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._conn.close()

    def _receive(self, timeout: float) -> object:
        if not self._conn.poll(timeout):
            raise RuntimeError(f"{self.name} sent nothing for {timeout:.0f} s")
        try:
            message: object = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name} exited (code {self._process.exitcode})") from None
        if isinstance(message, BaseException):
            raise RuntimeError(f"{self.name} failed: {message!r}") from message
        return message


# -- the writer ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Write:
    path: str
    key: str
    rev: int
    sent: float
    """time.monotonic() when the write was sent."""
    ack: float
    """time.monotonic() when the write was acknowledged."""
    measured: bool
    took_ms: float


class Writer:
    """One writer per path; revs increase over both paths and every round."""

    def __init__(self, client: AsyncClient, db: psycopg.AsyncConnection) -> None:
        self._client = client
        self._db = db
        self._rev = 0
        self.writes: list[Write] = []

    async def _put(self, key: str, rev: int) -> None:
        await self._client.put(NAMESPACE, key, json.dumps({"rev": rev}).encode())

    async def _update(self, key: str, rev: int) -> None:
        cur = await self._db.execute(
            f"UPDATE {TABLE} SET rev = %s WHERE id = %s", (rev, int(key))
        )  # autocommit: execute returns after the commit
        if cur.rowcount != 1:
            raise RuntimeError(f"UPDATE of {TABLE} id {key} changed {cur.rowcount} rows")

    async def phase(self, path: str, count: int, readers: Sequence[Reader]) -> list[Write]:
        """A warm-up write per key, then *count* measured writes, open loop."""
        write: Callable[[str, int], Awaitable[None]] = self._put if path == "put" else self._update
        keys = _keys()
        loop = asyncio.get_running_loop()
        started = loop.time()
        done: list[Write] = []
        for i in range(len(keys) + count):
            delay = started + i * WRITE_INTERVAL - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._rev += 1
            key = keys[i % len(keys)]
            sent = time.monotonic()
            await write(key, self._rev)
            ack = time.monotonic()
            done.append(Write(path, key, self._rev, sent, ack, i >= len(keys), 1000 * (ack - sent)))
            if i % 50 == 0:
                for reader in readers:
                    reader.check()
        await asyncio.sleep(SETTLE_S)
        self.writes += done
        return [w for w in done if w.measured]


# -- the analysis --------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """Propagation times per path, and what the readers saw."""

    events: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PATHS})
    """Milliseconds from the ack to the key's Watch event, per write and reader."""
    no_event: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))
    delays: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PATHS})
    """Milliseconds from the ack to a Get answering it, per write and reader."""
    windows: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PATHS})
    """Milliseconds from the ack to the sending of the last Get that still
    answered an older rev (0 if none was sent after the ack): a lower bound of
    the propagation time, which a stalled reader cannot inflate."""
    unseen: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))
    stale: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))
    """Stale reads after the bound, by the path of the write they missed."""
    reads: int = 0
    near: int = 0
    capacity: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    resets: int = 0
    get_ms: list[float] = field(default_factory=list)
    every_ms: list[float] = field(default_factory=list)
    """Time between two Gets of one key by one reader: the resolution."""
    errors: int = 0
    first_error: str = ""
    episodes: list[str] = field(default_factory=list)
    """One line per (reader, key, missed write) with stale reads after the bound."""


def analyse(writes: list[Write], logs: list[ReaderLog], outcome: Outcome) -> None:
    by_key: dict[str, list[Write]] = {}
    for w in writes:
        by_key.setdefault(w.key, []).append(w)
    for log in logs:
        outcome.errors += log.errors
        outcome.first_error = outcome.first_error or log.first_error
        outcome.capacity.append(log.capacity)
        outcome.rate.append(log.rate)
        outcome.resets += log.resets
        for key, reads in log.keys.items():
            key_writes = sorted(by_key.get(key, []), key=lambda w: w.rev)
            # A write's event: the key's first event that arrived after it was
            # sent (one write of a key at a time, each answered before the next).
            for w in key_writes:
                if not w.measured:
                    continue
                index = bisect_right(reads.events, w.sent)
                if index == len(reads.events):
                    outcome.no_event[w.path] += 1
                else:
                    outcome.events[w.path].append(max(0.0, 1000 * (reads.events[index] - w.ack)))
            # First read answering rev >= n: bisect the running maximum of revs.
            highest = list(accumulate(reads.revs, max))
            for w in key_writes:
                if not w.measured:
                    continue
                index = bisect_left(highest, w.rev)
                if index == len(highest):
                    outcome.unseen[w.path] += 1
                else:
                    outcome.delays[w.path].append(max(0.0, 1000 * (reads.answered[index] - w.ack)))
                    last_old = reads.sent[index - 1] if index else w.ack
                    outcome.windows[w.path].append(max(0.0, 1000 * (last_old - w.ack)))
            # A read sent after ack + bound must answer that write's rev or newer.
            # Writes of one key are sequential: acks increase with revs.
            deadlines = [w.ack + BOUND_S for w in key_writes]
            episodes: dict[int, list[int]] = {}  # due write's rev -> indexes of stale reads
            for index, (sent, rev) in enumerate(zip(reads.sent, reads.revs, strict=True)):
                due = bisect_right(deadlines, sent)
                if due and rev < key_writes[due - 1].rev:
                    outcome.stale[key_writes[due - 1].path] += 1
                    episodes.setdefault(due - 1, []).append(index)
            for due, indexes in episodes.items():
                w, first, last = key_writes[due], indexes[0], indexes[-1]
                layer = "near cache" if reads.near[first] else "Redis/PostgreSQL"
                outcome.episodes.append(
                    f"{log.instance} key {key}: {len(indexes)} stale read(s) of write rev "
                    f"{w.rev} ({w.path}), sent {reads.sent[first] - w.ack:.2f} s to "
                    f"{reads.sent[last] - w.ack:.2f} s after its ack; the first answered rev "
                    f"{reads.revs[first]} (version {reads.versions[first]}) from the {layer}"
                )
            outcome.reads += len(reads.revs)
            outcome.near += sum(reads.near)
            outcome.get_ms += [
                1000 * (a - s) for s, a in zip(reads.sent, reads.answered, strict=True)
            ]
            outcome.every_ms += [1000 * (b - a) for a, b in pairwise(reads.sent)]


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (nan for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


# -- the scenario --------------------------------------------------------------


def run(options: Options) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="cachecoord-bench-"))
    failed = True
    context = multiprocessing.get_context("spawn")
    try:
        started = time.monotonic()
        with ExitStack() as stack:
            readers = [Reader(context, index) for index in range(1, INSTANCES)]
            for reader in readers:
                stack.callback(reader.close)
            cluster = stack.enter_context(
                Cluster(
                    workdir,
                    namespaces(),
                    instances=INSTANCES,
                    prepare=_prepare(options.payload),
                    redis_cluster=options.cluster,
                )
            )
            _install_triggers(cluster.instances[0])
            writer_instance, *reader_instances = cluster.instances
            print(
                f"stack up in {time.monotonic() - started:.1f} s: {INSTANCES} cachecoord "
                f"processes on {', '.join(cluster.targets)} (near cache on, "
                f"near_cache_ttl 60 s, triggers installed); Puts through "
                f"{writer_instance.name}, readers on "
                f"{', '.join(i.name for i in reader_instances)}; work directory {workdir}",
                flush=True,
            )
            print(f"Redis: {cluster.describe_redis()}", flush=True)
            for reader, instance in zip(readers, reader_instances, strict=True):
                reader.begin(instance, _keys())
            outcome = _measure(cluster, readers, options)
            cluster.check_alive()
        failed = False
    finally:
        if failed or options.keep:
            print(f"bench: work directory kept: {workdir} (cachecoord-N.log are there)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    _report(outcome, options)


def _install_triggers(instance: Instance) -> None:
    """What ``cachecoord triggers install inv --config FILE`` does, in this
    process (a new Python would take seconds to start on a busy machine)."""
    settings = load(instance.config, {})
    print(asyncio.run(change_triggers(settings, NAMESPACE, "install")), flush=True)


def _measure(cluster: Cluster, readers: list[Reader], options: Options) -> Outcome:
    for reader in readers:
        reader.wait_ready()
    use_uvloop()
    writes = asyncio.run(_write(cluster, readers, options))
    logs = [reader.stop() for reader in readers]
    outcome = Outcome()
    analyse(writes, logs, outcome)
    return outcome


async def _write(cluster: Cluster, readers: list[Reader], options: Options) -> list[Write]:
    count = QUICK_WRITES if options.quick else WRITES
    async with (
        AsyncClient(cluster.instances[0].target, default_timeout=CALL_TIMEOUT) as client,
        await psycopg.AsyncConnection.connect(cluster.database_url, autocommit=True) as db,
    ):
        writer = Writer(client, db)
        for number in range(1, options.runs + 1):
            for path in PATHS:
                measured = await writer.phase(path, count, readers)
                took = [w.took_ms for w in measured]
                print(
                    f"  run {number}: {path:<3} {len(measured)} writes over {KEYS} keys at "
                    f"{1 / WRITE_INTERVAL:.0f}/s, acknowledged in p50 "
                    f"{percentile(took, 50):.1f} ms, p99 {percentile(took, 99):.1f} ms",
                    flush=True,
                )
        return writer.writes


def _report(outcome: Outcome, options: Options) -> None:
    runs = options.runs
    count = QUICK_WRITES if options.quick else WRITES
    print(
        f"\n== invalidation: {runs} run(s) x {count} writes per path, "
        f"{INSTANCES - 1} reader instances =="
    )
    print(
        f"propagation: from the write's acknowledgement to the answer of the first Get on "
        f"another instance carrying the new value (one sample per write and reader "
        f"instance); bound for stale reads: {1000 * BOUND_S:.0f} ms after the acknowledgement"
    )
    results: dict[str, float] = {}
    for path in PATHS:
        events, delays = outcome.events[path], outcome.delays[path]
        print(
            f"{path:<3}: {len(events)} samples, event p50 {percentile(events, 50):.1f} ms, "
            f"p99 {percentile(events, 99):.1f} ms, max {max(events, default=math.nan):.1f} ms "
            f"({outcome.no_event[path]} without an event); visible to a Get p50 "
            f"{percentile(delays, 50):.1f} ms, p99 {percentile(delays, 99):.1f} ms "
            f"({outcome.unseen[path]} never seen); "
            f"{outcome.stale[path]} stale reads after the bound"
        )
        results[f"{path}_propagation_p50_ms"] = percentile(events, 50)
        results[f"{path}_propagation_p99_ms"] = percentile(events, 99)
        results[f"{path}_propagation_max_ms"] = max(events, default=math.nan)
        results[f"{path}_visible_p50_ms"] = percentile(delays, 50)
        results[f"{path}_visible_p99_ms"] = percentile(delays, 99)
        results[f"{path}_visible_max_ms"] = max(delays, default=math.nan)
        windows = outcome.windows[path]
        results[f"{path}_stale_window_p99_ms"] = percentile(windows, 99)
        print(
            f"     the last Get still answering the old value was sent p50 "
            f"{percentile(windows, 50):.1f} ms, p99 {percentile(windows, 99):.1f} ms, "
            f"max {max(windows, default=math.nan):.1f} ms after the ack"
        )
    near = outcome.near / outcome.reads if outcome.reads else math.nan
    print(
        f"readers: {outcome.reads} Gets, {100 * near:.1f} % from the near cache, "
        f"Get p50 {percentile(outcome.get_ms, 50):.2f} ms, "
        f"p99 {percentile(outcome.get_ms, 99):.2f} ms; a key was read every "
        f"{percentile(outcome.every_ms, 50):.2f} ms (p50), {percentile(outcome.every_ms, 99):.2f} "
        f"ms (p99)"
    )
    capacity, rate = statistics.median(outcome.capacity), statistics.median(outcome.rate)
    print(
        f"load: each reader instance answered {capacity:,.0f} Gets/s with {CAPACITY_CONC} in "
        f"flight; the readers then sent {rate:,.0f}/s each ({100 * LOAD_SHARE:.0f} %)"
    )
    # The figure the target is about: the Put path at this moderate load.
    results["propagation_p99_ms"] = results["put_propagation_p99_ms"]
    results["get_capacity_rps"] = capacity
    results["read_rate_rps"] = rate
    results["watch_resets"] = outcome.resets
    results["bound_ms"] = 1000 * BOUND_S
    results["stale_reads_after_bound"] = sum(outcome.stale.values())
    results["unseen_writes"] = sum(outcome.unseen.values())
    results["reads"] = outcome.reads
    results["get_errors"] = outcome.errors
    results["near_hit_ratio"] = near
    results["get_p99_ms"] = percentile(outcome.get_ms, 99)
    if outcome.errors:
        print(f"readers: {outcome.errors} Gets failed (retried); first: {outcome.first_error}")
    for line in outcome.episodes[:10]:
        print(f"stale: {line}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load} (1, 5, 15 min) at the end")
    print(
        "target: stale_reads_after_bound = 0: "
        + ("met" if results["stale_reads_after_bound"] == 0 else "NOT met")
    )
    print()
    for name, value in results.items():
        print(f"RESULT {name}={_format(name, value)}")


def _format(name: str, value: float) -> str:
    if name.endswith("_ms"):
        return f"{value:.1f}"
    if name.endswith("ratio"):
        return f"{value:.3f}"
    return f"{value:.0f}"
