"""The server span of an RPC: its parent comes from the caller's metadata, and
an unsampled request leaves nothing for the layers below it to record."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from opentelemetry import context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    default_getter,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from cachecoord import instruments

ATTRIBUTES = {"rpc.system": "grpc", "rpc.method": "Get"}
CALLER_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN = 0xB7AD6B7169203331


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """The server's tracer, sampling like OTEL_TRACES_SAMPLER=parentbased_always_on."""
    exported = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(1.0)))
    provider.add_span_processor(SimpleSpanProcessor(exported))
    monkeypatch.setattr(instruments, "tracer", provider.get_tracer("test"))
    return exported


def traceparent(flags: str) -> tuple[str, str]:
    return ("traceparent", f"00-{CALLER_TRACE:032x}-{CALLER_SPAN:016x}-{flags}")


def serve(metadata: Sequence[tuple[str, str | bytes]]) -> tuple[bool, bool]:
    """Run a request's block; return what the layers below saw: whether the
    request span was there and whether contrib instrumentations were on."""
    with (
        instruments.ServerSpan("cachecoord.v1.CacheCoordService/Get", metadata, ATTRIBUTES),
        instruments.span("cache.redis"),
    ):
        seen = instruments.request_span.get() is not None, is_instrumentation_enabled()
    assert instruments.request_span.get() is None
    assert trace.get_current_span() is trace.INVALID_SPAN
    return seen


def finished(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name.rsplit("/", 1)[-1]: span for span in exporter.get_finished_spans()}


def test_a_request_without_trace_context_is_a_root_span(exporter: InMemorySpanExporter) -> None:
    metadata: list[tuple[str, str | bytes]] = [("user-agent", "grpc-go"), ("x-bin", b"\x00")]
    assert serve(metadata) == (True, True)
    spans = finished(exporter)
    assert spans["Get"].parent is None
    assert spans["Get"].kind is trace.SpanKind.SERVER
    assert dict(spans["Get"].attributes or {}) == ATTRIBUTES
    assert spans["cache.redis"].parent == spans["Get"].get_span_context()


def test_the_callers_sampled_span_is_the_parent(exporter: InMemorySpanExporter) -> None:
    assert serve([("user-agent", "grpc-node"), traceparent("01")]) == (True, True)
    server = finished(exporter)["Get"]
    assert server.parent is not None
    assert (server.parent.trace_id, server.parent.span_id) == (CALLER_TRACE, CALLER_SPAN)
    assert server.parent.is_remote


def test_an_unsampled_caller_leaves_nothing_to_record(exporter: InMemorySpanExporter) -> None:
    """No span, no request span for the layers, contrib instrumentations
    suppressed; the trace id is still current (for log lines)."""
    metadata = [traceparent("00")]
    with instruments.ServerSpan("cachecoord.v1.CacheCoordService/Get", metadata, ATTRIBUTES):
        assert trace.get_current_span().get_span_context().trace_id == CALLER_TRACE
    assert serve(metadata) == (False, False)
    assert exporter.get_finished_spans() == ()
    assert is_instrumentation_enabled()


def test_the_fields_read_are_those_of_the_configured_propagator(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_PROPAGATORS may choose another format: its own header is read."""

    class Renamed(TraceContextTextMapPropagator):
        """W3C trace context under another header name."""

        def extract(
            self,
            carrier: CarrierT,
            context: Context | None = None,
            getter: Getter[CarrierT] = default_getter,
        ) -> Context:
            found = getter.get(carrier, "x-trace")
            return super().extract({"traceparent": found[0]} if found else {}, context)

        @property
        def fields(self) -> set[str]:
            return {"x-trace"}

    renamed = Renamed()
    monkeypatch.setattr(propagate, "get_global_textmap", lambda: renamed)
    assert serve([("x-trace", traceparent("01")[1])]) == (True, True)
    server = finished(exporter)["Get"]
    assert server.parent is not None
    assert server.parent.trace_id == CALLER_TRACE
    assert context.get_current() == {}
