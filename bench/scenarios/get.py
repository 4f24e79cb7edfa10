"""Scenario ``get`` (issue 9): the read path against the echo floor.

Phases, per run, after the echo floor:

* Get hit (Redis): 1,000 keys filled into Redis before the runs, read round-robin;
* Get hit (near cache): the same 1,000 keys in a namespace with a near cache
  (``near_cache_entries`` above the key count, ``near_cache_ttl`` of an hour, so
  no entry expires during the benchmark), filled before the runs: every call is
  answered from the server's memory, and sampled replies must say LAYER_NEAR;
* Get miss (database): every Get names a key that exists in PostgreSQL and was
  never read before, so each one takes the whole miss path (Redis miss, lease,
  SQL load, fill); rows are inserted with SQL up front, never through cachecoord;
* BatchGet of 100 keys, all Redis hits (sliding windows over the same 1,000 keys);
* Get hit (Redis) of values with tags (issue 21 item 4), two tags each (one of
  ten groups, and one all share), in a namespace whose tag clock has not moved
  since they were filled (the value is valid without looking at its tags);
* the same after an InvalidateTags of an unrelated tag moved the clock (made
  before the runs): each read also needs its tags' marks, read from Redis
  once per tag and clock value, then from the instance's memory.

``get_hit_tagged_over_untagged_cpu_ratio`` and
``get_hit_tagged_moved_over_untagged_cpu_ratio`` are those phases' server CPU
per call over the untagged Redis hit's, in the same run (``..._rps_ratio``:
throughput); what untagged values pay for tags (the
tag clock read with every value) shows in ``get_hit_redis_cpu_us`` against
the runs before tags (docs/benchmarks.md).

``get_hit_near_cpu_ratio`` is the near-cache phase's server CPU per call over
the echo floor's, in the same run (median over runs), like every ``*_cpu_ratio``.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg

from bench import messages
from bench.harness import Harness, Options
from bench.report import Phase, Report, cpu_us, rps
from cachecoord_client import Client, Layer
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb

NAMESPACES = """
[namespaces.reads]
kind = "managed"
strategy = "cache-aside"
ttl = "1h"

[namespaces.near]
kind = "managed"
strategy = "cache-aside"
ttl = "1h"
near_cache_entries = 2000
near_cache_ttl = "1h"

[namespaces.misses]
kind = "managed"
strategy = "cache-aside"
ttl = "1h"

[namespaces.tagged]
kind = "managed"
strategy = "cache-aside"
ttl = "1h"

[namespaces.moved]
kind = "managed"
strategy = "cache-aside"
ttl = "1h"
"""

HOT_KEYS = 1_000
BATCH = 100
FLOOR_CALLS = 6_000
HIT_CALLS = 6_000
MISS_CALLS = 3_000
BATCH_CALLS = 2_000
WARMUP = 500

HIT = Phase("get_hit_redis", "Get hit (Redis)")
NEAR = Phase("get_hit_near", "Get hit (near cache)")
MISS = Phase("get_miss_db", "Get miss (database)")
BATCH_GET = Phase("batchget", f"BatchGet {BATCH} (Redis)")
TAGGED = Phase("get_hit_tagged", "Get hit (Redis, tagged)")
MOVED = Phase("get_hit_tagged_moved", "Get hit (tagged, clock moved)")


def run(options: Options) -> None:
    report = Report("get: the read path")
    with Harness(options, NAMESPACES) as harness:
        hot = [f"r{i}" for i in range(HOT_KEYS)]
        miss_calls, miss_warmup = options.size(MISS_CALLS), options.size(WARMUP)
        misses = [f"m{i}" for i in range(options.runs * (miss_calls + miss_warmup))]
        insert_rows(harness, "reads", hot)
        insert_rows(harness, "near", hot)
        insert_rows(harness, "misses", misses)
        for namespace in ("tagged", "moved"):
            insert_rows(harness, namespace, hot, tags=lambda i: [f"group:{i % 10}", "all"])
        fill_cache(harness, "reads", hot, Layer.REDIS)
        fill_cache(harness, "near", hot, Layer.NEAR)
        fill_cache(harness, "tagged", hot, Layer.REDIS)
        fill_cache(harness, "moved", hot, Layer.REDIS)
        with Client(harness.stack.target, default_timeout=30) as client:
            client.invalidate_tags("moved", ["no-value-has-this-tag"])
        for number in range(options.runs):
            report.new_run(harness.measure_floor(options.size(FLOOR_CALLS), options.size(WARMUP)))
            _measure_hits(harness, report, hot, "reads", HIT, pb.LAYER_REDIS)
            _measure_hits(harness, report, hot, "near", NEAR, pb.LAYER_NEAR)
            used = misses[number * (miss_calls + miss_warmup) :][: miss_calls + miss_warmup]
            _measure_misses(harness, report, used[:miss_warmup], used[miss_warmup:])
            _measure_batches(harness, report, hot)
            _measure_hits(harness, report, hot, "tagged", TAGGED, pb.LAYER_REDIS)
            _measure_hits(harness, report, hot, "moved", MOVED, pb.LAYER_REDIS)
    for phase in (TAGGED, MOVED):
        over = f"{phase.name}_over_untagged"
        report.result(f"{over}_cpu_ratio", report.paired(phase.name, HIT.name, cpu_us))
        report.result(f"{over}_rps_ratio", report.paired(phase.name, HIT.name, rps))
    report.result("batchget_keys_per_s", BATCH * report.median(BATCH_GET.name, rps))
    report.result(
        "batchget_cpu_per_key_us", report.median(BATCH_GET.name, lambda s: s.cpu_us() / BATCH)
    )
    report.result(
        "batchget_keys_per_get_ratio",
        report.per_run(lambda one: BATCH * one[BATCH_GET.name].rps / one[HIT.name].rps),
    )
    report.finish()
    report.save(options, "get")


def insert_rows(
    harness: Harness,
    namespace: str,
    keys: list[str],
    tags: Callable[[int], list[str]] = lambda i: [],
) -> None:
    """Rows written behind cachecoord's back: in PostgreSQL, not in Redis;
    row *i* with the tags ``tags(i)``."""
    data = messages.value(harness.options.payload)
    with psycopg.connect(harness.stack.postgres.dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO cachecoord.entries (namespace, key, value, tags) VALUES (%s, %s, %s, %s)",
            [(namespace, key, data, tags(i)) for i, key in enumerate(keys)],
        )


def fill_cache(harness: Harness, namespace: str, keys: list[str], layer: Layer) -> None:
    """Read every key once (BatchGet fills misses, and the near cache if there is
    one), then check they are all answered from *layer*."""
    with Client(harness.stack.target, default_timeout=30) as client:
        for start in range(0, len(keys), BATCH):
            client.batch_get(namespace, keys[start : start + BATCH])
        for start in range(0, len(keys), BATCH):
            entries = client.batch_get(namespace, keys[start : start + BATCH])
            if not all(e.found and e.layer is layer for e in entries):
                raise RuntimeError(f"{namespace}: keys are not in {layer.value} after a BatchGet")


def _measure_hits(
    harness: Harness,
    report: Report,
    hot: list[str],
    namespace: str,
    phase: Phase,
    layer: pb.Layer.ValueType,
) -> None:
    options = harness.options
    calls = options.size(HIT_CALLS)
    sample = harness.measure(
        "Get",
        [messages.get(namespace, hot[i % len(hot)]) for i in range(options.size(WARMUP))],
        [messages.get(namespace, hot[i % len(hot)]) for i in range(calls)],
        sample_every=50,
    )
    messages.check_get(sample.replies, layer)
    report.add(phase, sample)


def _measure_misses(
    harness: Harness, report: Report, warmup: list[str], measured: list[str]
) -> None:
    sample = harness.measure(
        "Get",
        [messages.get("misses", key) for key in warmup],
        [messages.get("misses", key) for key in measured],
        sample_every=25,
    )
    messages.check_get(sample.replies, pb.LAYER_DATABASE)
    report.add(MISS, sample)


def _measure_batches(harness: Harness, report: Report, hot: list[str]) -> None:
    options = harness.options

    def request(i: int) -> bytes:
        start = (i * 37) % len(hot)  # windows that wrap around and do not repeat in lockstep
        return messages.batch_get("reads", [hot[(start + j) % len(hot)] for j in range(BATCH)])

    calls = options.size(BATCH_CALLS)
    sample = harness.measure(
        "BatchGet",
        [request(i) for i in range(options.size(WARMUP) // 10)],
        [request(i) for i in range(calls)],
        sample_every=10,
    )
    messages.check_batch_get(sample.replies, BATCH, pb.LAYER_REDIS)
    report.add(BATCH_GET, sample)
