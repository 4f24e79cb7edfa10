"""Scenario ``locks`` (issue 18): never two holders, no orphaned locks.

Two cachecoord instances in this process on one Redis, both closing every
connection after 1 s (``max_connection_age``) and killing what is left on it
1 s later (``max_connection_age_grace``). Eight holders compete for one lock
through ``hold_lock`` (each client on both instances, pick_first), holding it
for 0.2-3 s at a time with a 4 s TTL, for ``--seconds`` (60 by default, 15
with ``--quick``). Every holder records the interval during which it
believed it held the lock: from ``acquired`` to the moment it left the block
(or learnt of the loss). Faults: Redis frozen (SIGSTOP) for 1.5 s at 40 % of
the run, shorter than the TTL; the first instance drained and stopped
(as on SIGTERM) at 70 %. Meanwhile AcquireLock calls with deadlines of
1-20 ms, each for a lock of its own, check that a caller that gave up
leaves no lock behind.

Figures (``RESULT`` lines):

* ``overlapping_holds``: pairs of holder intervals that overlap (target 0);
* ``orphaned_locks``: locks left in Redis that nobody holds the token of
  (the tiny-deadline ones, and the competed-for lock after every holder
  let go; target 0);
* ``holds``, ``lost_holds`` (holders told that their lock was lost),
  ``fencing_in_order`` (1 if fencing tokens grow with the intervals).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import shutil
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench.harness import Options
from cachecoord.app import App
from cachecoord.config import Duration, Settings, load
from cachecoord_client import AsyncClient, CacheCoordError, LockLost
from local_servers import PostgresServer, RedisServer

DEFAULT_SECONDS = 60.0
QUICK_SECONDS = 15.0
HOLDERS = 8
TTL_MS = 4_000
FREEZE_AT, FREEZE_FOR = 0.4, 1.5
DRAIN_AT = 0.7
TINY_DEADLINE_CALLS = 200


@dataclass(frozen=True, slots=True)
class Interval:
    holder: int
    fencing_token: int
    start: float
    end: float
    lost: bool


def run(options: Options) -> None:
    seconds = options.seconds or (QUICK_SECONDS if options.quick else DEFAULT_SECONDS)
    workdir = Path(tempfile.mkdtemp(prefix="bench-locks-"))
    workdir.chmod(0o755)  # PostgreSQL runs as its own user below it
    redis = RedisServer(workdir / "redis")
    postgres = PostgresServer(workdir / "postgres")
    try:
        redis.start()
        postgres.start()
        print(
            f"{HOLDERS} holders competing for one lock for {seconds:.0f} s over 2 instances "
            "recycling connections every 1 s; Redis frozen, then one instance drained",
            flush=True,
        )
        asyncio.run(_run(workdir, redis, postgres.dsn, seconds))
    finally:
        postgres.stop()
        redis.stop()
        if options.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _settings(workdir: Path, name: str, redis_url: str, dsn: str) -> Settings:
    path = workdir / f"{name}.toml"
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\nshutdown_grace = "2s"\ninstance_id = "{name}"\n'
        f'[redis]\nurl = "{redis_url}"\n[postgres]\nurl = "{dsn}"\n'
        '[namespaces.unused]\nkind = "managed"\n'
    )
    settings = load(path, {})
    recycling: dict[str, Any] = {
        "max_connection_age": Duration(1_000),
        "max_connection_age_grace": Duration(1_000),
    }
    return replace(settings, server=replace(settings.server, **recycling))


async def _run(workdir: Path, redis: RedisServer, dsn: str, seconds: float) -> None:
    first = App(_settings(workdir, "first", redis.url, dsn))
    second = App(_settings(workdir, "second", redis.url, dsn))
    await first.start()
    await second.start()
    target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"
    name = f"bench-{uuid.uuid4().hex[:8]}"
    intervals: list[Interval] = []
    errors: list[str] = []
    stop = asyncio.Event()
    started = time.monotonic()
    try:
        holders = [
            asyncio.create_task(_holder(i, target, name, stop, intervals, errors))
            for i in range(HOLDERS)
        ]
        tiny = asyncio.create_task(_tiny_deadlines(target, name))
        await asyncio.sleep(seconds * FREEZE_AT)
        pid = redis.pid
        assert pid is not None
        print(f"  fault: Redis frozen for {FREEZE_FOR} s", flush=True)
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(FREEZE_FOR)
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(max(0.0, started + seconds * DRAIN_AT - time.monotonic()))
        print("  fault: the first instance drains and stops (SIGTERM)", flush=True)
        await first.stop()
        await asyncio.sleep(max(0.0, started + seconds - time.monotonic()))
        stop.set()
        await asyncio.gather(*holders)
        granted = await tiny
        orphans = await _orphans(redis.url, name, granted)
    finally:
        await first.stop()
        await second.stop()
    _report(intervals, errors, orphans)


async def _holder(
    index: int,
    target: str,
    name: str,
    stop: asyncio.Event,
    intervals: list[Interval],
    errors: list[str],
) -> None:
    rng = random.Random(index)
    async with AsyncClient(target) as client:
        while not stop.is_set():
            start = 0.0
            fencing = 0
            try:
                async with client.hold_lock(
                    name, ttl_ms=TTL_MS, wait_timeout_ms=1_000, timeout=5
                ) as lock:
                    start, fencing = time.monotonic(), lock.fencing_token
                    await asyncio.sleep(rng.uniform(0.2, 3.0))
                    end = time.monotonic()  # before the release: it may still be held
                intervals.append(Interval(index, fencing, start, end, lost=False))
            except LockLost as err:
                if start:  # lost while held: held until now, as far as it knew
                    intervals.append(Interval(index, fencing, start, time.monotonic(), True))
                    print(f"  holder {index} lost the lock: {err.details}", flush=True)
            except CacheCoordError as err:  # not acquired within the wait, or a failure
                if start:
                    intervals.append(Interval(index, fencing, start, time.monotonic(), True))
                if err.code.name not in ("ABORTED", "DEADLINE_EXCEEDED", "UNAVAILABLE"):
                    errors.append(f"holder {index}: {err}")
                await asyncio.sleep(0.05)


async def _tiny_deadlines(target: str, name: str) -> dict[str, str]:
    """AcquireLock calls that give up after 1-20 ms; the tokens the callers got."""
    granted: dict[str, str] = {}
    async with AsyncClient(target) as client:
        for i in range(TINY_DEADLINE_CALLS):
            lock_name = f"{name}-tiny-{i}"
            with contextlib.suppress(CacheCoordError):
                lock = await client.acquire_lock(
                    lock_name, ttl_ms=60_000, timeout=(1 + i % 20) / 1000
                )
                granted[lock_name] = lock.token
            await asyncio.sleep(0.02)
    return granted


async def _orphans(url: str, name: str, granted: dict[str, str]) -> list[str]:
    """Locks in Redis that nobody holds the token of, once releases have settled."""
    await asyncio.sleep(0.5)
    raw = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        found = []
        async for key in raw.scan_iter(f"cc:lock:{{{name}*}}"):
            if key.endswith(":fencing"):
                continue
            lock_name = key.removeprefix("cc:lock:{").removesuffix("}")
            if granted.get(lock_name) != await raw.get(key):
                found.append(lock_name)
        return found
    finally:
        await raw.aclose()


def _report(intervals: list[Interval], errors: list[str], orphans: list[str]) -> None:
    ordered = sorted(intervals, key=lambda interval: interval.start)
    overlaps = [
        (a, b)
        for i, a in enumerate(ordered)
        for b in ordered[i + 1 :]
        if b.start < a.end and a.holder != b.holder
    ]
    fencing_in_order = all(
        a.fencing_token < b.fencing_token for a, b in itertools.pairwise(ordered)
    )
    for a, b in overlaps[:10]:
        print(f"  OVERLAP: {a} and {b}", flush=True)
    for error in errors[:10]:
        print(f"  error: {error}", flush=True)
    for orphan in orphans[:10]:
        print(f"  orphaned lock: {orphan}", flush=True)
    print(f"RESULT holds={len(intervals)}", flush=True)
    print(f"RESULT lost_holds={sum(1 for i in intervals if i.lost)}", flush=True)
    print(f"RESULT fencing_in_order={int(fencing_in_order)}", flush=True)
    print(f"RESULT overlapping_holds={len(overlaps)}", flush=True)
    print(f"RESULT orphaned_locks={len(orphans)}", flush=True)
