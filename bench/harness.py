"""The shared harness: the stack under test, the echo floor and the clients, and
one measurement primitive that every scenario uses for every phase.

A phase is: warm-up calls (not measured), then the measured calls from the
client processes; the CPU meters are read right before the clients are told to
go and right after the last reply (or, with a *settle* step, after the work the
calls left behind is done: a write-behind Put is not finished until its row is
written, so its flush is part of its cost). Scenarios interleave the floor and
their phases run by run, so slow drifts of a shared machine hit both alike.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import shutil
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from bench import floor
from bench.loadgen import Job, Worker, split
from bench.meter import Cpu, CpuMeter, spent
from bench.stack import ROOT, Server, Stack
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["CacheCoordService"].full_name
RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_PLOT = ROOT / "docs" / "benchmarks.png"


def method(name: str) -> str:
    """The gRPC path of a CacheCoordService method, e.g. ``method("Get")``."""
    return f"/{SERVICE}/{name}"


@dataclass(frozen=True, slots=True)
class Options:
    """Command-line knobs shared by every scenario."""

    runs: int = 3
    quick: bool = False
    concurrency: int = 32
    clients: int = 1
    payload: int = 200
    keep: bool = False
    seconds: float | None = None
    """How long a timed scenario (soak) runs; None: its own default."""
    runs_given: bool = False
    """--runs was given: it overrides a scenario's own default number of runs."""
    results: Path | None = None
    """Where scenarios save their figures for ``plot`` (None: not saved)."""
    output: Path = DEFAULT_PLOT
    """The PNG ``plot`` writes."""
    cluster: bool = False
    """Run on a private Redis Cluster instead of one Redis (the scenarios that
    support it: ``Scenario.cluster``); figures are saved as ``SCENARIO-cluster``."""

    def runs_or(self, default: int) -> int:
        """The runs of a scenario whose own default is *default* (1 with --quick)."""
        return self.runs if self.runs_given or self.quick else default

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        defaults = cls()
        parser.add_argument("--runs", type=int, help="measured runs, medians reported (3)")
        parser.add_argument(
            "--quick", action="store_true", help="a smoke run: 1 run of a few hundred calls"
        )
        parser.add_argument(
            "--conc", type=int, default=defaults.concurrency, help="calls in flight"
        )
        parser.add_argument(
            "--clients", type=int, default=defaults.clients, help="client processes"
        )
        parser.add_argument("--payload", type=int, default=defaults.payload, help="value bytes")
        parser.add_argument("--keep", action="store_true", help="keep the work directory")
        parser.add_argument(
            "--seconds", type=float, help="soak: how long to run (60; 15 with --quick)"
        )
        parser.add_argument(
            "--results",
            type=Path,
            help=f"where to save figures for plot ({RESULTS_DIR.relative_to(ROOT)}; "
            "not saved with --quick unless given)",
        )
        parser.add_argument(
            "--output",
            type=Path,
            default=defaults.output,
            help=f"the PNG plot writes ({DEFAULT_PLOT.relative_to(ROOT)})",
        )
        parser.add_argument(
            "--cluster",
            action="store_true",
            help="run on a private Redis Cluster (3 primaries + 3 replicas) instead of "
            "one Redis; stampede and invalidation only",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        runs = args.runs if args.runs is not None else (1 if args.quick else cls().runs)
        if runs < 1 or args.conc < 1 or args.clients < 1 or args.payload < 1:
            raise SystemExit("bench: --runs, --conc, --clients and --payload must be positive")
        if args.seconds is not None and args.seconds <= 0:
            raise SystemExit("bench: --seconds must be positive")
        results = args.results if args.results is not None else None if args.quick else RESULTS_DIR
        return cls(
            runs,
            args.quick,
            args.conc,
            args.clients,
            args.payload,
            args.keep,
            args.seconds,
            runs_given=args.runs is not None,
            results=results,
            output=args.output,
            cluster=args.cluster,
        )

    def size(self, calls: int) -> int:
        """A phase's number of calls: *calls*, or a twentieth of it with --quick."""
        return max(20, calls // 20) if self.quick else calls


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured phase."""

    calls: int
    seconds: float
    """Wall time from "go" to the last reply."""
    cpu: Cpu
    """CPU seconds per component over the calls (and the settle step, if any)."""
    client_cpu: float
    settle_seconds: float = 0.0
    replies: list[bytes] = field(default_factory=list)
    """Every n-th reply, when the phase asked for them."""
    latencies: array[float] = field(default_factory=lambda: array("d"))
    """Seconds per measured call, as each client timed it, in no particular order."""

    @property
    def rps(self) -> float:
        return self.calls / self.seconds

    def latency_ms(self, pct: float) -> float:
        """The *pct* percentile (nearest rank) of the call latencies, in ms."""
        return 1000 * percentile(sorted(self.latencies), pct)

    def cpu_us(self, component: str = "server") -> float:
        """Microseconds of *component* CPU per call."""
        return 1e6 * self.cpu[component] / self.calls

    @property
    def client_cpu_us(self) -> float:
        return 1e6 * self.client_cpu / self.calls


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of sorted *ordered* (0.0 when empty)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))]


class Harness:
    """Starts and stops everything a scenario measures; ``with Harness(...) as h``."""

    def __init__(self, options: Options, namespaces: str) -> None:
        self.options = options
        self.workdir = Path(tempfile.mkdtemp(prefix="cachecoord-bench-"))
        self.stack = Stack(self.workdir, namespaces)
        self.floor_payload = b"x" * options.payload
        self._context = multiprocessing.get_context("spawn")
        self._exit = ExitStack()
        self._workers: list[Worker] = []
        self._echo: floor.EchoServer | None = None
        self._meters: dict[int, CpuMeter] = {}
        self.also_metered: dict[str, int] = {}
        """More processes to meter beside each server (name: pid); set before measuring."""
        self._floor_meter: CpuMeter | None = None
        self._failed = False

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self._failed = True
            self._close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._failed = exc is not None
        self._close()

    def _start(self) -> None:
        started = time.monotonic()
        self._exit.enter_context(self.stack)
        echo = floor.EchoServer(self._context)
        self._echo = echo
        self._exit.callback(echo.close)
        for index in range(self.options.clients):
            worker = Worker(self._context, index)
            self._workers.append(worker)
            self._exit.callback(worker.close)
        stack = self.stack
        self._floor_meter = CpuMeter({"server": echo.pid})
        loop = "uvloop" if echo.uvloop else "asyncio"
        print(
            f"stack up in {time.monotonic() - started:.1f} s: cachecoord pid {stack.pid} on "
            f"{stack.target}, echo floor on {echo.target} ({loop}), "
            f"{self.options.clients} client process(es) x {self.options.concurrency} in flight, "
            f"{self.options.payload} B payload; work directory {self.workdir}",
            flush=True,
        )

    def _close(self) -> None:
        self._exit.close()
        if self._failed or self.options.keep:
            print(f"bench: work directory kept: {self.workdir} (cachecoord.log is there)")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def measure_floor(self, calls: int, warmup: int, *, channels: int = 1) -> Sample:
        """Measure the echo floor: *calls* echoes of the payload, after *warmup*."""
        assert self._echo is not None
        assert self._floor_meter is not None
        return self._measure(
            self._floor_meter,
            self._echo.target,
            floor.METHOD,
            [self.floor_payload] * warmup,
            [self.floor_payload] * calls,
            channels=channels,
        )

    def measure(
        self,
        rpc: str,
        warmup: Sequence[bytes],
        measured: Sequence[bytes],
        *,
        settle: Callable[[], None] | None = None,
        sample_every: int = 0,
        server: Server | None = None,
        channels: int = 1,
        concurrency: int | None = None,
    ) -> Sample:
        """Send serialized *rpc* requests to cachecoord (the stack's main server, or
        *server*): *warmup*, then *measured*, over *channels* channels per client,
        *concurrency* calls in flight per client (default: ``--conc``)."""
        chosen = server or self.stack.servers[0]
        sample = self._measure(
            self.meter(chosen),
            chosen.target,
            method(rpc),
            warmup,
            measured,
            settle=settle,
            sample_every=sample_every,
            channels=channels,
            concurrency=concurrency,
        )
        self.stack.check_alive()
        return sample

    def meter(self, server: Server) -> CpuMeter:
        """The CPU meter of *server* (its worker processes included), Redis and PostgreSQL."""
        if server.pid not in self._meters:
            redis, postgres = self.stack.redis.pid, self.stack.postgres.pid
            assert redis is not None
            assert postgres is not None
            self._meters[server.pid] = CpuMeter(
                {"server": server.pid, "redis": redis, "postgres": postgres, **self.also_metered},
                with_children=frozenset({"server", "postgres"}),
            )
        return self._meters[server.pid]

    def _measure(
        self,
        meter: CpuMeter,
        target: str,
        path: str,
        warmup: Sequence[bytes],
        measured: Sequence[bytes],
        *,
        settle: Callable[[], None] | None = None,
        sample_every: int = 0,
        channels: int = 1,
        concurrency: int | None = None,
    ) -> Sample:
        workers = self._workers
        parts = zip(split(warmup, len(workers)), split(measured, len(workers)), strict=True)
        for worker, (warm, main) in zip(workers, parts, strict=True):
            worker.submit(
                Job(
                    target,
                    path,
                    warm,
                    main,
                    concurrency or self.options.concurrency,
                    sample_every=sample_every,
                    channels=channels,
                )
            )
        for worker in workers:
            worker.wait_warm()
        before = meter.read()
        started = time.perf_counter()
        for worker in workers:
            worker.go()
        reports = [worker.wait_report() for worker in workers]
        seconds = time.perf_counter() - started
        settled = 0.0
        if settle is not None:
            settle()
            settled = time.perf_counter() - started - seconds
        cpu = spent(before, meter.read())
        calls = sum(r.calls for r in reports)
        errors = sum(r.errors for r in reports)
        if errors:
            first = next(r.first_error for r in reports if r.errors)
            raise RuntimeError(f"{errors} of {calls} calls to {path} failed; first: {first}")
        return Sample(
            calls=calls,
            seconds=seconds,
            cpu=cpu,
            client_cpu=sum(r.cpu for r in reports),
            settle_seconds=settled,
            replies=[reply for r in reports for reply in r.samples],
            latencies=array("d", (t for r in reports for t in r.latencies)),
        )
