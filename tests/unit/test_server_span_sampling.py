"""With the tracer provider telemetry.configure sets up, the server span asks
the sampler before any span exists: an unsampled request starts no span at
all (one sampling decision is its whole cost), a sampled one gets the same
spans as ever, and a ratio sampler keeps its ratio."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, TraceState
from opentelemetry.util.types import Attributes

from cachecoord import instruments, telemetry
from cachecoord.sampling import TraceIds

ATTRIBUTES = {"rpc.system": "grpc", "rpc.method": "Get"}
CALLER_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN = 0xB7AD6B7169203331


@dataclass
class Asked(Sampler):
    """The configured sampler, noting each question and its answer."""

    inner: Sampler
    answers: list[tuple[int, Decision]] = field(default_factory=list)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        result = self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links)
        self.answers.append((trace_id, result.decision))
        return result

    def get_description(self) -> str:
        return f"Asked({self.inner.get_description()})"


@dataclass
class Traced:
    sampler: Asked
    metrics: InMemoryMetricReader
    exported: InMemorySpanExporter

    def spans(self) -> dict[str, ReadableSpan]:
        return {s.name.rsplit("/", 1)[-1]: s for s in self.exported.get_finished_spans()}

    def started(self) -> int:
        """Spans the SDK created, recording or not: its own count
        (otel.sdk.span.started, OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED)."""
        data = self.metrics.get_metrics_data()
        return sum(
            int(point.value)
            for resource in (data.resource_metrics if data else [])
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == "otel.sdk.span.started"
            for point in metric.data.data_points
            if isinstance(point, NumberDataPoint)
        )


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], Traced]:
    """The server's tracer as telemetry.configure builds it (TraceIds), with
    OTEL_TRACES_SAMPLER=parentbased_traceidratio at the given ratio."""
    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")

    def build(ratio: float) -> Traced:
        sampler = Asked(ParentBased(TraceIdRatioBased(ratio)))
        metrics = InMemoryMetricReader()
        provider = TracerProvider(
            sampler=sampler,
            id_generator=TraceIds(),
            meter_provider=MeterProvider(metric_readers=[metrics]),
        )
        exported = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exported))
        monkeypatch.setattr(instruments, "tracer", provider.get_tracer("test"))
        return Traced(sampler, metrics, exported)

    return build


def traceparent(flags: str) -> tuple[str, str]:
    return ("traceparent", f"00-{CALLER_TRACE:032x}-{CALLER_SPAN:016x}-{flags}")


@dataclass(frozen=True)
class Seen:
    """What the layers below the server span saw."""

    request_span: bool
    instrumented: bool
    trace_id: int
    """As a log line shows it."""
    recording: bool


def logged_trace_id() -> int:
    record = logging.LogRecord("cachecoord.test", logging.INFO, __file__, 1, "", None, None)
    telemetry._TraceContext().filter(record)
    return int(getattr(record, "trace_id", "") or "0", 16)


def serve(metadata: Sequence[tuple[str, str | bytes]] = ()) -> Seen:
    with (
        instruments.ServerSpan("cachecoord.v1.CacheCoordService/Get", metadata, ATTRIBUTES),
        instruments.span("cache.redis"),
    ):
        seen = Seen(
            instruments.request_span.get() is not None,
            is_instrumentation_enabled(),
            logged_trace_id(),
            trace.get_current_span().is_recording(),
        )
    assert instruments.request_span.get() is None
    assert trace.get_current_span() is trace.INVALID_SPAN
    assert is_instrumentation_enabled()
    assert logged_trace_id() == 0
    return seen


def test_an_unsampled_request_starts_no_span(traced: Callable[[float], Traced]) -> None:
    """One sampling decision and no span created, not even a non-recording
    one; log lines still show the trace id the sampler decided on."""
    tracing = traced(0.0)
    seen = serve([("user-agent", "grpc-go")])
    assert (seen.request_span, seen.instrumented, seen.recording) == (False, False, False)
    assert tracing.sampler.answers == [(seen.trace_id, Decision.DROP)]
    assert seen.trace_id != trace.INVALID_TRACE_ID
    assert tracing.started() == 0
    assert tracing.exported.get_finished_spans() == ()


def test_an_unsampled_callers_request_starts_no_span(traced: Callable[[float], Traced]) -> None:
    tracing = traced(1.0)  # parent-based: the caller's decision wins
    seen = serve([traceparent("00")])
    assert (seen.request_span, seen.instrumented, seen.recording) == (False, False, False)
    assert seen.trace_id == CALLER_TRACE
    assert tracing.sampler.answers == [(CALLER_TRACE, Decision.DROP)]
    assert tracing.started() == 0


def test_a_sampled_request_keeps_its_spans(traced: Callable[[float], Traced]) -> None:
    tracing = traced(1.0)
    seen = serve([("user-agent", "grpc-node")])
    assert (seen.request_span, seen.instrumented, seen.recording) == (True, True, True)
    spans = tracing.spans()
    assert set(spans) == {"Get", "cache.redis"}
    assert tracing.started() == 2
    server = spans["Get"]
    assert server.parent is None
    assert server.kind is SpanKind.SERVER
    assert dict(server.attributes or {}) == ATTRIBUTES
    assert spans["cache.redis"].parent == server.get_span_context()
    # The span carries the trace id the sampler was first asked about.
    assert tracing.sampler.answers[0] == (server.context.trace_id, Decision.RECORD_AND_SAMPLE)
    assert server.context.trace_flags.sampled
    assert server.context.trace_flags.random_trace_id


def test_a_sampled_callers_request_is_traced_whatever_the_ratio(
    traced: Callable[[float], Traced],
) -> None:
    tracing = traced(0.0)
    seen = serve([traceparent("01")])
    assert (seen.request_span, seen.instrumented, seen.trace_id) == (True, True, CALLER_TRACE)
    server = tracing.spans()["Get"]
    assert server.parent is not None
    assert (server.parent.trace_id, server.parent.span_id) == (CALLER_TRACE, CALLER_SPAN)
    assert tracing.spans()["cache.redis"].parent == server.get_span_context()


def test_the_ratio_sampler_keeps_its_ratio(traced: Callable[[float], Traced]) -> None:
    """Exactly the requests whose trace id the sampler kept are traced, under
    that trace id (a second, independent decision would trace a quarter at
    ratio 0.5, not a half)."""
    tracing = traced(0.5)
    kept = set()
    for _ in range(300):
        asked = len(tracing.sampler.answers)
        seen = serve()
        trace_id, decision = tracing.sampler.answers[asked]
        assert trace_id == seen.trace_id
        assert seen.request_span == (decision is Decision.RECORD_AND_SAMPLE)
        if seen.request_span:
            kept.add(trace_id)
    assert 0 < len(kept) < 300
    servers = [s for s in tracing.exported.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert {s.context.trace_id for s in servers} == kept
    assert tracing.started() == 2 * len(kept)  # Get and cache.redis of those, nothing else
