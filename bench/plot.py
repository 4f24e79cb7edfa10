"""``python -m bench plot``: one PNG of what the scenarios saved (bench/results.py).

One row per scenario: on the left the latency distribution of each phase (the
latency at each percentile, percentiles on a log scale of 1 / (1 - p) so the
tail is readable: p50, p90, p99, p99.9), on the right its throughput (median
over runs, with each run's figure as a dot). ``all`` draws it at the end.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench import results
from bench.harness import RESULTS_DIR, Options

ORDER = ["get", "writes", "tracing", "workers", "stampede", "stampede-cluster"]
TICKS = {0.0: "p0", 0.30103: "p50", 1.0: "p90", 2.0: "p99", 3.0: "p99.9", 4.0: "p99.99"}


def run(options: Options) -> None:
    directory = options.results or RESULTS_DIR
    saved = results.load(directory) if directory.is_dir() else {}
    if not saved:
        raise SystemExit(f"bench plot: no saved figures in {directory}; run a scenario first")
    draw(saved, options.output)


def draw(saved: dict[str, dict[str, Any]], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")

    names = [n for n in ORDER if n in saved] + sorted(n for n in saved if n not in ORDER)
    figure, axes = plt.subplots(
        len(names), 2, figsize=(13, 3.4 * len(names)), squeeze=False, width_ratios=[1.6, 1]
    )
    for row, name in enumerate(names):
        document = saved[name]
        phases = [p for p in document["phases"] if p["latency_ms"]]
        left, right = axes[row]
        for phase in phases:
            xs = [-math.log10(max(1e-6, 1 - p / 100)) for p in phase["latency_pct"]]
            left.plot(xs, phase["latency_ms"], label=phase["label"], linewidth=1.4)
        left.set_yscale("log")
        left.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        left.yaxis.set_major_formatter(plain)
        left.yaxis.set_minor_formatter(NullFormatter())
        left.set_xticks(list(TICKS), list(TICKS.values()))
        left.set_xlim(0, max(1.0, *(max(_xs(p)) for p in phases)) if phases else 4.0)
        left.set_ylabel("latency (ms)")
        left.grid(True, which="both", alpha=0.3)
        left.legend(fontsize=7, loc="upper left")
        when = document.get("when", "")[:16].replace("T", " ")
        quick = " (--quick: not meaningful)" if document.get("quick") else ""
        left.set_title(
            f"{document['title']}{quick}\n{document.get('runs')} run(s), {when} UTC",
            fontsize=9,
            loc="left",
        )
        rated = [p for p in document["phases"] if not math.isnan(p["rps"])]
        if not rated:
            right.axis("off")
            right.text(
                0.02,
                0.5,
                "latency of bursts of concurrent Gets:\nno throughput figure",
                fontsize=9,
                va="center",
            )
            continue
        labels = [p["label"] for p in rated]
        positions = list(range(len(rated)))
        right.barh(positions, [p["rps"] for p in rated], color="tab:blue", alpha=0.7)
        for y, phase in zip(positions, rated, strict=True):
            right.plot(phase["rps_runs"], [y] * len(phase["rps_runs"]), "k.", markersize=4)
            end = max([phase["rps"], *phase["rps_runs"]])
            right.text(end, y, f"  {phase['rps']:,.0f}", va="center", fontsize=7)
        right.set_yticks(positions, labels, fontsize=7)
        right.invert_yaxis()
        right.set_xlabel("calls/s (bar: median; dots: runs)")
        right.grid(True, axis="x", alpha=0.3)
    machine = next(iter(saved.values())).get("machine", "")
    figure.suptitle(f"cachecoord benchmarks ({machine})", fontsize=10)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=90)
    plt.close(figure)
    print(f"plot written to {output}", flush=True)


def _xs(phase: dict[str, Any]) -> list[float]:
    return [-math.log10(max(1e-6, 1 - p / 100)) for p in phase["latency_pct"]] or [0.0]
