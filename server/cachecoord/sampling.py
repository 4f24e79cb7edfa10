"""The server span's sampling decision, taken before any span exists.

The SDK's ``Tracer.start_span`` asks the sampler only after it has set up a
span: ids, a ``SpanContext``, trace flags, and for a request the sampler
leaves out a ``NonRecordingSpan`` that the instrumentations below then treat
as a span. :meth:`ServerSampling.start` asks the configured sampler first,
with its public ``should_sample`` (the sampler of ``OTEL_TRACES_SAMPLER``,
``parentbased_traceidratio`` in production), and calls ``start_span`` only
when the answer is to record. So a request left out costs one sampling
decision and makes no span object at all, and a recorded one gets exactly
the span the SDK always made.

The decision about a root span depends on its trace id (TraceIdRatioBased
samples the trace ids whose low 64 bits fall under its bound), so the span
the SDK then starts must carry the trace id the sampler was asked about, or
sampling at ratio r would record a fraction r * r. :class:`TraceIds`, the
id generator telemetry.py gives the TracerProvider, hands it over.

Imported only once tracing is configured: it imports the SDK.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Tracer
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from opentelemetry.util.types import Attributes

_chosen: ContextVar[int] = ContextVar("cachecoord_chosen_trace_id", default=0)

_NO_LINKS: Sequence[trace.Link] = ()


class TraceIds(RandomIdGenerator):
    """Random ids (the SDK's default), except that the trace id of a root
    span can be chosen just before the span is started: the one the sampler
    was asked about."""

    def generate_trace_id(self) -> int:
        return _chosen.get() or super().generate_trace_id()


@dataclass(frozen=True, slots=True)
class ServerSampling:
    """Starts server spans of *tracer* (an SDK tracer whose provider uses
    :class:`TraceIds`), asking its sampler first."""

    tracer: Tracer
    sampler: Sampler
    ids: TraceIds

    def start(
        self, name: str, parent: Context, kind: trace.SpanKind, attributes: Attributes
    ) -> tuple[trace.Span | None, int]:
        """The span the SDK starts if the sampler records the request, else
        None (no span of any kind is made); and the request's trace id (the
        caller's, or the new root's)."""
        parent_context = trace.get_current_span(parent).get_span_context()
        root = not parent_context.is_valid
        trace_id = self.ids.generate_trace_id() if root else parent_context.trace_id
        result = self.sampler.should_sample(parent, trace_id, name, kind, attributes, _NO_LINKS)
        if result.decision is Decision.DROP:
            return None, trace_id
        # The SDK asks the sampler again, about the same trace id and parent:
        # the built-in samplers answer the same.
        chosen = _chosen.set(trace_id if root else 0)
        try:
            span = self.tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
        finally:
            _chosen.reset(chosen)
        return span, trace_id


def server_sampling(tracer: trace.Tracer) -> ServerSampling | None:
    """How to start server spans of *tracer*, or None if it is not an SDK
    tracer whose ids are :class:`TraceIds`: its spans are then started the
    plain way, ``tracer.start_span``."""
    if not isinstance(tracer, Tracer) or not isinstance(tracer.id_generator, TraceIds):
        return None
    return ServerSampling(tracer, tracer.sampler, tracer.id_generator)
