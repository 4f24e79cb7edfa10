"""The tracer and the metric instruments, from the OpenTelemetry API only.

They are no-ops until telemetry.configure() installs the SDK; hot paths also
check ``telemetry.TRACING`` / ``telemetry.METRICS`` so that, with telemetry
off, they do no span or attribute work at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

from cachecoord import telemetry

tracer = trace.get_tracer("cachecoord")
meter = metrics.get_meter("cachecoord")

_NO_SPAN = nullcontext()


def span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A child span of the current one while tracing, else nothing at all."""
    if not telemetry.TRACING:
        return _NO_SPAN
    return tracer.start_as_current_span(name, attributes=attributes)


requests = meter.create_counter(
    "cachecoord.requests", unit="{request}", description="RPCs answered, by method and status"
)
hits = meter.create_counter(
    "cachecoord.cache.hits", unit="{hit}", description="Reads answered from a cache, by layer"
)
misses = meter.create_counter(
    "cachecoord.cache.misses", unit="{miss}", description="Reads that had to load PostgreSQL"
)
load_duration = meter.create_histogram(
    "cachecoord.load.duration", unit="ms", description="Time of a PostgreSQL load after a miss"
)
coalesced = meter.create_counter(
    "cachecoord.stampede.coalesced",
    unit="{request}",
    description="Misses that waited for another reader's load instead of loading",
)
invalidations_published = meter.create_counter(
    "cachecoord.invalidations.published",
    unit="{invalidation}",
    description="Invalidations this instance made (writes, Invalidate, database changes)",
)
invalidations_received = meter.create_counter(
    "cachecoord.invalidations.received",
    unit="{invalidation}",
    description="Invalidation messages received from any instance",
)
lock_wait = meter.create_histogram(
    "cachecoord.lock.wait", unit="ms", description="Time AcquireLock waited for a held lock"
)

# Write-behind queues report through callbacks registered by their flushers.
_queue_probes: list[Callable[[], Iterable[tuple[str, int, float]]]] = []


def watch_queues(probe: Callable[[], Iterable[tuple[str, int, float]]]) -> None:
    """Register *probe*: it yields (namespace, queue length, lag in ms)."""
    _queue_probes.append(probe)


def unwatch_queues(probe: Callable[[], Iterable[tuple[str, int, float]]]) -> None:
    if probe in _queue_probes:
        _queue_probes.remove(probe)


def _queue_length(options: CallbackOptions) -> Iterable[Observation]:
    for probe in _queue_probes:
        for namespace, length, _ in probe():
            yield Observation(length, {"cache.namespace": namespace})


def _queue_lag(options: CallbackOptions) -> Iterable[Observation]:
    for probe in _queue_probes:
        for namespace, _, lag in probe():
            yield Observation(lag, {"cache.namespace": namespace})


meter.create_observable_gauge(
    "cachecoord.write_behind.queue_length",
    callbacks=[_queue_length],
    unit="{write}",
    description="Writes queued for PostgreSQL",
)
meter.create_observable_gauge(
    "cachecoord.write_behind.lag",
    callbacks=[_queue_lag],
    unit="ms",
    description="Age of the oldest write still queued",
)
