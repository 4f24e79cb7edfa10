"""The scenarios, by the name given to ``python -m bench``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.harness import Options
from bench.scenarios import (
    consistency,
    get,
    invalidation,
    locks,
    profile,
    soak,
    stampede,
    tracing,
    workers,
    writes,
)


@dataclass(frozen=True, slots=True)
class Scenario:
    summary: str
    run: Callable[[Options], None]
    cluster: bool = False
    """Runs on a Redis Cluster with ``--cluster``."""


SCENARIOS: dict[str, Scenario] = {
    "writes": Scenario("Put per strategy; write-behind coalescing (issue 3)", writes.run),
    "get": Scenario("Get hit, Get miss, BatchGet(100) against the echo floor (issue 9)", get.run),
    "stampede": Scenario(
        "1000 Gets of one expired key over 3 instances, SWR, XFetch (issue 4)",
        stampede.run,
        cluster=True,
    ),
    "soak": Scenario("mixed load through a Redis and a PostgreSQL outage (issue 8)", soak.run),
    "invalidation": Scenario(
        "Put/UPDATE reaching other near caches (issue 5)", invalidation.run, cluster=True
    ),
    "tracing": Scenario(
        "Get hit with tracing off, 100 % and 1 % sampled, OTLP export (issue 6)", tracing.run
    ),
    "workers": Scenario("Get hit with serve --workers 1 and --workers 2 (issue 9)", workers.run),
    "profile": Scenario("cProfile of the Get-hit path, App in-process on uvloop", profile.run),
    "consistency": Scenario(
        "history checker: every read against the acknowledged writes, with faults (issue 17)",
        consistency.run,
    ),
    "locks": Scenario(
        "competing holders through connection recycling, a Redis freeze and a drain (issue 18)",
        locks.run,
    ),
}
