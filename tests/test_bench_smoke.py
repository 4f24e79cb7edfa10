"""The benchmarks still run: `python -m bench <scenario> --quick` ends with its
RESULT lines, each a number.

No performance assertion on purpose: figures from a shared CI machine are noise,
and a benchmark is read by people, not gated by a test. Each run starts its own
Redis, PostgreSQL, cachecoord and echo floor, so no fixture is used.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from local_servers import redis_supports_cluster

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 240

EXPECTED = {
    "writes": [
        "floor_rps",
        "floor_cpu_us",
        "put_cache_aside_rps",
        "put_write_through_rps",
        "put_write_behind_rps",
        "put_write_behind_cpu_ratio",
        "write_behind_over_write_through_ratio",
        "db_row_writes",
    ],
    "get": [
        "floor_rps",
        "floor_cpu_us",
        "get_hit_redis_cpu_ratio",
        "get_hit_redis_rps",
        "get_hit_near_cpu_ratio",
        "get_miss_db_cpu_ratio",
        "batchget_keys_per_get_ratio",
        "get_hit_tagged_over_untagged_cpu_ratio",
        "get_hit_tagged_moved_over_untagged_cpu_ratio",
    ],
    "stampede": [
        "query_ms",
        "db_loads",
        "p50_ms",
        "p99_ms",
        "echo_burst_p99_ms",
        "stampede_p99_over_hit_burst_p99_ms",
        "naive_db_loads",
        "naive_p50_ms",
        "naive_p99_ms",
        "swr_waits",
        "xfetch_waits",
    ],
    # 15 s of load with a Redis and a PostgreSQL outage: about 25 s in all.
    "soak": [
        "errors_outside_outages",
        "lost_acknowledged_writes",
        "rss_growth_mb",
        "stale_reads_after",
    ],
    # Three servers, two reader processes, 2 x 64 writes: about 15 s.
    "invalidation": [
        "put_propagation_p99_ms",
        "db_propagation_p99_ms",
        "propagation_p99_ms",
        "stale_reads_after_bound",
    ],
    # Three servers and an OTLP receiver: about 10 s.
    "tracing": [
        "tracing_100_ratio",
        "tracing_1_ratio",
        "tracing_100_spans",
        "tracing_1_spans",
    ],
    # --workers 1 and --workers 2, two client processes: about 10 s.
    "workers": [
        "get_hit_workers_1_rps",
        "get_hit_workers_2_rps",
        "workers_2_over_1_ratio",
    ],
    # 8 holders over 2 instances through connection recycling, a Redis freeze
    # and a drain: 15 s with --quick.
    "locks": ["holds", "overlapping_holds", "orphaned_locks"],
    # The history checker over 3 instances with faults: 20 s with --quick.
    "consistency": [
        "stale_reads_beyond_bound",
        "reads_checked",
        "worst_staleness_ms",
        "consistency_nines",
        "observer_cpu_ratio",
    ],
    # The App in-process under cProfile: about 6 s.
    "profile": [
        "profile_plain_cpu_us",
        "profile_overhead_ratio",
        "profile_share_cachecoord_ratio",
        "profile_share_unattributed_ratio",
    ],
}


def results(output: str) -> dict[str, str]:
    """The ``RESULT name=value`` lines of a benchmark's output."""
    found = {}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            name, _, value = line.removeprefix("RESULT ").partition("=")
            found[name] = value
    return found


def run_quick(scenario: str, *options: str) -> str:
    """Run ``python -m bench SCENARIO --quick OPTIONS``; check its RESULT lines;
    return its output."""
    run = subprocess.run(
        [sys.executable, "-m", "bench", scenario, "--quick", *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-3000:]}"
    found = results(run.stdout)
    missing = [name for name in EXPECTED[scenario] if name not in found]
    assert not missing, f"missing RESULT lines {missing}; output:\n{run.stdout[-3000:]}"
    for name, value in found.items():
        assert math.isfinite(float(value)), f"RESULT {name}={value} is not a finite number"
    return run.stdout


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("scenario", sorted(EXPECTED))
def test_quick_benchmark_prints_numeric_results(scenario: str) -> None:
    run_quick(scenario)


# A 6-node Redis Cluster, three servers and three echo servers: about 15 s.
# Its bursts send about 67 concurrent Gets per instance to one node, just over
# redis.max_connections (64): see "Redis Cluster" in docs/benchmarks.md for
# what happens when a burst fills that pool (the five trial runs here passed).
@pytest.mark.timeout(TIMEOUT + 30)
def test_quick_stampede_runs_on_a_redis_cluster() -> None:
    problem = redis_supports_cluster()
    if problem is not None:
        pytest.skip(f"bench stampede --cluster needs a cluster-capable redis-server: {problem}")
    output = run_quick("stampede", "--cluster")
    assert "Redis: a private Redis Cluster of 3 primaries + 3 replicas" in output


def test_cluster_is_refused_by_scenarios_without_it() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench", "get", "--cluster"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    assert "--cluster: only stampede and invalidation" in run.stderr


def test_without_a_scenario_it_lists_them() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "writes" in run.stdout
    assert "get" in run.stdout
    assert "stampede" in run.stdout
    assert "soak" in run.stdout
    for name in ("tracing", "workers", "profile", "plot"):
        assert name in run.stdout


def test_plot_draws_the_saved_figures(tmp_path: Path) -> None:
    """`python -m bench plot` reads bench/results.py's JSON and writes a PNG."""
    phase = {
        "name": "floor",
        "label": "echo floor",
        "rps": 1000.0,
        "rps_runs": [900.0, 1000.0, 1100.0],
        "server_cpu_us": 250.0,
        "latency_pct": [0.0, 50.0, 90.0, 99.0],
        "latency_ms": [1.0, 2.0, 3.0, 9.0],
    }
    saved = {"scenario": "get", "title": "a test", "runs": 3, "phases": [phase], "results": {}}
    (tmp_path / "get.json").write_text(json.dumps(saved))
    output = tmp_path / "plot.png"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "plot",
            "--results",
            str(tmp_path),
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert output.read_bytes().startswith(b"\x89PNG")
