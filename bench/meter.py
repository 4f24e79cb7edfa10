"""CPU time of the processes under test, read from /proc through psutil.

Server CPU per request (user + system) is the figure that compares across
machines and loads: a rate depends on how many cores are free and on the client,
the CPU a request costs much less. Redis and PostgreSQL are metered beside the
server, because on a 2-core machine their work competes with it for the cores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import psutil


class CpuMeter:
    """Reads cumulative CPU seconds of named processes (with their children for
    PostgreSQL, whose backends are children of the postmaster)."""

    def __init__(self, pids: Mapping[str, int], with_children: frozenset[str] = frozenset()):
        self._processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._with_children = with_children

    def read(self) -> dict[str, dict[int, float]]:
        """CPU seconds so far, per component and pid (see :func:`spent`)."""
        return {
            name: self._times(process, name in self._with_children)
            for name, process in self._processes.items()
        }

    @staticmethod
    def _times(process: psutil.Process, children: bool) -> dict[int, float]:
        processes = [process, *(process.children() if children else [])]
        times: dict[int, float] = {}
        for proc in processes:
            try:
                user, system = proc.cpu_times()[:2]
            except psutil.NoSuchProcess:
                continue
            times[proc.pid] = user + system
        return times


def spent(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> Cpu:
    """CPU seconds each component used between two readings. A process that started
    in between counts from zero; one that exited in between is lost (PostgreSQL
    keeps its pooled backends, so this rarely matters)."""
    processes = {
        name: {pid: total - before.get(name, {}).get(pid, 0.0) for pid, total in pids.items()}
        for name, pids in after.items()
    }
    return Cpu({name: sum(pids.values()) for name, pids in processes.items()}, processes)


@dataclass(frozen=True, slots=True)
class Cpu:
    """CPU seconds per component ("server", "redis", "postgres") over one phase."""

    seconds: Mapping[str, float]
    processes: Mapping[str, Mapping[int, float]] = field(default_factory=dict)
    """The same, per process (pid) of each component."""

    def __getitem__(self, component: str) -> float:
        return self.seconds.get(component, 0.0)
