"""A history checker: no read answers older than the documented bound allows.

Four cachecoord instances, three in this process and one ``cachecoord
serve`` process, serve one namespace per strategy, all with near caches,
over one Redis (or a Redis Cluster) and one PostgreSQL. Concurrently, for a
given time:

* writers Put through random instances (every Put writes a distinct value);
* a program updates the mapped ``users`` table directly in SQL (change
  triggers installed), as another application would;
* readers Get and BatchGet through every instance, and through a
  ``LocalCache`` on every instance;
* an invalidator Invalidates random keys;
* faults, at set moments: loads that PostgreSQL makes slow (``pg_sleep`` on
  the load's connection after its read, so that other reads join it late),
  every pub/sub connection cut (``CLIENT KILL TYPE pubsub``), Redis frozen
  (SIGSTOP, then SIGCONT) when its process is ours, and the ``cachecoord
  serve`` instance killed (SIGKILL; its calls in flight fail, the others go
  on through the three left).

Everything runs in one event loop, so the moments recorded are ordered
exactly: a write's *acknowledgement* is recorded when its answer has reached
the writer, a read's *start* before its request is sent, an event's arrival
when the watcher has it. Each read is then checked against the history
(docs/guarantees.md section 2 states these bounds):

* **every path**: a read that starts after a Put was acknowledged, on any
  instance, answers that Put's version or a later one: Redis, PostgreSQL,
  a shared load;
* **near cache** (``layer NEAR``): on the instance that wrote, the same; on
  another instance, once the write's event has reached that instance, and in
  any case within ``near_cache_ttl`` of the acknowledgement;
* **LocalCache** memory: once the write's event has reached that LocalCache,
  and in any case within ``max_age + near_cache_ttl``;
* **event rule**: a read through an instance that starts after that
  instance's Watch stream delivered the event of a version (or after its
  LocalCache received it) answers that version or a later one. No slack;
* **direct SQL writes**: the same, counted from the moment the trigger's
  outbox row can have been drained: ``outbox_interval`` plus a margin after
  the commit;
* **Redis outage**: a write acknowledged while Redis was frozen (or its
  breaker open just after) leaves its cache update to the outbox drainer,
  which applies it after the outbox grace and ``outbox_interval`` once Redis
  is back: its bound counts from then.

A read that answers ``stale = true`` is counted but not checked (it says so
itself). The report gives, per path, the reads checked, those beyond their
bound, and the worst staleness seen (the time since the oldest acknowledged
write that the read did not reflect, within bound or not).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import random
import signal
import socket
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import psycopg
import redis.asyncio as aioredis

from cachecoord.app import App, change_triggers
from cachecoord.config import Settings, load
from cachecoord_client import (
    AsyncClient,
    CacheCoordError,
    LocalCache,
    Value,
    WatchEvent,
    WatchEventKind,
)

NEAR_TTL = 1.0
"""near_cache_ttl of every namespace, seconds."""
LOCAL_MAX_AGE = 1.0
"""max_age of the LocalCaches, seconds."""
OUTBOX_INTERVAL = 0.2
"""postgres.outbox_interval, seconds."""
SQL_BOUND = OUTBOX_INTERVAL + 1.5
"""A direct SQL change reaches Redis on its NOTIFY, or at the drainer's next
round: within outbox_interval, plus this margin for a busy machine (the
exact check of these reads is the event rule)."""
OUTAGE_BOUND = 2.0 + OUTBOX_INTERVAL + 1.5
"""After Redis is back, a write it missed is applied by the drainer once its
outbox row is older than the grace period (2 s), at its next round."""
OUTAGE_TAIL = 2.0
"""How long after a Redis freeze writes still count as made during it (the
circuit breaker stays open for its cool-down, 1 s, after the last failure)."""
SLOW_LOAD = 0.15
"""Seconds PostgreSQL sleeps after the read of a slow key's load."""

USERS_BASE = 700_000
"""Ids of the ``users`` rows the checker writes (its own)."""

MANAGED = ("h_aside", "h_through", "h_behind", "h_version")
MAPPED = "h_users"
NAMESPACES = (*MANAGED, MAPPED)

NAMESPACES_TOML = f"""
[namespaces.h_aside]
kind = "managed"
strategy = "cache-aside"
ttl = "5m"
near_cache_entries = 1000
near_cache_ttl = "{int(NEAR_TTL * 1000)}ms"

[namespaces.h_through]
kind = "managed"
strategy = "write-through"
ttl = "5m"
near_cache_entries = 1000
near_cache_ttl = "{int(NEAR_TTL * 1000)}ms"

[namespaces.h_behind]
kind = "managed"
strategy = "write-behind"
ttl = "5m"
flush_interval = "50ms"
retry_after = "200ms"
claim_idle = "1s"
near_cache_entries = 1000
near_cache_ttl = "{int(NEAR_TTL * 1000)}ms"

[namespaces.h_version]
kind = "managed"
strategy = "cache-aside"
invalidation = "version"
ttl = "5m"
near_cache_entries = 1000
near_cache_ttl = "{int(NEAR_TTL * 1000)}ms"

[namespaces.h_users]
kind = "mapped"
table = "users"
key_column = "id"
strategy = "cache-aside"
ttl = "5m"
near_cache_entries = 1000
near_cache_ttl = "{int(NEAR_TTL * 1000)}ms"
"""

USERS_TABLE = """
CREATE TABLE IF NOT EXISTS users (
    id integer PRIMARY KEY,
    name text NOT NULL,
    email text UNIQUE,
    karma integer NOT NULL DEFAULT 0 CHECK (karma >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""


def settings(
    workdir: Path, redis_url: str, dsn: str, name: str, *, cluster: bool, observe: float = 0.0
) -> Settings:
    """An instance's settings, loaded from a TOML file as ``cachecoord serve`` would."""
    path = config_file(workdir, redis_url, dsn, name, listen="127.0.0.1:0")
    return load(path, _env(cluster, observe))


def _env(cluster: bool, observe: float = 0.0) -> dict[str, str]:
    """*observe*: the fraction of changes the consistency observer checks
    after CONSISTENCY_DELAY (0: off)."""
    env = {"CACHECOORD_REDIS_CLUSTER": "true"} if cluster else {}
    if observe:
        env["CACHECOORD_SERVER_CONSISTENCY_SAMPLE"] = str(observe)
        env["CACHECOORD_SERVER_CONSISTENCY_DELAY"] = f"{int(CONSISTENCY_DELAY * 1000)}ms"
    return env


CONSISTENCY_DELAY = 5.0
"""Past every bound of the run's paths (the outbox's grace and interval, a
Redis freeze): an older layer then is a violation."""


def config_file(workdir: Path, redis_url: str, dsn: str, name: str, *, listen: str) -> Path:
    """The TOML file of an instance."""
    path = workdir / f"history-{name}-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(
        f"""
[server]
listen = "{listen}"
instance_id = "{name}"
shutdown_grace = "1s"

[redis]
url = "{redis_url}"

[postgres]
url = "{dsn}"
outbox_interval = "{int(OUTBOX_INTERVAL * 1000)}ms"
{NAMESPACES_TOML}
"""
    )
    return path


class ServeProcess:
    """An instance as a ``cachecoord serve`` process, so that it can be killed."""

    def __init__(
        self, workdir: Path, redis_url: str, dsn: str, name: str, *, cluster: bool, observe: float
    ) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._config = config_file(workdir, redis_url, dsn, name, listen=f"127.0.0.1:{self.port}")
        self._log = workdir / f"{name}.log"
        self._env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CACHECOORD_")},
            **_env(cluster, observe),
        }
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self, client: AsyncClient) -> None:
        """Start it and wait (30 s) until *client* (of its port) gets an answer."""
        with self._log.open("ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "cachecoord",
                "serve",
                "--config",
                str(self._config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=self._env,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                await client.get(MANAGED[0], "k0", timeout=1)
                return
            except CacheCoordError:
                if self._proc.returncode is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"cachecoord serve did not start:\n{self._log.read_text()[-2000:]}"
                    ) from None
                await asyncio.sleep(0.1)

    async def kill(self) -> None:
        """SIGKILL: nothing of it runs any more, nothing is cleaned up."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 10)
            except TimeoutError:
                await self.kill()


# -- the history ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Write:
    namespace: str
    key: str
    version: int
    acked: float
    instance: int  # -1: a direct SQL change
    effective: float
    """When its bound starts: *acked*, or for a write made during a Redis
    outage, when the drainer can have applied it."""


@dataclass(frozen=True, slots=True)
class Read:
    namespace: str
    key: str
    version: int  # 0: not found (every key exists: that is never right)
    began: float
    instance: int
    path: str  # "redis", "database", "near", "local-memory", "not-found"
    stale: bool
    min_version: int = 0  # read-your-writes: asked for at least this version


@dataclass
class PathReport:
    checked: int = 0
    beyond_bound: int = 0
    worst_staleness_ms: float = 0.0


@dataclass
class Report:
    paths: dict[str, PathReport] = field(default_factory=lambda: defaultdict(PathReport))
    violations: list[str] = field(default_factory=list)
    writes: int = 0
    sql_writes: int = 0
    flagged_stale: int = 0
    errors: int = 0
    server_errors: list[str] = field(default_factory=list)
    """Calls answered INTERNAL or UNKNOWN: a server bug, whatever the fault."""
    deadlocks: int = 0
    """Direct SQL updates PostgreSQL cancelled in a deadlock with a Put."""
    events: int = 0
    faults: list[str] = field(default_factory=list)

    @property
    def checked(self) -> int:
        return sum(p.checked for p in self.paths.values())

    @property
    def beyond_bound(self) -> int:
        return sum(p.beyond_bound for p in self.paths.values())

    @property
    def worst_staleness_ms(self) -> float:
        return max((p.worst_staleness_ms for p in self.paths.values()), default=0.0)

    def result_lines(self) -> list[str]:
        """``RESULT name=value`` lines: totals, then per path."""
        lines = [
            f"RESULT stale_reads_beyond_bound={self.beyond_bound}",
            f"RESULT reads_checked={self.checked}",
            f"RESULT worst_staleness_ms={self.worst_staleness_ms:.1f}",
            f"RESULT internal_errors={len(self.server_errors)}",
        ]
        for path in sorted(self.paths):
            report = self.paths[path]
            name = path.replace("-", "_")
            lines += [
                f"RESULT stale_reads_beyond_bound_{name}={report.beyond_bound}",
                f"RESULT reads_checked_{name}={report.checked}",
                f"RESULT worst_staleness_ms_{name}={report.worst_staleness_ms:.1f}",
            ]
        return lines

    def summary(self) -> str:
        return (
            f"{self.checked} reads checked ({self.flagged_stale} flagged stale, not checked), "
            f"{self.writes} Puts and {self.sql_writes} SQL updates acknowledged, "
            f"{self.events} events, {self.errors} failed calls ({len(self.server_errors)} "
            f"INTERNAL or UNKNOWN), {self.deadlocks} SQL updates "
            "cancelled by a deadlock with a Put; faults: "
            f"{', '.join(self.faults) or 'none'}; {self.beyond_bound} reads beyond their bound"
        )


class History:
    """What happened: acknowledged writes, reads, and event arrivals."""

    def __init__(self) -> None:
        self.writes: list[Write] = []
        self.reads: list[Read] = []
        # (instance, or 100 + instance for its LocalCache) -> key -> [(arrival, version)]
        self.events: defaultdict[int, defaultdict[tuple[str, str], list[tuple[float, int]]]] = (
            defaultdict(lambda: defaultdict(list))
        )
        self.outages: list[tuple[float, float]] = []  # (frozen at, back at)
        self.faults: list[str] = []
        self.errors = 0
        self.server_errors: list[str] = []  # INTERNAL or UNKNOWN: a bug, whatever the fault
        self.deadlocks = 0
        self.event_count = 0
        self.newest: dict[tuple[str, str], int] = {}
        """The newest acknowledged version of each key so far."""

    def wrote(self, namespace: str, key: str, version: int, instance: int) -> None:
        acked = time.monotonic()
        self.writes.append(Write(namespace, key, version, acked, instance, acked))
        self.newest[(namespace, key)] = max(version, self.newest.get((namespace, key), 0))

    def read(
        self,
        namespace: str,
        key: str,
        value: Any,
        began: float,
        instance: int,
        min_version: int = 0,
    ) -> None:
        path = str(value.layer) if value.found else "not-found"
        version = value.version if value.found else 0
        self.reads.append(
            Read(namespace, key, version, began, instance, path, value.stale, min_version)
        )

    def local_read(
        self, namespace: str, key: str, value: Value, began: float, instance: int, memory: bool
    ) -> None:
        if not memory:
            self.read(namespace, key, value, began, instance)
            return
        version = value.version if value.found else 0
        self.reads.append(
            Read(namespace, key, version, began, 100 + instance, "local-memory", value.stale)
        )

    def event(self, watcher: int, event: WatchEvent) -> None:
        if event.kind is not WatchEventKind.INVALIDATION or event.all_keys or event.version <= 0:
            return
        self.event_count += 1
        self.events[watcher][(event.namespace, event.key)].append((time.monotonic(), event.version))

    # -- checking ----------------------------------------------------------------

    def check(self) -> Report:
        report = Report(
            errors=self.errors,
            server_errors=list(self.server_errors),
            events=self.event_count,
            deadlocks=self.deadlocks,
        )
        by_key: defaultdict[tuple[str, str], list[Write]] = defaultdict(list)
        for write in self.writes:
            if write.instance >= 0:
                report.writes += 1
            else:
                report.sql_writes += 1
            effective = write.acked + (SQL_BOUND if write.instance < 0 else 0.0)
            for frozen, back in self.outages:
                if frozen <= write.acked <= back + OUTAGE_TAIL:
                    effective = max(effective, back + OUTAGE_TAIL + OUTAGE_BOUND)
            by_key[(write.namespace, write.key)].append(replace(write, effective=effective))
        indexed = {key: _Index(writes) for key, writes in by_key.items()}
        arrivals = {
            watcher: {key: _Arrivals(times) for key, times in keys.items()}
            for watcher, keys in self.events.items()
        }
        for read in self.reads:
            if read.stale:
                report.flagged_stale += 1
                continue
            key = (read.namespace, read.key)
            path = report.paths[read.path]
            path.checked += 1
            index = indexed.get(key)
            required, why = 0, ""
            if index is not None:
                required, why = index.required(read)
                path.worst_staleness_ms = max(path.worst_staleness_ms, index.staleness_ms(read))
            watcher = read.instance
            seen = arrivals.get(watcher, {}).get(key)
            if seen is not None:
                event_version = seen.newest_before(read.began)
                if event_version > required:
                    required, why = event_version, "its event had arrived"
            if read.min_version > required:
                required, why = read.min_version, "it asked for min_version (read-your-writes)"
            if read.version < required:
                path.beyond_bound += 1
                if len(report.violations) < 20:
                    report.violations.append(
                        f"{read.path} read of {key} on instance {read.instance} answered "
                        f"v{read.version}; v{required} was due ({why})"
                    )
        report.faults = list(self.faults)
        return report


class _Index:
    """One key's acknowledged writes, for the required-version queries."""

    def __init__(self, writes: list[Write]) -> None:
        self.writes = sorted(writes, key=lambda w: w.effective)
        self.effective = [w.effective for w in self.writes]
        self.prefix_max: list[int] = []
        newest = 0
        for write in self.writes:
            newest = max(newest, write.version)
            self.prefix_max.append(newest)
        by_ack = sorted(writes, key=lambda w: w.acked)
        self.acked = [w.acked for w in by_ack]
        self.ack_prefix_max: list[int] = []
        newest = 0
        for write in by_ack:
            newest = max(newest, write.version)
            self.ack_prefix_max.append(newest)

    def required(self, read: Read) -> tuple[int, str]:
        """The lowest version *read* may answer, and why."""
        slack = _slack(read.path)
        # Every write whose bound, whatever the read's instance, has passed.
        position = bisect.bisect_right(self.effective, read.began - slack)
        required = self.prefix_max[position - 1] if position else 0
        why = f"acknowledged more than {slack * 1000:.0f} ms before"
        # Writes closer than that: only where the bound is shorter.
        if read.path == "near":
            for write in self.writes[position:]:
                if write.effective > read.began:
                    break
                if write.instance == read.instance and write.version > required:
                    required, why = write.version, "written through this instance before"
        return required, why

    def staleness_ms(self, read: Read) -> float:
        """How long before the read began the oldest acknowledged write it
        does not reflect was acknowledged (0: it reflects them all)."""
        position = bisect.bisect_right(self.acked, read.began)
        # The first write, in acknowledgement order, newer than the answer.
        first = bisect.bisect_right(self.ack_prefix_max, read.version)
        if first >= position:
            return 0.0
        return (read.began - self.acked[first]) * 1000


def _slack(path: str) -> float:
    """The bound of a path, for writes through another instance."""
    if path == "near":
        return NEAR_TTL
    if path == "local-memory":
        return LOCAL_MAX_AGE + NEAR_TTL
    return 0.0


class _Arrivals:
    def __init__(self, times: list[tuple[float, int]]) -> None:
        self.times = [t for t, _ in times]
        self.prefix_max: list[int] = []
        newest = 0
        for _, version in times:
            newest = max(newest, version)
            self.prefix_max.append(newest)

    def newest_before(self, moment: float) -> int:
        position = bisect.bisect_left(self.times, moment)
        return self.prefix_max[position - 1] if position else 0


class RecordingLocalCache(LocalCache):
    """A LocalCache that tells the history when its events arrive and which
    reads it answered from memory."""

    def __init__(self, history: History, instance: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._history = history
        self._instance = instance

    def _apply(self, event: WatchEvent) -> None:
        super()._apply(event)
        self._history.event(100 + self._instance, event)

    def held(self, namespace: str, key: str) -> bool:
        """Whether a get of *key* now would be answered from memory."""
        return self._memory.holds((namespace, key))


# -- the run -------------------------------------------------------------------


@dataclass(frozen=True)
class Faults:
    slow_loads: bool = True
    cut_pubsub_at: tuple[float, ...] = (0.3,)
    """Fractions of the run at which every pub/sub connection is cut."""
    freeze_redis_at: tuple[float, ...] = (0.55,)
    """Fractions of the run at which Redis is frozen (needs *redis_pid*)."""
    freeze_seconds: float = 1.5
    redis_pid: int | None = None
    kill_at: float | None = 0.75
    """Fraction of the run at which the ``cachecoord serve`` instance is SIGKILLed."""


@dataclass
class Workload:
    keys: int = 6
    writers: int = 4
    sql_writers: int = 1
    readers: int = 6  # per instance: Get/BatchGet loops
    local_readers: int = 2  # per instance, through its LocalCache
    instances: int = 3  # in this process (slow loads apply to these)
    processes: int = 1  # more, as ``cachecoord serve`` processes (one can be killed)
    observe: float = 0.0  # the consistency observer's sample (0: off)


def _keys(namespace: str, count: int) -> list[str]:
    if namespace == MAPPED:
        return [str(USERS_BASE + i) for i in range(count)]
    return [f"k{i}" for i in range(count)]


def _slow_key(namespace: str) -> str:
    return _keys(namespace, 1)[0]


async def prepare_database(dsn: str, count: int) -> None:
    """The users rows of the checker (present before any instance starts)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(USERS_TABLE)
        for key in _keys(MAPPED, count):
            await conn.execute(
                "INSERT INTO users (id, name) VALUES (%s, 'initial') ON CONFLICT (id) DO NOTHING",
                (int(key),),
            )


class _SlowTable:
    """A namespace's table whose loads of one key are slow inside PostgreSQL:
    the load's connection sleeps right after its read, so the read's snapshot
    is old by the time the load ends, and other reads can join it late."""

    def __init__(self, table: Any, slow: str) -> None:
        self._table = table
        self._slow = slow

    def __getattr__(self, name: str) -> Any:
        return getattr(self._table, name)

    async def load(self, conn: Any, keys: Sequence[str]) -> Any:
        rows = await self._table.load(conn, keys)
        if self._slow in keys:
            await conn.execute("SELECT pg_sleep(%s)", (SLOW_LOAD,))
        return rows


def _slow_loads(app: App) -> None:
    """Slow loads of each namespace's first key, on *app*'s reads."""
    assert app.cache is not None
    for namespace in NAMESPACES:
        reader = app.cache.strategy(namespace).reader
        reader.table = _SlowTable(reader.table, _slow_key(namespace))


async def run_history(
    workdir: Path,
    redis_urls: Sequence[str],
    dsn: str,
    seconds: float,
    *,
    cluster: bool = False,
    faults: Faults | None = None,
    workload: Workload | None = None,
    seed: int | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Report:
    """Run the mixed load for *seconds* and check every read; see the module docstring."""
    faults = faults or Faults()
    workload = workload or Workload()
    rng = random.Random(seed)
    history = History()
    await prepare_database(dsn, workload.keys)
    apps: list[App] = []
    processes: list[ServeProcess] = []
    clients: list[AsyncClient] = []
    alive: list[bool] = []
    locals_: list[RecordingLocalCache] = []
    tasks: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    try:
        for number in range(workload.instances):
            name = f"history-{number}"
            app = App(
                settings(
                    workdir, redis_urls[0], dsn, name, cluster=cluster, observe=workload.observe
                )
            )
            await app.start()
            apps.append(app)
            clients.append(AsyncClient(f"127.0.0.1:{app.port}"))
            alive.append(True)
            if faults.slow_loads:
                _slow_loads(app)
        await change_triggers(apps[0].settings, MAPPED, "install")
        for _ in range(workload.processes):
            name = f"history-{len(clients)}"
            process = ServeProcess(
                workdir, redis_urls[0], dsn, name, cluster=cluster, observe=workload.observe
            )
            processes.append(process)
            clients.append(AsyncClient(f"127.0.0.1:{process.port}"))
            alive.append(True)
            await process.start(clients[-1])

        def live() -> list[int]:
            return [number for number, up in enumerate(alive) if up]

        keys = {namespace: _keys(namespace, workload.keys) for namespace in NAMESPACES}
        for namespace in MANAGED:  # every key exists before the run
            for key in keys[namespace]:
                version = await clients[0].put(namespace, key, b"initial")
                history.wrote(namespace, key, version, 0)
        for number, client in enumerate(clients):
            local = RecordingLocalCache(
                history, number, client, namespaces=NAMESPACES, max_age=LOCAL_MAX_AGE
            )
            await local.open()
            locals_.append(local)

        async def guarded(work: Callable[[], Awaitable[None]]) -> None:
            while not stop.is_set():
                try:
                    await work()
                except CacheCoordError as err:
                    history.errors += 1
                    if err.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                        history.server_errors.append(str(err))
                    await asyncio.sleep(0.01)

        def spawn(work: Callable[[], Awaitable[None]]) -> None:
            tasks.append(asyncio.create_task(guarded(work)))

        counter = 0

        def value(namespace: str) -> bytes:
            nonlocal counter
            counter += 1
            if namespace == MAPPED:
                return json.dumps({"name": f"put-{counter}"}).encode()
            return f"v{counter}".encode()

        async def write() -> None:
            namespace = rng.choice(NAMESPACES)
            key = rng.choice(keys[namespace])
            number = rng.choice(live())
            version = await clients[number].put(namespace, key, value(namespace))
            history.wrote(namespace, key, version, number)
            await asyncio.sleep(rng.uniform(0, 0.01))

        async def read(number: int) -> None:
            if not alive[number]:
                await asyncio.sleep(0.1)
                return
            namespace = rng.choice(NAMESPACES)
            client = clients[number]
            if rng.random() < 0.15:
                chosen = rng.sample(keys[namespace], min(3, len(keys[namespace])))
                began = time.monotonic()
                for entry in await client.batch_get(namespace, chosen):
                    history.read(namespace, entry.key, entry, began, number)
            elif rng.random() < 0.3:  # read-your-writes: what any instance acknowledged
                key = rng.choice(keys[namespace])
                floor = history.newest.get((namespace, key), 0)
                began = time.monotonic()
                got = await client.get(namespace, key, min_version=floor)
                history.read(namespace, key, got, began, number, floor)
            else:
                key = rng.choice(keys[namespace])
                began = time.monotonic()
                history.read(namespace, key, await client.get(namespace, key), began, number)
            await asyncio.sleep(0)

        async def local_read(number: int) -> None:
            if not alive[number]:
                await asyncio.sleep(0.1)
                return
            namespace = rng.choice(NAMESPACES)
            key = rng.choice(keys[namespace])
            local = locals_[number]
            began = time.monotonic()
            memory = local.held(namespace, key)
            got = await local.get(namespace, key)
            history.local_read(namespace, key, got, began, number, memory)
            await asyncio.sleep(0)

        async def invalidate() -> None:
            namespace = rng.choice(NAMESPACES)
            key = rng.choice(keys[namespace])
            await clients[rng.choice(live())].invalidate(namespace, [key])
            await asyncio.sleep(rng.uniform(0.01, 0.05))

        async def watch(number: int) -> None:
            if not alive[number]:
                await asyncio.sleep(0.1)
                return
            async with clients[number].watch(NAMESPACES) as events:
                async for event in events:
                    history.event(number, event)

        async def sql_writer() -> None:
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                while not stop.is_set():
                    key = rng.choice(keys[MAPPED])
                    version = None
                    try:
                        async with conn.transaction():
                            cur = await conn.execute(
                                "UPDATE users SET name = %s WHERE id = %s",
                                (f"sql-{time.monotonic_ns()}", int(key)),
                            )
                            if cur.rowcount:
                                cur = await conn.execute(
                                    "SELECT version FROM cachecoord.versions "
                                    "WHERE namespace = %s AND key = %s",
                                    (MAPPED, key),
                                )
                                row = await cur.fetchone()
                                version = None if row is None else int(row[0])
                    except psycopg.errors.DeadlockDetected:
                        # Against a Put of the same row (it locks the version
                        # row first, the trigger last): PostgreSQL cancels one.
                        history.deadlocks += 1
                        continue
                    if version is not None:
                        history.wrote(MAPPED, key, version, -1)
                    await asyncio.sleep(rng.uniform(0.005, 0.03))

        tasks += [asyncio.create_task(guarded(partial(watch, n))) for n in range(len(clients))]
        await asyncio.sleep(0.2)  # the watch streams are open
        for _ in range(workload.writers):
            spawn(write)
        for _ in range(workload.sql_writers):
            tasks.append(asyncio.create_task(_quiet(sql_writer(), history)))
        for number in range(len(clients)):
            for _ in range(workload.readers):
                spawn(partial(read, number))
            for _ in range(workload.local_readers):
                spawn(partial(local_read, number))
        spawn(invalidate)

        async def kill() -> None:
            number = len(apps)  # the first process
            alive[number] = False
            await processes[0].kill()
            history.faults.append("a cachecoord serve instance SIGKILLed")

        await _faults(faults, redis_urls, seconds, history, log, kill if processes else None)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if faults.redis_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(faults.redis_pid, signal.SIGCONT)
        for local in locals_:
            await local.close()
        for client in clients:
            await client.close()
        for app in apps:
            await app.stop()
        for process in processes:
            await process.stop()
    return history.check()


async def _quiet(work: Awaitable[None], history: History) -> None:
    try:
        await work
    except psycopg.Error:
        history.errors += 1


async def _faults(
    faults: Faults,
    redis_urls: Sequence[str],
    seconds: float,
    history: History,
    log: Callable[[str], None],
    kill: Callable[[], Awaitable[None]] | None,
) -> None:
    """Wait out the run, causing the faults at their moments."""
    started = time.monotonic()
    plan: list[tuple[float, str]] = [(at, "cut") for at in faults.cut_pubsub_at]
    if faults.redis_pid is not None:
        plan += [(at, "freeze") for at in faults.freeze_redis_at]
    if faults.kill_at is not None and kill is not None:
        plan.append((faults.kill_at, "kill"))
    for at, what in sorted(plan):
        await asyncio.sleep(max(0.0, started + at * seconds - time.monotonic()))
        if what == "kill":
            assert kill is not None
            await kill()
            log("SIGKILLed the cachecoord serve instance")
        elif what == "cut":
            cut = 0
            for url in redis_urls:
                node = aioredis.Redis.from_url(url, protocol=2)
                try:
                    cut += int(await node.client_kill_filter(_type="pubsub"))
                finally:
                    await node.aclose()
            history.faults.append(f"{cut} pub/sub connections cut")
            log(f"cut {cut} pub/sub connections")
        else:
            assert faults.redis_pid is not None
            frozen = time.monotonic()
            os.kill(faults.redis_pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(faults.freeze_seconds)
            finally:
                os.kill(faults.redis_pid, signal.SIGCONT)
            history.outages.append((frozen, time.monotonic()))
            history.faults.append(f"Redis frozen for {faults.freeze_seconds} s")
            log(f"Redis frozen for {faults.freeze_seconds} s")
    await asyncio.sleep(max(0.0, started + seconds - time.monotonic()))
