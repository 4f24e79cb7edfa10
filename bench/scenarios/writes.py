"""Scenario ``writes`` (issue 3): Put throughput per strategy, and write-behind
coalescing.

Phases, per run, after the echo floor: Put on a cache-aside, a write-through and
a write-behind namespace (managed, same payload), each over its own set of keys
that the warm-up has already written once, so the measured Puts are updates.
A write-behind Put's CPU window stays open until its queue is drained, so the
flush is counted; its rate is what clients see (acknowledged Puts per second).

Then the latency that write-behind is for: Puts on write-through and on
write-behind at a closed loop of LATENCY_CONC calls in flight (one client
process), far from saturation, so the p50 is the time one Put takes rather
than time spent queueing behind others; the write-behind phase's CPU again
includes flushing its queue.

Last in each run: 10,000 Puts spread over 10 hot keys of the write-behind
namespace, and the number of rows PostgreSQL wrote for them once the queue is
drained (median over runs: it depends on how the flushes fall, so it varies).
Coalescing (design 3.4) should make that far fewer than the Puts (target 1,000).
"""

from __future__ import annotations

import statistics

from bench import messages
from bench.harness import Harness, Options
from bench.report import FLOOR, Phase, Report, cpu_us, rps
from bench.write_behind import Queues, RowWrites
from cachecoord_client import Client

STRATEGIES = ("cache-aside", "write-through", "write-behind")
BEHIND = "write-behind"
PARTITIONS = 4
NAMESPACES = f"""
[namespaces.cache-aside]
kind = "managed"
strategy = "cache-aside"

[namespaces.write-through]
kind = "managed"
strategy = "write-through"

# The defaults, written out so the report says what was measured.
[namespaces.write-behind]
kind = "managed"
strategy = "write-behind"
flush_interval = "100ms"
flush_batch = 500
partitions = {PARTITIONS}
"""

KEYS = 500  # per strategy; the warm-up writes each once
CALLS = 3_000
FLOOR_CALLS = 6_000
HOT_KEYS = 10
HOT_PUTS = 10_000
HOT_PREFIX = "hot-"
HOT = Phase("put_write_behind_hot", f"Put write-behind {HOT_KEYS} keys")
LATENCY_CONC = 4
LATENCY_CALLS = 1_500


def run(options: Options) -> None:
    report = Report("writes: Put per strategy")
    row_writes: list[int] = []
    with Harness(options, NAMESPACES) as harness:
        stack = harness.stack
        queues = Queues(stack.redis.url, BEHIND, PARTITIONS)
        # Fires only for the hot keys (a WHEN clause, no function call for other rows).
        counter = RowWrites(stack.postgres.dsn, BEHIND, HOT_PREFIX)
        counter.install()
        try:
            for number in range(options.runs):
                report.new_run(
                    harness.measure_floor(options.size(FLOOR_CALLS), warmup=options.size(KEYS))
                )
                for strategy in STRATEGIES:
                    _measure_puts(harness, report, queues, strategy, number)
                for strategy in ("write-through", BEHIND):
                    _measure_puts(harness, report, queues, strategy, number, LATENCY_CONC)
                row_writes.append(_measure_coalescing(harness, report, queues, counter, number))
            _check_flushed(harness, report, counter.stored())
            if dead := queues.dead_letters():
                report.note(f"{dead} write-behind entries were dead-lettered")
        finally:
            counter.remove()
            queues.close()
    report.result(
        "write_behind_over_write_through_ratio",
        report.paired("put_write_behind", "put_write_through", rps),
    )
    at_4 = f"_c{LATENCY_CONC}"
    report.result(
        "write_behind_p50_over_write_through_p50",
        report.paired(
            "put_write_behind" + at_4, "put_write_through" + at_4, lambda s: s.latency_ms(50)
        ),
    )
    report.result("write_behind_cpu_ratio", report.paired("put_write_behind" + at_4, FLOOR, cpu_us))
    report.result("db_row_writes", statistics.median(row_writes))
    report.result("db_row_writes_puts", options.size(HOT_PUTS))
    report.note(
        "write-behind server/redis/pg CPU includes flushing its queue after the last Put "
        "(the 'to settle' time); its calls/s is Puts acknowledged per second"
    )
    report.note(
        f"db_row_writes: rows PostgreSQL wrote for {options.size(HOT_PUTS)} Puts over "
        f"{HOT_KEYS} keys, per run: {', '.join(map(str, row_writes))} (target <= 1000 "
        "for 10,000 Puts)"
    )
    report.finish()
    report.save(options, "writes")


def _measure_puts(
    harness: Harness,
    report: Report,
    queues: Queues,
    strategy: str,
    number: int,
    concurrency: int | None = None,
) -> None:
    """Puts on *strategy*'s namespace at ``--conc`` calls in flight, or at
    *concurrency* (a separate phase, with fewer calls)."""
    options = harness.options
    keys = [f"k{i}" for i in range(options.size(KEYS))]

    def request(i: int) -> bytes:
        return messages.put(strategy, keys[i % len(keys)], messages.value(options.payload, i))

    calls = options.size(LATENCY_CALLS if concurrency else CALLS)
    # Every Put writes a distinct value: the latency phases count from far above.
    first = (number + 1) * len(keys) + number * calls + (10**6 if concurrency else 0)
    sample = harness.measure(
        "Put",
        [request(i) for i in range(len(keys))],
        [request(first + i) for i in range(calls)],
        settle=queues.wait_drained if strategy == BEHIND else None,
        sample_every=50,
        concurrency=concurrency,
    )
    messages.check_put(sample.replies)
    name = "put_" + strategy.replace("-", "_")
    label = f"Put {strategy}"
    if concurrency:
        name, label = f"{name}_c{concurrency}", f"{label}, {concurrency} in flight"
    report.add(Phase(name, label), sample)


def _measure_coalescing(
    harness: Harness, report: Report, queues: Queues, counter: RowWrites, number: int
) -> int:
    """10,000 Puts over 10 keys; return the rows PostgreSQL wrote for them."""
    options = harness.options
    puts = options.size(HOT_PUTS)
    first = number * puts
    before = counter.count()
    sample = harness.measure(
        "Put",
        [],
        [
            messages.put(
                BEHIND, f"{HOT_PREFIX}{i % HOT_KEYS}", messages.value(options.payload, first + i)
            )
            for i in range(puts)
        ],
        settle=queues.wait_drained,
        sample_every=50,
    )
    messages.check_put(sample.replies)
    report.add(HOT, sample)
    rows = counter.count() - before
    print(f"  run {number + 1}: PostgreSQL wrote {rows} rows for those {puts} Puts", flush=True)
    return rows


def _check_flushed(harness: Harness, report: Report, stored: dict[str, tuple[bytes, int]]) -> None:
    """After the drain, PostgreSQL must hold what a Get answers for every hot key."""
    with Client(harness.stack.target, default_timeout=30) as client:
        for i in range(HOT_KEYS):
            key = f"{HOT_PREFIX}{i}"
            got = client.get(BEHIND, key)
            if key not in stored:
                report.note(f"after the drain, {key} has no row in PostgreSQL")
            elif (got.value, got.version) != stored[key]:
                report.note(
                    f"after the drain, {key} is version {got.version} in the cache but "
                    f"{stored[key][1]} in PostgreSQL"
                )
