"""Medians over runs, ratios to the echo floor, and the printed report.

Each run measures the floor and then the scenario's phases, so a ratio is taken
within a run (phase / floor of the same run) and the median of those per-run
ratios is reported: on a shared, noisy machine that cancels slow drifts that a
ratio of two medians taken minutes apart would keep. The last lines of the
output are ``RESULT name=value``, one per figure, for scripts to read.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.harness import Options, Sample
from bench.results import PhaseFigures, latency_distribution, save

FLOOR = "floor"


@dataclass(frozen=True, slots=True)
class Phase:
    """A measured phase: its RESULT prefix and how it is described."""

    name: str
    """RESULT prefix, e.g. ``get_hit_redis``."""
    label: str
    """What the table calls it, e.g. ``Get hit (Redis)``."""


@dataclass
class Report:
    """Samples per run and phase; prints a table and RESULT lines."""

    title: str
    runs: list[dict[str, Sample]] = field(default_factory=list)
    phases: dict[str, Phase] = field(default_factory=dict)
    results: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def new_run(self, floor: Sample | None = None) -> None:
        """Start a run, with its echo floor (or none: the scenario's ratios are
        between its own phases)."""
        if floor is None:
            self.runs.append({})
            return
        self.runs.append({FLOOR: floor})
        self._show(Phase(FLOOR, "echo floor"), floor)

    @property
    def has_floor(self) -> bool:
        return any(FLOOR in run for run in self.runs)

    def add(self, phase: Phase, sample: Sample) -> None:
        """Record *sample* for the current run (after :meth:`new_run`)."""
        self.phases[phase.name] = phase
        self.runs[-1][phase.name] = sample
        self._show(phase, sample)

    def median(self, name: str, figure: Callable[[Sample], float]) -> float:
        return statistics.median(figure(run[name]) for run in self.runs if name in run)

    def paired(self, top: str, bottom: str, figure: Callable[[Sample], float]) -> float:
        """Median over runs of figure(top) / figure(bottom), both from the same run."""
        return self.per_run(lambda run: figure(run[top]) / figure(run[bottom]))

    def per_run(self, figure: Callable[[dict[str, Sample]], float]) -> float:
        """Median over runs of a figure computed from one run's samples."""
        return statistics.median(figure(run) for run in self.runs)

    def spread(self, name: str, figure: Callable[[Sample], float]) -> str:
        values = [figure(run[name]) for run in self.runs if name in run]
        return f"{min(values):,.0f}-{max(values):,.0f}" if len(values) > 1 else "-"

    def result(self, name: str, value: float) -> None:
        self.results[name] = value

    def note(self, text: str) -> None:
        self.notes.append(text)

    def finish(self) -> None:
        """Derive the standard figures of every phase, print the table and RESULTs."""
        floor = self.has_floor
        derived: dict[str, float] = {}
        if floor:
            derived = {
                "floor_rps": self.median(FLOOR, rps),
                "floor_cpu_us": self.median(FLOOR, cpu_us),
            }
        for name in self.phases:
            derived[f"{name}_rps"] = self.median(name, rps)
            derived[f"{name}_cpu_us"] = self.median(name, cpu_us)
            derived[f"{name}_p50_ms"] = self.median(name, lambda s: s.latency_ms(50))
            derived[f"{name}_p99_ms"] = self.median(name, lambda s: s.latency_ms(99))
            if floor:
                derived[f"{name}_cpu_ratio"] = self.paired(name, FLOOR, cpu_us)
                derived[f"{name}_rps_ratio"] = self.paired(name, FLOOR, rps)
        self.results = {**derived, **self.results}  # the scenario's own figures last
        print(f"\n== {self.title}: medians of {len(self.runs)} run(s) ==")
        header = (
            f"{'phase':<26}{'calls/s':>9}{'(min-max)':>15}{'server us':>11}"
            f"{'redis us':>10}{'pg us':>8}{'client us':>11}{'p50 ms':>8}{'p99 ms':>8}"
            f"{'cpu/floor':>11}{'rps/floor':>11}"
        )
        print(header)
        for phase in self.all_phases():
            name = phase.name
            ratio_cpu = ratio_rps = ""
            if floor and name != FLOOR:
                ratio_cpu = f"{self.paired(name, FLOOR, cpu_us):.2f}"
                ratio_rps = f"{self.paired(name, FLOOR, rps):.2f}"
            print(
                f"{phase.label:<26}{self.median(name, rps):>9,.0f}"
                f"{'(' + self.spread(name, rps) + ')':>15}"
                f"{self.median(name, cpu_us):>11,.0f}"
                f"{self.median(name, lambda s: s.cpu_us('redis')):>10,.0f}"
                f"{self.median(name, lambda s: s.cpu_us('postgres')):>8,.0f}"
                f"{self.median(name, lambda s: s.client_cpu_us):>11,.0f}"
                f"{self.median(name, lambda s: s.latency_ms(50)):>8.2f}"
                f"{self.median(name, lambda s: s.latency_ms(99)):>8.2f}"
                f"{ratio_cpu:>11}{ratio_rps:>11}"
            )
        print(
            "(us = CPU microseconds per call; p50/p99: call latency seen by the clients; "
            "ratios are medians of per-run ratios)"
        )
        for text in self.notes:
            print(f"note: {text}")
        print()
        for key, value in self.results.items():
            print(f"RESULT {key}={_format(key, value)}")

    def all_phases(self) -> list[Phase]:
        """The echo floor (if measured), then the scenario's phases in order."""
        return [Phase(FLOOR, "echo floor")] * self.has_floor + list(self.phases.values())

    def figures(self) -> list[PhaseFigures]:
        """What ``plot`` draws: per phase, rates and the pooled latency distribution."""
        figures = []
        for phase in self.all_phases():
            samples = [run[phase.name] for run in self.runs if phase.name in run]
            pcts, ms = latency_distribution(t for s in samples for t in s.latencies)
            figures.append(
                PhaseFigures(
                    phase.name,
                    phase.label,
                    self.median(phase.name, rps),
                    [s.rps for s in samples],
                    self.median(phase.name, cpu_us),
                    pcts,
                    ms,
                )
            )
        return figures

    def save(self, options: Options, scenario: str) -> None:
        """Save the figures for ``plot`` (after :meth:`finish`)."""
        save(
            options,
            scenario,
            self.title,
            self.figures(),
            self.results,
            runs=len(self.runs),
            notes=self.notes,
        )

    def _show(self, phase: Phase, sample: Sample) -> None:
        settle = f", +{sample.settle_seconds:.2f} s to settle" if sample.settle_seconds else ""
        print(
            f"  run {len(self.runs)}: {phase.label:<24} {sample.rps:>8,.0f} calls/s, "
            f"server {sample.cpu_us():>6,.0f} us/call "
            f"p99 {sample.latency_ms(99):.1f} ms ({sample.calls} calls in "
            f"{sample.seconds:.2f} s{settle})",
            flush=True,
        )


def rps(sample: Sample) -> float:
    return sample.rps


def cpu_us(sample: Sample) -> float:
    return sample.cpu_us()


def _format(key: str, value: float) -> str:
    if key.endswith("ratio"):
        return f"{value:.3f}"
    if isinstance(value, int):
        return str(value)
    if 0 < abs(value) < 1:
        return f"{value:.3f}"
    return f"{value:.1f}"
