"""The tracer and the metric instruments, from the OpenTelemetry API only.

They are no-ops until telemetry.configure() installs the SDK; hot paths also
check ``telemetry.TRACING`` / ``telemetry.METRICS`` so that, with telemetry
off, they do no span or attribute work at all. With tracing on, a request the
sampler leaves out costs one sampling decision: no span is started for it,
and nothing below it creates a span or reads the trace context again (see
:class:`ServerSpan` and :data:`request_span`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import context, metrics, propagate, trace
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.util.types import Attributes

from cachecoord import telemetry

if TYPE_CHECKING:
    from cachecoord.sampling import ServerSampling

tracer = trace.get_tracer("cachecoord")
meter = metrics.get_meter("cachecoord")

_NO_SPAN = nullcontext()

request_span: ContextVar[trace.Span | None] = ContextVar("cachecoord_request_span", default=None)
"""The server span of the RPC being served, if the sampler kept it; else None
(tracing off, request not sampled, or not inside an RPC). ``get()`` is one
context-variable lookup: the hot path asks it, not the trace context, whether
to record anything."""


def span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A child span of the current one when the RPC's trace is sampled, else
    nothing at all."""
    if request_span.get() is None:
        return _NO_SPAN
    return tracer.start_as_current_span(name, attributes=attributes)


class ServerSpan:
    """The server span of an RPC, current while the block runs; its parent is
    the caller's span from the W3C ``traceparent`` in *metadata* (the gRPC
    invocation metadata), whatever language the caller is written in.

    The configured sampler is asked first (cachecoord/sampling.py). When it
    leaves the request out, no span object is made at all and the block runs
    with instrumentation suppressed (the key the contrib Redis and psycopg
    instrumentations check), so nothing below makes one either: the request
    costs one sampling decision. Its log lines still carry its trace id (the
    caller's, or :data:`telemetry.untraced_trace_id` for a new root).
    Exceptions are not recorded: the caller sets the status.
    """

    __slots__ = ("_current", "_recording", "_span", "_token", "_trace_id", "_untraced")
    _token: Token[Context]
    _recording: Token[trace.Span | None]
    _untraced: Token[int] | None

    def __init__(
        self, name: str, metadata: Iterable[tuple[str, str | bytes]], attributes: Attributes
    ) -> None:
        fields = _propagated_fields()
        carrier = {
            key: value for key, value in metadata if key in fields and isinstance(value, str)
        }
        # No trace context in the metadata: a root span (the propagator, with
        # nothing to read, would return an empty context too).
        parent = propagate.extract(carrier) if carrier else _ROOT
        sampling = _server_sampling()
        span: trace.Span | None
        self._trace_id = 0  # set for a root left out: its log lines show it
        if sampling is not None:
            span, trace_id = sampling.start(name, parent, trace.SpanKind.SERVER, attributes)
            if span is None and parent is _ROOT:
                self._trace_id = trace_id
        else:  # a tracer that telemetry.configure did not set up: the SDK decides
            span = tracer.start_span(
                name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
            )
        if span is not None and span.is_recording():
            self._span: trace.Span | None = span
            self._current = trace.set_span_in_context(span, parent)
            return
        self._span = None
        if span is not None:  # the SDK's non-recording span: it carries the ids
            parent = trace.set_span_in_context(span, parent)
        self._current = (
            _SUPPRESSED_ROOT
            if parent is _ROOT
            else context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True, parent)
        )

    def __enter__(self) -> trace.Span:
        self._token = context.attach(self._current)
        if self._span is not None:
            self._recording = request_span.set(self._span)
            return self._span
        self._untraced = telemetry.untraced_trace_id.set(self._trace_id) if self._trace_id else None
        return trace.INVALID_SPAN

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        context.detach(self._token)
        if self._span is not None:
            request_span.reset(self._recording)
            self._span.end()
        elif self._untraced is not None:
            telemetry.untraced_trace_id.reset(self._untraced)


_ROOT = Context()
_SUPPRESSED_ROOT = context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True, _ROOT)


_servers: tuple[trace.Tracer | None, trace.TracerProvider | None, ServerSampling | None] = (
    None,
    None,
    None,
)


def _server_sampling() -> ServerSampling | None:
    """How :data:`tracer` starts server spans (see cachecoord/sampling.py);
    found again when the tracer or the global tracer provider changes."""
    global _servers
    provider = trace.get_tracer_provider()
    if _servers[0] is not tracer or _servers[1] is not provider:
        from cachecoord.sampling import server_sampling

        # The API's proxy hands every call on to the provider's tracer.
        sdk = trace.get_tracer("cachecoord") if isinstance(tracer, trace.ProxyTracer) else tracer
        _servers = (tracer, provider, server_sampling(sdk))
    return _servers[2]


@contextmanager
def quiet() -> Iterator[None]:
    """Run a background loop with the Redis and SQL instrumentations
    suppressed: its polling (XREADGROUP, XPENDING, an outbox query that finds
    nothing) makes no span, so an idle instance exports none. The work the
    loop does is traced under :func:`background_span`."""
    token = context.attach(context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
    try:
        yield
    finally:
        context.detach(token)


@contextmanager
def background_span(
    name: str,
    *,
    links: Sequence[trace.Link] = (),
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    start_time: int | None = None,
    attributes: Attributes = None,
) -> Iterator[trace.Span | None]:
    """A root span for background work that did something (a flush, a
    drained outbox batch, a reconnect), *links* pointing at the requests it
    carries; the Redis and SQL calls in the block are its children even
    inside :func:`quiet`. Yields None (and does nothing) with tracing off."""
    if not telemetry.TRACING:
        yield None
        return
    span = tracer.start_span(
        name,
        context=Context(),
        kind=kind,
        links=links,
        attributes=attributes,
        start_time=start_time,
    )
    current = context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, False, context.get_current())
    token = context.attach(trace.set_span_in_context(span, current))
    try:
        yield span
    except Exception as err:
        span.record_exception(err)
        span.set_status(trace.Status(trace.StatusCode.ERROR, type(err).__name__))
        raise
    finally:
        context.detach(token)
        span.end()


def link_to(traceparent: str) -> trace.Link | None:
    """A link to the span of a W3C *traceparent* (as recorded with a queued
    write), or None if it names none."""
    if not traceparent:
        return None
    linked = trace.get_current_span(propagate.extract({"traceparent": traceparent}))
    context_ = linked.get_span_context()
    return trace.Link(context_) if context_.is_valid else None


_fields: tuple[TextMapPropagator | None, frozenset[str]] = (None, frozenset())


def _propagated_fields() -> frozenset[str]:
    """The metadata keys the global propagator reads (``traceparent``,
    ``tracestate`` and ``baggage`` by default; ``OTEL_PROPAGATORS`` chooses)."""
    global _fields
    textmap = propagate.get_global_textmap()
    if _fields[0] is not textmap:
        _fields = (textmap, frozenset(textmap.fields))
    return _fields[1]


# Seconds, as the OpenTelemetry RPC conventions ask; buckets from 0.5 ms (a
# near-cache hit) to 10 s (a deadline).
_SECONDS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

call_duration = meter.create_histogram(
    "rpc.server.call.duration",
    unit="s",
    description="Duration of RPCs answered, by method and gRPC status code",
    explicit_bucket_boundaries_advisory=_SECONDS,
)
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
    "cachecoord.load.duration",
    unit="s",
    description="Time of a PostgreSQL load after a miss",
    explicit_bucket_boundaries_advisory=_SECONDS,
)
coalesced = meter.create_counter(
    "cachecoord.stampede.coalesced",
    unit="{request}",
    description="Misses that waited for another reader's load (a lease wait) instead of loading",
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
    "cachecoord.lock.wait",
    unit="s",
    description="Time AcquireLock waited for a held lock",
    explicit_bucket_boundaries_advisory=_SECONDS,
)
dead_lettered = meter.create_counter(
    "cachecoord.write_behind.dead_lettered",
    unit="{write}",
    description="Writes PostgreSQL rejected max_attempts times, moved to the dead-letter stream",
)


@dataclass(frozen=True, slots=True)
class QueueSample:
    """What a write-behind flusher last saw of its namespace's queues (all
    instances share them: every instance reports the same figures)."""

    namespace: str
    depth: int = 0
    """Writes waiting for PostgreSQL."""
    oldest_age_s: float = 0.0
    """Age of the oldest of them; 0 when none waits."""
    pending: int = 0
    """Of those, read by a flusher and not yet acknowledged."""
    dead_letters: int = 0
    """Entries in the dead-letter stream."""


# Write-behind queues, and the outbox, report through probes their owners register.
_queue_probes: list[Callable[[], QueueSample]] = []
_outbox_probes: list[Callable[[], int | None]] = []


def watch_queues(probe: Callable[[], QueueSample]) -> None:
    """Register *probe*: the latest sample of one namespace's queues."""
    _queue_probes.append(probe)


def unwatch_queues(probe: Callable[[], QueueSample]) -> None:
    if probe in _queue_probes:
        _queue_probes.remove(probe)


def watch_outbox(probe: Callable[[], int | None]) -> None:
    """Register *probe*: outbox rows waiting (None: not sampled yet)."""
    _outbox_probes.append(probe)


def unwatch_outbox(probe: Callable[[], int | None]) -> None:
    if probe in _outbox_probes:
        _outbox_probes.remove(probe)


def _queue_gauge(field_name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        for probe in _queue_probes:
            sample = probe()
            yield Observation(getattr(sample, field_name), {"cache.namespace": sample.namespace})

    return observe


def _outbox_backlog(options: CallbackOptions) -> Iterable[Observation]:
    for probe in _outbox_probes:
        rows = probe()
        if rows is not None:
            yield Observation(rows)


for _name, _field, _unit, _description in (
    ("cachecoord.write_behind.queue.depth", "depth", "{write}", "Writes queued for PostgreSQL"),
    (
        "cachecoord.write_behind.queue.oldest_age",
        "oldest_age_s",
        "s",
        "Age of the oldest write still queued for PostgreSQL",
    ),
    (
        "cachecoord.write_behind.queue.pending",
        "pending",
        "{write}",
        "Queued writes read by a flusher and not yet acknowledged",
    ),
    (
        "cachecoord.write_behind.dead_letters",
        "dead_letters",
        "{write}",
        "Writes in the dead-letter stream (see cachecoord dead-letters list)",
    ),
):
    meter.create_observable_gauge(
        _name, callbacks=[_queue_gauge(_field)], unit=_unit, description=_description
    )
meter.create_observable_gauge(
    "cachecoord.outbox.backlog",
    callbacks=[_outbox_backlog],
    unit="{invalidation}",
    description="Committed invalidations not yet finished (cachecoord.outbox rows)",
)


# -- hooks for the components that own the state ---------------------------
# The Redis circuit breaker, the near caches and the invalidation bus report
# through these; each needs one call where the component is built or acts
# (app.py, invalidation/near_cache.py), after which the metric is exported.

_breaker_probes: list[Callable[[], bool]] = []
_near_cache_probes: list[Callable[[], Iterable[tuple[str, int]]]] = []


def watch_breaker(probe: Callable[[], bool]) -> None:
    """Register *probe*: whether the Redis circuit breaker is open."""
    _breaker_probes.append(probe)


def watch_near_caches(probe: Callable[[], Iterable[tuple[str, int]]]) -> None:
    """Register *probe*: (namespace, entries) of each near cache."""
    _near_cache_probes.append(probe)


def unwatch(probe: object) -> None:
    """Unregister a probe given to watch_breaker or watch_near_caches."""
    for probes in (_breaker_probes, _near_cache_probes):
        if probe in probes:
            probes.remove(probe)  # type: ignore[arg-type]


def _breaker_open(options: CallbackOptions) -> Iterable[Observation]:
    for probe in _breaker_probes:
        yield Observation(1 if probe() else 0)


def _near_cache_size(options: CallbackOptions) -> Iterable[Observation]:
    for probe in _near_cache_probes:
        for namespace, entries in probe():
            yield Observation(entries, {"cache.namespace": namespace})


meter.create_observable_gauge(
    "cachecoord.redis.breaker.open",
    callbacks=[_breaker_open],
    unit="",  # a state, not a ratio (unit "1" would end the Prometheus name in _ratio)
    description="1 while the Redis circuit breaker is open (Redis skipped), else 0",
)
meter.create_observable_gauge(
    "cachecoord.near_cache.size",
    callbacks=[_near_cache_size],
    unit="{entry}",
    description="Entries in the in-process near cache",
)
near_cache_evictions = meter.create_counter(
    "cachecoord.near_cache.evictions",
    unit="{entry}",
    description="Near-cache entries dropped to make room (not invalidations)",
)
propagation_delay = meter.create_histogram(
    "cachecoord.invalidation.propagation.duration",
    unit="s",
    description="From a change's commit (the message's timestamp) to its invalidation here",
    explicit_bucket_boundaries_advisory=_SECONDS,
)
consistency_checks = meter.create_counter(
    "cachecoord.consistency.checks",
    unit="{check}",
    description="Sampled changes whose key the consistency observer read back, per layer",
)
consistency_violations = meter.create_counter(
    "cachecoord.consistency.violations",
    unit="{check}",
    description="Checks that found a layer older than the change after the bound",
)
catch_ups = meter.create_counter(
    "cachecoord.invalidation.catch_ups",
    unit="{catch_up}",
    description="Namespaces caught up after the pub/sub subscription dropped, by outcome:"
    " replayed (from the invalidation log) or too_old (the log no longer reached back:"
    " near cache flushed, Watch streams reset)",
)
replayed_changes = meter.create_counter(
    "cachecoord.invalidation.replayed",
    unit="{change}",
    description="Changes replayed from the invalidation log after the subscription dropped",
)
watch_resumes = meter.create_counter(
    "cachecoord.watch.resumes",
    unit="{stream}",
    description="Watch streams opened with a resume_token, by outcome: resumed (the log"
    " replayed what they missed) or too_old (they were reset)",
)
