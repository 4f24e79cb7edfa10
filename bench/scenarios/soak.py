"""Scenario ``soak`` (issue 8): a mixed load for a fixed time, through a Redis
and a PostgreSQL outage, counting what an operator cares about afterwards.

One ``cachecoord serve`` process serves three managed namespaces, one per
strategy, over its own Redis (AOF, ``appendfsync always``) and PostgreSQL.
``--conc`` workers in this process (grpc.aio) each run a closed loop of calls
on keys of their own: Get 45 %, BatchGet 5 %, Put 30 % (a third per
strategy), Invalidate 10 %, and AcquireLock + ReleaseLock on four lock names
shared by all workers 10 % (ABORTED after a 100 ms wait is a normal answer
there, not an error). Every Put writes a distinct value.

At known times Redis is killed (SIGKILL) and restarted after ``outage``
seconds, and later PostgreSQL the same way. Each outage window runs from the
kill to the restart's completion plus a grace period: calls that overlap a
window may fail; a call that started and ended outside every window must not.

Figures (``RESULT`` lines):

* ``errors_outside_outages``: failed calls that started and ended outside the
  windows (target 0);
* ``lost_acknowledged_writes``: keys whose PostgreSQL row, once the
  write-behind queue has drained, is neither the last acknowledged Put's value
  (at its version or later) nor a value whose Put failed after it (a failed
  call may still have been applied) (target 0);
* ``rss_growth_mb``: the server's resident memory at the end of the load
  minus after the warm-up;
* also ``stale_reads_after``: keys whose Get, after the drain and one outbox
  interval, differs from PostgreSQL; ``dead_letters``: write-behind entries
  moved to the dead-letter stream, acknowledged writes that never reached
  PostgreSQL (``lost_acknowledged_writes`` counts one only if it was its
  key's last acknowledged write); call counts.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
import psutil
import psycopg

from bench.harness import Options
from bench.loadgen import use_uvloop
from bench.messages import value as payload_of
from bench.stack import ROOT, Stack
from bench.write_behind import Queues
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2_grpc as pb_grpc
from local_servers import PostgresServer, RedisServer

if TYPE_CHECKING:  # the async stub class exists only in the type stubs
    from cachecoord_client.proto.cachecoord.v1.cachecoord_pb2_grpc import (
        CacheCoordServiceAsyncStub as Stub,
    )

T = TypeVar("T")

ASIDE, THROUGH, BEHIND = "soak-aside", "soak-through", "soak-behind"
STRATEGIES = {ASIDE: "cache-aside", THROUGH: "write-through", BEHIND: "write-behind"}
PARTITIONS = 4
NAMESPACES = f"""
[namespaces.{ASIDE}]
kind = "managed"
strategy = "cache-aside"
ttl = "30s"

[namespaces.{THROUGH}]
kind = "managed"
strategy = "write-through"
ttl = "30s"

[namespaces.{BEHIND}]
kind = "managed"
strategy = "write-behind"
ttl = "30s"
partitions = {PARTITIONS}
"""

KEYS_PER_WORKER = 8  # per namespace
LOCKS = 4
CALL_TIMEOUT = 5.0
SAMPLE_EVERY = 5.0  # seconds between RSS samples
DRAIN_TIMEOUT = 120.0
OPS = ["get"] * 45 + ["batch_get"] * 5 + ["put"] * 30 + ["invalidate"] * 10 + ["lock"] * 10


@dataclass(frozen=True, slots=True)
class Call:
    op: str
    started: float
    ended: float
    code: grpc.StatusCode


@dataclass
class KeyHistory:
    """What the (only) writer of one key knows about it."""

    acked: bytes | None = None
    acked_version: int = 0
    failed: list[bytes] = field(default_factory=list)
    """Values whose Put failed after the last acknowledged one: each may or
    may not have been applied."""


@dataclass(frozen=True, slots=True)
class Window:
    """One outage: from the kill to the restart's completion, plus grace."""

    what: str
    killed: float
    restarted: float
    grace: float

    @property
    def until(self) -> float:
        return self.restarted + self.grace

    def overlaps(self, call: Call) -> bool:
        return call.ended >= self.killed and call.started <= self.until


@dataclass
class Plan:
    """When things happen, in seconds from the start of the load."""

    seconds: float
    warmup: float
    outage: float
    grace: float
    redis_kill: float
    postgres_kill: float

    @classmethod
    def for_duration(cls, seconds: float) -> Plan:
        return cls(
            seconds=seconds,
            warmup=max(2.0, 0.1 * seconds),
            outage=max(1.5, 0.05 * seconds),
            grace=max(3.0, 0.1 * seconds),
            redis_kill=0.25 * seconds,
            postgres_kill=0.6 * seconds,
        )


@dataclass
class Soak:
    """The load, its record, and the outages."""

    stack: Stack
    plan: Plan
    workers: int
    payload: int
    calls: list[Call] = field(default_factory=list)
    keys: dict[tuple[str, str], KeyHistory] = field(default_factory=dict)
    windows: list[Window] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since start, MB) samples of the server's RSS."""
    rss_after_warmup: float = 0.0
    rss_at_end: float = 0.0
    _tag: int = 0
    started: float = 0.0
    """time.monotonic() when the load began."""

    async def run(self) -> None:
        stop = asyncio.Event()
        async with grpc.aio.insecure_channel(self.stack.target) as channel:
            stub = pb_grpc.CacheCoordServiceStub(channel)
            self.started = time.monotonic()
            load = [asyncio.create_task(self._worker(stub, w, stop)) for w in range(self.workers)]
            try:
                await asyncio.gather(self._chaos(), self._sample_rss())
            finally:
                stop.set()
                await asyncio.gather(*load)

    # -- the load ------------------------------------------------------------

    async def _worker(self, stub: Stub, w: int, stop: asyncio.Event) -> None:
        rng = random.Random(w)
        own = [f"w{w}-{j}" for j in range(KEYS_PER_WORKER)]
        while not stop.is_set():
            op = rng.choice(OPS)
            namespace = rng.choice(list(STRATEGIES))
            key = rng.choice(own)
            if op == "get":
                get = pb.GetRequest(namespace=namespace, key=key)
                await self._call(op, stub.Get(get, timeout=CALL_TIMEOUT))
            elif op == "batch_get":
                batch = pb.BatchGetRequest(namespace=namespace, keys=rng.sample(own, 4))
                await self._call(op, stub.BatchGet(batch, timeout=CALL_TIMEOUT))
            elif op == "invalidate":
                drop = pb.InvalidateRequest(namespace=namespace, keys=[key])
                await self._call(op, stub.Invalidate(drop, timeout=CALL_TIMEOUT))
            elif op == "put":
                await self._put(stub, namespace, key)
            else:
                await self._lock(stub, f"soak-lock-{rng.randrange(LOCKS)}")

    async def _put(self, stub: Stub, namespace: str, key: str) -> None:
        self._tag += 1
        data = payload_of(self.payload, self._tag)
        history = self.keys.setdefault((namespace, key), KeyHistory())
        request = pb.PutRequest(namespace=namespace, key=key, value=data)
        _, reply = await self._call(
            f"put {STRATEGIES[namespace]}", stub.Put(request, timeout=CALL_TIMEOUT)
        )
        if reply is not None:
            history.acked, history.acked_version = data, reply.version
            history.failed.clear()  # each came before the acknowledged one
        else:
            history.failed.append(data)

    async def _lock(self, stub: Stub, name: str) -> None:
        request = pb.AcquireLockRequest(name=name, ttl_ms=2_000, wait_timeout_ms=100)
        _, reply = await self._call(
            "lock",
            stub.AcquireLock(request, timeout=CALL_TIMEOUT),
            fine=frozenset({grpc.StatusCode.ABORTED}),
        )
        if reply is not None:
            release = pb.ReleaseLockRequest(name=name, token=reply.token)
            await self._call("unlock", stub.ReleaseLock(release, timeout=CALL_TIMEOUT))

    async def _call(
        self, op: str, call: Awaitable[T], fine: frozenset[grpc.StatusCode] = frozenset()
    ) -> tuple[grpc.StatusCode, T | None]:
        """Await *call*, record it; its status (OK too for a *fine* one) and reply."""
        started = time.monotonic()
        reply: T | None = None
        try:
            reply = await call
        except grpc.aio.AioRpcError as err:
            code = grpc.StatusCode.OK if err.code() in fine else err.code()
        else:
            code = grpc.StatusCode.OK
        self.calls.append(Call(op, started, time.monotonic(), code))
        return code, reply

    # -- outages and samples --------------------------------------------------

    async def _chaos(self) -> None:
        plan = self.plan
        await self._until(plan.redis_kill)
        await self._outage("redis", self.stack.redis, self.stack.redis.start)
        await self._until(plan.postgres_kill)
        await self._outage("postgres", self.stack.postgres, self._start_postgres)
        await self._until(plan.seconds)

    async def _outage(
        self, what: str, server: RedisServer | PostgresServer, start: Callable[[], None]
    ) -> None:
        killed = time.monotonic()
        victims = _tree(server.pid)
        try:
            await asyncio.to_thread(server.kill)
        except RuntimeError as err:
            # SIGKILL was sent, but local_servers waits only 10 s for the
            # processes to go: on a disk saturated by other work, processes
            # stuck in an fsync take longer. Wait for them a while more.
            print(f"  {what}: {err}; waiting longer", flush=True)
            deadline = time.monotonic() + 60
            while any(map(_running, victims)):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        print(f"  {killed - self.started:5.1f} s: {what} killed", flush=True)
        await asyncio.sleep(self.plan.outage)
        await asyncio.to_thread(start)
        restarted = time.monotonic()
        print(
            f"  {restarted - self.started:5.1f} s: {what} restarted and answering "
            f"(grace until {restarted + self.plan.grace - self.started:.1f} s)",
            flush=True,
        )
        self.windows.append(Window(what, killed, restarted, self.plan.grace))

    def _start_postgres(self) -> None:
        """Start PostgreSQL again from a helper process.

        Not from this one: PostgresServer.start forks to switch to the
        ``postgres`` user (no vfork then), and a fork while this process's
        gRPC calls are in flight runs gRPC's fork handlers half-way: the child
        dies of SIGSEGV in gRPC's event_engine thread before it can exec
        postgres (seen in most runs under load). A plain subprocess is
        vfork-ed, which runs no fork handlers; the helper has no gRPC.
        """
        postgres = self.stack.postgres
        helper = subprocess.run(
            [sys.executable, "-c", _START_POSTGRES, str(postgres.dir), str(postgres.port)],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT / "scripts")},
        )
        if helper.returncode != 0:
            raise RuntimeError(f"restarting PostgreSQL failed:\n{helper.stderr[-2000:]}")

    async def _sample_rss(self) -> None:
        server = psutil.Process(self.stack.pid)
        await self._until(self.plan.warmup)
        self.rss_after_warmup = _mb(server)
        self.rss.append((self.plan.warmup, self.rss_after_warmup))
        while self.plan.seconds - self._elapsed() > 1.5 * SAMPLE_EVERY:
            await asyncio.sleep(SAMPLE_EVERY)
            self.rss.append((self._elapsed(), _mb(server)))
        await self._until(self.plan.seconds)
        self.rss_at_end = _mb(server)
        self.rss.append((self._elapsed(), self.rss_at_end))

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    async def _until(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - self._elapsed()))

    # -- afterwards -------------------------------------------------------------

    def outside(self) -> list[Call]:
        return [c for c in self.calls if not any(w.overlaps(c) for w in self.windows)]

    def lost(self, rows: dict[tuple[str, str], tuple[bytes, int]]) -> dict[tuple[str, str], str]:
        lost = {}
        for where, history in self.keys.items():
            if history.acked is None:
                continue
            value, version = rows.get(where, (b"<no row>", 0))
            if value != history.acked and value not in history.failed:
                lost[where] = f"acknowledged {history.acked[:16]!r}, PostgreSQL has {value[:16]!r}"
            elif version < history.acked_version:
                lost[where] = f"acknowledged v{history.acked_version}, PostgreSQL has v{version}"
        return lost


# Detached: the server outlives the helper; stack.postgres finds its pid in
# postmaster.pid, so it stops it as usual at the end.
_START_POSTGRES = """
import sys
from pathlib import Path
from local_servers import PostgresServer
PostgresServer(Path(sys.argv[1]), port=int(sys.argv[2]), detach=True).start()
"""


def _tree(pid: int | None) -> list[int]:
    """*pid* and its descendants (PostgreSQL's backends), as they are now."""
    if pid is None:
        return []
    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return [pid]


def _running(pid: int) -> bool:
    """Whether *pid* is a process that has not exited (a zombie has)."""
    try:
        status: str = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return False
    return status != str(psutil.STATUS_ZOMBIE)


def _mb(process: psutil.Process) -> float:
    return float(process.memory_info().rss) / 2**20


def stored_rows(dsn: str) -> dict[tuple[str, str], tuple[bytes, int]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT e.namespace, e.key, e.value, v.version FROM cachecoord.entries e "
            "JOIN cachecoord.versions v USING (namespace, key) WHERE e.namespace = ANY(%s)",
            (list(STRATEGIES),),
        ).fetchall()
    return {(ns, key): (bytes(value), int(version)) for ns, key, value, version in rows}


async def stale_reads(target: str, rows: dict[tuple[str, str], tuple[bytes, int]]) -> int:
    """Keys whose Get differs from what PostgreSQL holds."""
    stale = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.CacheCoordServiceStub(channel)
        for (namespace, key), (value, version) in rows.items():
            request = pb.GetRequest(namespace=namespace, key=key)
            for attempt in range(3):  # a machine busy with other work can miss a deadline
                try:
                    got = await stub.Get(request, timeout=10)
                    break
                except grpc.aio.AioRpcError:
                    if attempt == 2:
                        raise
            stale += (got.found, got.value, got.version) != (True, value, version)
    return stale


def run(options: Options) -> None:
    seconds = options.seconds or (15.0 if options.quick else 60.0)
    plan = Plan.for_duration(seconds)
    use_uvloop()
    workdir = Path(tempfile.mkdtemp(prefix="cachecoord-soak-"))
    failed = True
    stack = Stack(workdir, NAMESPACES, appendonly=True)
    try:
        with stack:
            print(
                f"stack up: cachecoord pid {stack.pid} on {stack.target}, Redis AOF "
                f"appendfsync always; {options.concurrency} workers, {options.payload} B "
                f"values, {seconds:.0f} s (warm-up {plan.warmup:.0f} s; Redis killed at "
                f"{plan.redis_kill:.0f} s, PostgreSQL at {plan.postgres_kill:.0f} s, each "
                f"down {plan.outage:.1f} s, grace {plan.grace:.0f} s after its restart); "
                f"work directory {workdir}",
                flush=True,
            )
            soak = Soak(stack, plan, options.concurrency, options.payload)
            asyncio.run(soak.run())
            stack.check_alive()
            drain_started = time.monotonic()
            queues = Queues(stack.redis.url, BEHIND, PARTITIONS)
            try:
                queues.wait_drained(DRAIN_TIMEOUT)
                dead = queues.dead_letters()
            finally:
                queues.close()
            drained = time.monotonic() - drain_started
            time.sleep(2.0)  # one outbox interval (1 s) and then some
            rows = stored_rows(stack.postgres.dsn)
            stale = asyncio.run(stale_reads(stack.target, rows))
            stack.check_alive()
            _report(soak, rows, stale, dead, drained)
        failed = False
    finally:
        if failed or options.keep:
            print(f"bench: work directory kept: {workdir} (cachecoord.log is there)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _report(
    soak: Soak,
    rows: dict[tuple[str, str], tuple[bytes, int]],
    stale: int,
    dead: int,
    drained: float,
) -> None:
    calls = soak.calls
    outside = soak.outside()
    errors_outside = [c for c in outside if c.code is not grpc.StatusCode.OK]
    errors_inside = sum(c.code is not grpc.StatusCode.OK for c in calls) - len(errors_outside)
    lost = soak.lost(rows)
    acked = sum(1 for c in calls if c.op.startswith("put") and c.code is grpc.StatusCode.OK)
    print("\n== soak ==")
    for window in soak.windows:
        during = [c for c in calls if window.overlaps(c)]
        failed = Counter(
            f"{c.op} {c.code.name}" for c in during if c.code is not grpc.StatusCode.OK
        )
        print(
            f"{window.what} outage: killed at {window.killed - soak.started:.1f} s, back at "
            f"{window.restarted - soak.started:.1f} s, grace to "
            f"{window.until - soak.started:.1f} s; {len(during)} calls overlapped it, "
            f"failed: {dict(failed) or 'none'}"
        )
    by_op = Counter(c.op for c in calls)
    failed_by_op = Counter(c.op for c in calls if c.code is not grpc.StatusCode.OK)
    for op, count in sorted(by_op.items()):
        print(f"  {op:<20} {count:>8} calls, {failed_by_op[op]:>5} failed")
    if errors_outside:
        print("errors outside the outage windows:")
        for c in errors_outside[:10]:
            print(f"  {c.started - soak.started:7.2f} s {c.op}: {c.code.name}")
    for where, what in list(lost.items())[:10]:
        print(f"lost: {where}: {what}")
    growth = soak.rss_at_end - soak.rss_after_warmup
    samples = ", ".join(f"{t:.0f}s {mb:.1f}" for t, mb in soak.rss)
    print(f"server RSS (MB): {samples}")
    print(f"write-behind queue drained {drained:.1f} s after the load stopped")
    print(
        f"latency of successful calls outside the windows: p50 "
        f"{_percentile(outside, 0.5):.1f} ms, p99 {_percentile(outside, 0.99):.1f} ms"
    )
    print()
    duration = soak.plan.seconds
    results = {
        "errors_outside_outages": len(errors_outside),
        "lost_acknowledged_writes": len(lost),
        "rss_growth_mb": round(growth, 1),
        "errors_inside_outages": errors_inside,
        "calls": len(calls),
        "calls_per_s": round(len(calls) / duration, 1),
        "acknowledged_puts": acked,
        "keys_checked": sum(1 for h in soak.keys.values() if h.acked is not None),
        "stale_reads_after": stale,
        "dead_letters": dead,
    }
    for name, value in results.items():
        print(f"RESULT {name}={value}")


def _percentile(calls: list[Call], q: float) -> float:
    ok = sorted(1000 * (c.ended - c.started) for c in calls if c.code is grpc.StatusCode.OK)
    if not ok:
        return float("nan")
    if len(ok) == 1:
        return ok[0]
    return statistics.quantiles(ok, n=1000, method="inclusive")[min(998, round(q * 1000) - 1)]
