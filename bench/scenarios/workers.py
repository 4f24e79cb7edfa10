"""Scenario ``workers`` (issue 9): Get-hit throughput of ``cachecoord serve
--workers 1`` and ``--workers 2``.

Two servers over one Redis and PostgreSQL: the plain one (``--workers 1`` is
the default: one process) and a ``--workers 2`` one (a supervisor and two
spawned worker processes sharing its port with SO_REUSEPORT). At least two
client processes (``--clients``, raised to 2) send the Gets, each over
``CHANNELS`` channels of its own (so TCP connections: the kernel picks a
worker per connection, and with two connections both could land on one
worker), ``--conc`` calls in flight per client; the same clients and channels
for both servers and for the echo floor. Per run: the floor, then the two
servers in an order that alternates run by run. Figure: the median over runs
of ``rate(--workers 2) / rate(--workers 1)``, and how the two workers shared
the CPU.

What it can show depends on the cores. On a 2-core machine the clients, Redis
and PostgreSQL share the two cores with the workers: one worker already keeps
one core busy, and the clients need most of the other, so a second worker
finds little idle CPU and the ratio is bounded well below 2 by the machine,
not by cachecoord. Compare the ratio with how much CPU was idle (the report
prints the CPU of every process per second of the phase).
"""

from __future__ import annotations

import dataclasses

import psutil

from bench import messages
from bench.harness import Harness, Options, Sample
from bench.report import Phase, Report, rps
from bench.scenarios.get import fill_cache, insert_rows
from bench.stack import Server
from cachecoord_client import Layer
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb

NAMESPACES = """
[namespaces.reads]
kind = "managed"
strategy = "cache-aside"
ttl = "1h"
"""

HOT_KEYS = 1_000
CALLS = 8_000
FLOOR_CALLS = 8_000
WARMUP = 1_000
CLIENTS = 2
CHANNELS = 4

ONE = Phase("get_hit_workers_1", "Get hit, --workers 1")
TWO = Phase("get_hit_workers_2", "Get hit, --workers 2")


def run(options: Options) -> None:
    options = dataclasses.replace(options, clients=max(CLIENTS, options.clients))
    report = Report("workers: Get hit, serve --workers 1 and 2")
    shares: list[str] = []
    busy: dict[str, list[float]] = {ONE.name: [], TWO.name: []}
    with Harness(options, NAMESPACES) as harness:
        servers: dict[str, Server] = {
            ONE.name: harness.stack.servers[0],
            TWO.name: harness.stack.add_server("cachecoord-workers-2", args=["--workers", "2"]),
        }
        workers = psutil.Process(servers[TWO.name].pid).children()
        print(
            f"--workers 2: supervisor pid {servers[TWO.name].pid}, workers "
            f"{', '.join(str(w.pid) for w in workers)}; {options.clients} client processes "
            f"x {CHANNELS} channels",
            flush=True,
        )
        if len(workers) != 2:
            raise RuntimeError(f"--workers 2 started {len(workers)} worker processes")
        hot = [f"r{i}" for i in range(HOT_KEYS)]
        insert_rows(harness, "reads", hot)
        fill_cache(harness, "reads", hot, Layer.REDIS)
        warmup = [messages.get("reads", hot[i % HOT_KEYS]) for i in range(options.size(WARMUP))]
        measured = [messages.get("reads", hot[i % HOT_KEYS]) for i in range(options.size(CALLS))]
        for number in range(options.runs):
            report.new_run(
                harness.measure_floor(
                    options.size(FLOOR_CALLS), options.size(WARMUP), channels=CHANNELS
                )
            )
            for phase in (ONE, TWO) if number % 2 == 0 else (TWO, ONE):
                sample = harness.measure(
                    "Get",
                    warmup,
                    measured,
                    server=servers[phase.name],
                    sample_every=50,
                    channels=CHANNELS,
                )
                messages.check_get(sample.replies, pb.LAYER_REDIS)
                report.add(phase, sample)
                busy[phase.name].append(_cores_busy(sample, options.clients))
                if phase is TWO:
                    shares.append(_share(sample, servers[TWO.name].pid))
    report.result("workers_2_over_1_ratio", report.paired(TWO.name, ONE.name, rps))
    report.result(
        "workers_2_over_1_cpu_ratio", report.paired(TWO.name, ONE.name, lambda s: s.cpu_us())
    )
    for phase in (ONE, TWO):
        cores = sorted(busy[phase.name])[len(busy[phase.name]) // 2]
        report.result(f"{phase.name}_cores_busy", cores)
    report.note(f"--workers 2: share of the server CPU per worker, per run: {'; '.join(shares)}")
    report.note(
        "cores_busy: CPU seconds per second of the phase of the server(s), Redis, PostgreSQL "
        "and the client processes together (2.0 = both cores of this machine)"
    )
    report.finish()
    report.save(options, "workers")


def _share(sample: Sample, supervisor: int) -> str:
    """How the server CPU of a --workers 2 phase split over its processes."""
    per_pid = sample.cpu.processes.get("server", {})
    total = sum(per_pid.values()) or 1.0
    parts = [
        f"{100 * seconds / total:.0f} %" for pid, seconds in per_pid.items() if pid != supervisor
    ]
    return " / ".join(parts)


def _cores_busy(sample: Sample, clients: int) -> float:
    """Cores kept busy by everything the phase measured, clients included."""
    return (sum(sample.cpu.seconds.values()) + sample.client_cpu) / sample.seconds
