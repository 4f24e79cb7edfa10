"""The figures a scenario saves for ``python -m bench plot``: one JSON file per
scenario in ``bench/results/`` (``--results DIR``), overwritten by its next run.

Per phase: its rate (median over runs, and each run's), server CPU per call,
and its latency distribution as percentiles of every measured call of every
run pooled together, on a grid that is dense in the tail (p50, p90, p99,
p99.9 ...), which is what the plot draws. ``--quick`` runs save nothing unless
``--results`` is given, so a smoke test never overwrites a real run's figures.
A ``--cluster`` run is saved as ``SCENARIO-cluster.json`` (scenario
``SCENARIO-cluster``, its title saying so), beside the single-Redis figures.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import Options, percentile

# Percentiles 0 .. 99.99, spaced evenly in -log10(1 - p): as many points between
# p90 and p99 as between p0 and p90.
GRID = [100 * (1 - 10 ** (-k / 40)) for k in range(161)]


@dataclass(frozen=True, slots=True)
class PhaseFigures:
    """One phase of a scenario, as the plot needs it."""

    name: str
    label: str
    rps: float
    """Median over runs; NaN when the phase has no rate (a burst)."""
    rps_runs: list[float] = field(default_factory=list)
    server_cpu_us: float = math.nan
    latency_pct: list[float] = field(default_factory=list)
    """The percentiles of GRID that the sample size supports."""
    latency_ms: list[float] = field(default_factory=list)
    """Latency at each of those percentiles."""


def latency_distribution(seconds: Iterable[float]) -> tuple[list[float], list[float]]:
    """(percentiles, ms) of *seconds* on GRID, up to the resolution of the sample."""
    ordered = sorted(1000 * s for s in seconds)
    if not ordered:
        return [], []
    finest = 100 * (1 - 1 / len(ordered))
    pcts = [p for p in GRID if p <= finest] or [0.0]
    return pcts, [percentile(ordered, p) for p in pcts]


def save(
    options: Options,
    scenario: str,
    title: str,
    phases: Sequence[PhaseFigures],
    results: Mapping[str, float],
    *,
    runs: int,
    notes: Sequence[str] = (),
) -> Path | None:
    """Write *scenario*'s figures to ``options.results`` (if set); return the file."""
    if options.results is None:
        return None
    if options.cluster:
        scenario, title = f"{scenario}-cluster", f"{title}, on a Redis Cluster"
    options.results.mkdir(parents=True, exist_ok=True)
    path = options.results / f"{scenario}.json"
    document: dict[str, Any] = {
        "scenario": scenario,
        "title": title,
        "redis": "cluster (3 primaries + 3 replicas)" if options.cluster else "single",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "runs": runs,
        "quick": options.quick,
        "clients": options.clients,
        "concurrency": options.concurrency,
        "payload": options.payload,
        "phases": [asdict(phase) for phase in phases],
        "results": {k: v for k, v in results.items() if math.isfinite(v)},
        "notes": list(notes),
    }
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"figures saved to {path}", flush=True)
    return path


def load(directory: Path) -> dict[str, dict[str, Any]]:
    """Every saved scenario in *directory*, by name."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.json")):
        document = json.loads(path.read_text())
        found[str(document["scenario"])] = document
    return found


def machine() -> str:
    """nproc, CPU model and Python version, for the record."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs, {model}, Python {platform.python_version()}"
