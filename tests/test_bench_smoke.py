"""The benchmarks still run: `python -m bench <scenario> --quick` ends with its
RESULT lines, each a number.

No performance assertion on purpose: figures from a shared CI machine are noise,
and a benchmark is read by people, not gated by a test. Each run starts its own
Redis, PostgreSQL, cachecoord and echo floor, so no fixture is used.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

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
        "get_miss_db_cpu_ratio",
        "batchget_keys_per_get_ratio",
    ],
    "stampede": [
        "query_ms",
        "db_loads",
        "p50_ms",
        "p99_ms",
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
}


def results(output: str) -> dict[str, str]:
    """The ``RESULT name=value`` lines of a benchmark's output."""
    found = {}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            name, _, value = line.removeprefix("RESULT ").partition("=")
            found[name] = value
    return found


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("scenario", sorted(EXPECTED))
def test_quick_benchmark_prints_numeric_results(scenario: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench", scenario, "--quick"],
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
