"""The only module that configures OpenTelemetry (SDK, exporters, log format).

Everything is set by the standard ``OTEL_*`` environment variables, read by
the SDK itself: ``OTEL_SERVICE_NAME`` (default ``cachecoord``),
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_EXPORTER_OTLP_ENDPOINT`` (and the
``_TRACES_``/``_METRICS_`` variants), ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc``
or ``http/protobuf``), ``OTEL_TRACES_SAMPLER`` and ``OTEL_TRACES_SAMPLER_ARG``,
``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` / ``OTEL_LOGS_EXPORTER``
(``otlp``, ``console``, ``prometheus`` for metrics, ``none``),
``OTEL_SDK_DISABLED``. With none of them set, nothing is exported and the
hot paths skip span work entirely. Log records go over OTLP too (with their
trace and span ids) when an OTLP endpoint or ``OTEL_LOGS_EXPORTER`` asks for
them, besides the lines on standard error.

The rest of the code uses only the API (``trace.get_tracer``,
``metrics.get_meter``) and asks :data:`TRACING` whether spans are wanted.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace

TRACING = False
"""True once tracing is configured: hot paths create spans only then."""
METRICS = False
"""True once metrics are configured: hot paths record them only then."""

untraced_trace_id: ContextVar[int] = ContextVar("cachecoord_untraced_trace_id", default=0)
"""The trace id of the request being served when the sampler left it out as
a new root, so that no span (not even a non-recording one) carries it; else 0.
Log lines show it."""

_DEFAULT_SERVICE = "cachecoord"


@dataclass
class Telemetry:
    """What :func:`configure` set up, to flush and stop at shutdown."""

    providers: list[Any] = field(default_factory=list)

    def shutdown(self) -> None:
        global TRACING, METRICS
        for provider in self.providers:
            provider.shutdown()
        TRACING = METRICS = False


def configure(environ: Mapping[str, str] | None = None) -> Telemetry:
    """Set up tracing and metrics as the ``OTEL_*`` variables ask; call once,
    at start-up, in the process that serves (the OTLP exporter is not
    fork-safe)."""
    global TRACING, METRICS
    env = os.environ if environ is None else environ
    telemetry = Telemetry()
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return telemetry
    traces = _exporters(env, "TRACES")
    metric_exporters = _exporters(env, "METRICS")
    logs = _exporters(env, "LOGS")
    if not traces and not metric_exporters and not logs:
        return telemetry

    from opentelemetry.sdk.resources import Resource

    # The SDK reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES itself;
    # cachecoord's name is only the default when neither names the service.
    named = env.get("OTEL_SERVICE_NAME") or "service.name" in _resource_keys(env)
    resource = Resource.create({} if named else {"service.name": _DEFAULT_SERVICE})
    if traces:
        telemetry.providers.append(_tracer_provider(resource, traces, env))
        _instrument_clients()
        TRACING = True
    if metric_exporters:
        telemetry.providers.append(_meter_provider(resource, metric_exporters, env))
        METRICS = True
    if logs:
        telemetry.providers.append(_logger_provider(resource, logs, env))
    return telemetry


class TelemetryError(Exception):
    """An ``OTEL_*`` variable asks for something cachecoord cannot do."""


_SUPPORTED = {
    "TRACES": ("otlp", "console", "none"),
    "METRICS": ("otlp", "prometheus", "console", "none"),
    "LOGS": ("otlp", "console", "none"),
}


def check(environ: Mapping[str, str] | None = None) -> None:
    """Raise TelemetryError if an exporter variable names an exporter
    cachecoord does not have (the SDK would otherwise fall back silently)."""
    env = os.environ if environ is None else environ
    for signal in _SUPPORTED:
        _exporters(env, signal)


def _exporters(env: Mapping[str, str], signal: str) -> list[str]:
    """Exporters asked for *signal*: OTEL_<SIGNAL>_EXPORTER, or otlp when an
    OTLP endpoint is configured."""
    chosen = env.get(f"OTEL_{signal}_EXPORTER")
    if chosen is None:
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
            f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    names = [name.strip().lower() for name in chosen.split(",") if name.strip()]
    unknown = [name for name in names if name not in _SUPPORTED[signal]]
    if unknown:
        raise TelemetryError(
            f"OTEL_{signal}_EXPORTER={chosen!r}: {', '.join(unknown)} is not supported; "
            f"use {', '.join(_SUPPORTED[signal])}"
        )
    return [name for name in names if name != "none"]


def _resource_keys(env: Mapping[str, str]) -> set[str]:
    """The keys OTEL_RESOURCE_ATTRIBUTES sets (``k1=v1,k2=v2``)."""
    pairs = env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
    return {pair.split("=", 1)[0].strip() for pair in pairs if "=" in pair}


def _otlp(env: Mapping[str, str], signal: str, module: str, name: str) -> Any:
    """The OTLP exporter class *name* of *signal*, over gRPC or HTTP as
    ``OTEL_EXPORTER_OTLP[_<SIGNAL>]_PROTOCOL`` says (both packages name their
    classes alike); it reads its endpoint and headers from the environment."""
    protocol = env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    transport = "http" if protocol.startswith("http") else "grpc"
    exporters = importlib.import_module(f"opentelemetry.exporter.otlp.proto.{transport}.{module}")
    return getattr(exporters, name)()


def _tracer_provider(resource: Any, exporters: list[str], env: Mapping[str, str]) -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    from cachecoord.sampling import TraceIds

    # The sampler comes from OTEL_TRACES_SAMPLER. TraceIds lets a server span
    # ask it before the span exists (an unsampled request then makes none).
    provider = TracerProvider(resource=resource, id_generator=TraceIds())
    for name in exporters:
        exporter: SpanExporter = (
            ConsoleSpanExporter()
            if name == "console"
            else _otlp(env, "TRACES", "trace_exporter", "OTLPSpanExporter")
        )
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def _meter_provider(resource: Any, exporters: list[str], env: Mapping[str, str]) -> Any:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        MetricExporter,
        MetricReader,
        PeriodicExportingMetricReader,
    )

    readers: list[MetricReader] = []
    for name in exporters:
        if name == "prometheus":
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import start_http_server

            start_http_server(
                int(env.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464")),
                env.get("OTEL_EXPORTER_PROMETHEUS_HOST", "localhost"),
            )
            readers.append(PrometheusMetricReader())
            continue
        exporter: MetricExporter = (
            ConsoleMetricExporter()
            if name == "console"
            else _otlp(env, "METRICS", "metric_exporter", "OTLPMetricExporter")
        )
        readers.append(PeriodicExportingMetricReader(exporter))
    provider = MeterProvider(resource=resource, metric_readers=readers)
    metrics.set_meter_provider(provider)
    return provider


def _logger_provider(resource: Any, exporters: list[str], env: Mapping[str, str]) -> Any:
    """Send the records of Python's logging over OTLP (or to the console):
    a handler on the root logger, beside the standard-error one."""
    from opentelemetry._logs import set_logger_provider
    from opentelemetry.instrumentation.logging.handler import LoggingHandler
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import (
        BatchLogRecordProcessor,
        ConsoleLogRecordExporter,
        LogRecordExporter,
    )

    provider = LoggerProvider(resource=resource)
    for name in exporters:
        exporter: LogRecordExporter = (
            ConsoleLogRecordExporter()
            if name == "console"
            else _otlp(env, "LOGS", "_log_exporter", "OTLPLogExporter")
        )
        provider.add_log_record_processor(BatchLogRecordProcessor(exporter))
    set_logger_provider(provider)
    handler = LoggingHandler(logger_provider=provider)
    # Not the SDK's own records (an export that failed): each would be
    # exported, fail and be logged again.
    handler.addFilter(lambda record: not record.name.startswith("opentelemetry"))
    logging.getLogger().addHandler(handler)
    return provider


def _instrument_clients() -> None:
    """Spans for every Redis command and SQL statement (contrib instrumentations)."""
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor().instrument()
    PsycopgInstrumentor().instrument(enable_commenter=False)


# -- logs ----------------------------------------------------------------------


class _TraceContext(logging.Filter):
    """Adds the current trace and span ids to every record (only the trace
    id in a request the sampler left out as a new root: it has no span)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        else:
            untraced = untraced_trace_id.get()
            record.trace_id = format(untraced, "032x") if untraced else ""
            record.span_id = ""
        return True


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "trace_id": getattr(record, "trace_id", ""),
            "span_id": getattr(record, "span_id", ""),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(level: str, json_lines: bool) -> None:
    """Log lines carry the trace and span ids of the request they belong to.
    (Values and secrets are never logged: messages name keys, not values.)"""
    handler = logging.StreamHandler()
    handler.addFilter(_TraceContext())
    handler.setFormatter(
        _JSONFormatter()
        if json_lines
        else logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s [trace=%(trace_id)s span=%(span_id)s]"
        )
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
