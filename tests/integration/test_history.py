"""The history checker (tests/history_support.py) in the suite: a bounded run.

Four instances (one a `cachecoord serve` process) with near caches and
LocalCaches, every strategy, writers, readers, an invalidator and direct SQL
updates; faults: slow loads made in PostgreSQL, every pub/sub connection
cut, Redis frozen (SIGSTOP), an instance killed (SIGKILL). Every read is
checked against the acknowledged writes and the events seen, with the bound
docs/guarantees.md section 2 gives its path. ``python -m bench consistency``
runs the same for longer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from history_support import Faults, run_history

from conftest import Backend
from local_servers import RedisServer


@pytest_asyncio.fixture(loop_scope="session")
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A Redis of this test's own: it is frozen mid-run."""
    server = RedisServer(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.stop)


@pytest.mark.timeout(120)
async def test_no_read_is_older_than_its_bound_on_a_single_redis(
    own_redis: RedisServer, own_database: str, tmp_path: Path
) -> None:
    assert own_redis.pid is not None
    report = await run_history(
        tmp_path,
        [own_redis.url],
        own_database,
        seconds=25,
        faults=Faults(redis_pid=own_redis.pid),
        seed=17,
    )
    print(report.summary())
    print("\n".join(report.result_lines()))
    assert report.checked > 1000, report.summary()
    assert {"redis", "database", "near", "local-memory"} <= set(report.paths), report.summary()
    assert report.beyond_bound == 0, "\n".join(report.violations)
    assert report.server_errors == []


@pytest.mark.timeout(120)
async def test_no_read_is_older_than_its_bound_on_a_redis_cluster(
    cluster_backend: Backend, own_database: str, tmp_path: Path
) -> None:
    report = await run_history(
        tmp_path,
        list(cluster_backend.urls),
        own_database,
        seconds=15,
        cluster=True,
        faults=Faults(freeze_redis_at=()),
        seed=17,
    )
    print(report.summary())
    print("\n".join(report.result_lines()))
    assert report.checked > 500, report.summary()
    assert report.beyond_bound == 0, "\n".join(report.violations)
    assert report.server_errors == []
