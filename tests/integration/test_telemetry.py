"""Traces and metrics reach a real OTLP/gRPC receiver, over the network, from a
`cachecoord serve` process; the caller's trace continues in the server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from opentelemetry import propagate, trace
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs_pb
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc as logs_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_pb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as metrics_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2_grpc as pb_grpc
from local_servers import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Receiver(
    trace_grpc.TraceServiceServicer,
    metrics_grpc.MetricsServiceServicer,
    logs_grpc.LogsServiceServicer,
):
    """A minimal OTLP/gRPC collector: keeps what it is sent."""

    spans: list[Any] = field(default_factory=list)
    log_records: list[Any] = field(default_factory=list)
    metric_names: set[str] = field(default_factory=set)
    resources: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
        if isinstance(request, trace_pb.ExportTraceServiceRequest):
            for resource_spans in request.resource_spans:
                self.resources.append(attributes(resource_spans.resource))
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)
            self.arrived.set()
            return trace_pb.ExportTraceServiceResponse()
        if isinstance(request, logs_pb.ExportLogsServiceRequest):
            for resource_logs in request.resource_logs:
                for scope_logs in resource_logs.scope_logs:
                    self.log_records.extend(scope_logs.log_records)
            self.arrived.set()
            return logs_pb.ExportLogsServiceResponse()
        for resource_metrics in request.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                self.metric_names.update(m.name for m in scope_metrics.metrics)
        self.arrived.set()
        return metrics_pb.ExportMetricsServiceResponse()

    def named(self, name: str) -> list[Any]:
        return [span for span in self.spans if span.name == name]


def attributes(span: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in span.attributes:
        kind = item.value.WhichOneof("value")
        values[item.key] = getattr(item.value, kind) if kind else None
    return values


@pytest_asyncio.fixture(loop_scope="session")
async def receiver() -> AsyncIterator[tuple[Receiver, int]]:
    collector = Receiver()
    server = grpc.aio.server()
    trace_grpc.add_TraceServiceServicer_to_server(collector, server)
    metrics_grpc.add_MetricsServiceServicer_to_server(collector, server)
    logs_grpc.add_LogsServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield collector, port
    await server.stop(0)


@asynccontextmanager
async def serving_traced(
    receiver_port: int, redis_url: str, database: str, tmp_path: Path, **env: str
) -> AsyncIterator[int]:
    """`cachecoord serve` with tracing at 100% and metrics, exporting to the
    receiver on *receiver_port*; *env* adds or (empty) removes variables."""
    port = free_port()
    config = tmp_path / f"traced-{port}.toml"
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "1s"
instance_id = "traced"
[redis]
url = "{redis_url.rsplit("/", 1)[0]}/3"
[postgres]
url = "{database}"
[namespaces.users]
kind = "mapped"
table = "users"
key_column = "id"
[namespaces.queued]
kind = "managed"
strategy = "write-behind"
flush_interval = "50ms"
[namespaces.blobs]
kind = "managed"
"""
    )
    environment = {
        **os.environ,
        "OTEL_SERVICE_NAME": "cachecoord-under-test",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "1.0",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        **env,
    }
    environment = {k: v for k, v in environment.items() if v}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cachecoord", "serve", "--config", str(config), env=environment
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            # A cold start (first import of the SDK and instrumentations) is slow.
            await asyncio.wait_for(channel.channel_ready(), 90)
        yield port
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 15)


@pytest_asyncio.fixture(loop_scope="session")
async def traced_server(
    receiver: tuple[Receiver, int],
    redis_server: RedisServer,
    own_database: str,
    tmp_path: Path,
) -> AsyncIterator[int]:
    """`cachecoord serve` with tracing at 100% and metrics, exporting to the receiver."""
    async with serving_traced(receiver[1], redis_server.url, own_database, tmp_path) as port:
        yield port


async def test_server_span_continues_the_callers_trace_with_cache_attributes(
    receiver: tuple[Receiver, int], traced_server: int
) -> None:
    collector, _ = receiver
    tracer = TracerProvider().get_tracer("test-client")  # the caller's own SDK
    async with grpc.aio.insecure_channel(f"127.0.0.1:{traced_server}") as channel:
        stub = pb_grpc.CacheCoordServiceStub(channel)
        with tracer.start_as_current_span("client-get") as client_span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            await stub.Get(
                pb.GetRequest(namespace="users", key="1"), metadata=tuple(carrier.items())
            )
            await stub.Get(
                pb.GetRequest(namespace="users", key="1"), metadata=tuple(carrier.items())
            )
    client_context = client_span.get_span_context()
    for _ in range(100):
        gets = collector.named("cachecoord.v1.CacheCoordService/Get")
        if len(gets) >= 2 and collector.named("cache.load"):
            break
        await asyncio.sleep(0.05)
    assert len(gets) >= 2
    first, second = gets[0], gets[1]
    assert first.trace_id == client_context.trace_id.to_bytes(16, "big")
    assert first.parent_span_id == client_context.span_id.to_bytes(8, "big")
    assert first.kind == trace.SpanKind.SERVER.value + 1  # OTLP enums are offset by one
    miss, hit = attributes(first), attributes(second)
    assert miss["rpc.system"] == "grpc"
    assert miss["rpc.method"] == "Get"
    assert miss["rpc.grpc.status_code"] == 0
    assert (miss["cache.namespace"], miss["cache.hit"], miss["cache.layer"]) == (
        "users",
        False,
        "database",
    )
    assert (hit["cache.hit"], hit["cache.layer"], hit["cache.stale"]) == (True, "redis", False)
    assert miss["cache.strategy"] == "cache-aside"
    # Children of the miss: the cache layers, and the Redis and SQL calls themselves.
    children = {span.name for span in collector.spans if span.parent_span_id == first.span_id}
    assert {"cache.redis", "cache.load", "cache.fill"} <= children
    load = collector.named("cache.load")[0]
    sql = [s for s in collector.spans if s.parent_span_id == load.span_id]
    assert sql
    assert attributes(sql[0]).get("db.system") == "postgresql"
    redis_calls = [s for s in collector.spans if attributes(s).get("db.system") == "redis"]
    assert redis_calls


async def test_an_unsampled_request_creates_no_span_at_all(
    receiver: tuple[Receiver, int], traced_server: int
) -> None:
    """A caller whose trace is not sampled (traceparent flags 00): the server
    span does not record, and neither do the cache layers nor the Redis and SQL
    calls under it; the next, sampled, request is traced down to its SQL."""
    collector, _ = receiver
    callers = {
        "unsampled": TracerProvider(sampler=ALWAYS_OFF).get_tracer("test-client"),
        "sampled": TracerProvider().get_tracer("test-client"),
    }
    trace_ids: dict[str, bytes] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{traced_server}") as channel:
        stub = pb_grpc.CacheCoordServiceStub(channel)
        for name, tracer in callers.items():  # the unsampled one first
            with tracer.start_as_current_span("client-get") as client_span:
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
                # A miss of an absent row: Redis lookup, lease, SQL load.
                await stub.Get(
                    pb.GetRequest(namespace="users", key=f"5{len(trace_ids)}5151"),
                    metadata=tuple(carrier.items()),
                )
            sampled_flag = int(carrier["traceparent"][-2:], 16) & 1
            assert sampled_flag == (name == "sampled")
            trace_ids[name] = client_span.get_span_context().trace_id.to_bytes(16, "big")

    def of(name: str) -> list[Any]:
        return [span for span in collector.spans if span.trace_id == trace_ids[name]]

    def systems() -> set[Any]:
        return {attributes(s).get("db.system") for s in of("sampled")}

    for _ in range(100):  # exported in batches, in the order they end
        if {"postgresql", "redis"} <= systems() and "cache.load" in {s.name for s in of("sampled")}:
            break
        await asyncio.sleep(0.05)
    assert {"cache.redis", "cache.load"} <= {span.name for span in of("sampled")}
    assert {"postgresql", "redis"} <= systems()
    assert of("unsampled") == []


async def test_error_status_is_on_the_span_and_metrics_arrive(
    receiver: tuple[Receiver, int], traced_server: int
) -> None:
    collector, _ = receiver
    async with grpc.aio.insecure_channel(f"127.0.0.1:{traced_server}") as channel:
        stub = pb_grpc.CacheCoordServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Get(pb.GetRequest(namespace="nope", key="1"))
        await stub.Put(pb.PutRequest(namespace="queued", key="k", value=b"v"))
        await stub.Get(pb.GetRequest(namespace="users", key="424242"))  # a miss
    wanted = {
        "cachecoord.requests",
        "cachecoord.cache.misses",
        "cachecoord.invalidations.published",
        "cachecoord.write_behind.queue.depth",
        "rpc.server.call.duration",
    }
    for _ in range(100):
        failed = [
            s
            for s in collector.named("cachecoord.v1.CacheCoordService/Get")
            if attributes(s).get("rpc.grpc.status_code") == grpc.StatusCode.NOT_FOUND.value[0]
        ]
        if failed and collector.named("cache.flush") and wanted <= collector.metric_names:
            break
        await asyncio.sleep(0.05)
    assert failed
    assert wanted <= collector.metric_names
    flush = collector.named("cache.flush")[0]
    put = collector.named("cachecoord.v1.CacheCoordService/Put")[0]
    assert any(link.span_id == put.span_id for link in flush.links)  # flush links to the Put
    assert attributes(flush)["messaging.system"] == "redis"


async def test_streams_work_and_are_traced(
    receiver: tuple[Receiver, int], traced_server: int
) -> None:
    collector, _ = receiver
    async with grpc.aio.insecure_channel(f"127.0.0.1:{traced_server}") as channel:
        stub: Any = pb_grpc.CacheCoordServiceStub(channel)
        watch = stub.Watch(pb.WatchRequest(namespaces=["users"]))
        first = await watch.read()
        assert first.WhichOneof("event") == "reset"
        await stub.Invalidate(pb.InvalidateRequest(namespace="users", keys=["2"]))
        event = await watch.read()
        assert event.invalidation.key == "2"
        watch.cancel()
        hold = stub.HoldLock()
        await hold.write(
            pb.HoldLockRequest(acquire=pb.HoldLockRequest.Acquire(name="traced", ttl_ms=5000))
        )
        acquired = await hold.read()
        assert acquired.acquired.token
        await hold.done_writing()
        assert await hold.read() is grpc.aio.EOF  # type: ignore[attr-defined]
        assert await hold.code() == grpc.StatusCode.OK
    for _ in range(100):
        if collector.named("cachecoord.v1.CacheCoordService/HoldLock") and collector.named(
            "cachecoord.v1.CacheCoordService/Watch"
        ):
            break
        await asyncio.sleep(0.05)
    assert (
        attributes(collector.named("cachecoord.v1.CacheCoordService/HoldLock")[0])[
            "rpc.grpc.status_code"
        ]
        == 0
    )
    assert collector.named("cachecoord.v1.CacheCoordService/Watch")


async def test_a_nodejs_callers_trace_continues_in_the_server(
    receiver: tuple[Receiver, int], traced_server: int
) -> None:
    """The Node.js client (clients/node, @grpc/grpc-js) sends its own W3C
    traceparent: the server spans of its calls are children of that span."""
    collector, _ = receiver
    node = shutil.which("node")
    program = ROOT / "clients" / "node" / "dist" / "e2e" / "e2e.js"
    assert node, "node is not installed"
    assert program.exists(), "run `make node-client`"
    process = await asyncio.create_subprocess_exec(
        node,
        str(program),
        f"127.0.0.1:{traced_server}",
        f"traced-{os.getpid()}-",
        cwd=program.parents[2],
        stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, output.decode()
    result = json.loads(
        next(line for line in output.decode().splitlines() if line.startswith("RESULT "))[7:]
    )
    _, trace_id, parent_id, _ = result["traceparent"].split("-")
    for _ in range(100):
        children = [
            span
            for span in collector.spans
            if span.trace_id.hex() == trace_id and span.parent_span_id.hex() == parent_id
        ]
        if {"Get", "Put", "Watch"} <= {span.name.rsplit("/", 1)[-1] for span in children}:
            break
        await asyncio.sleep(0.05)
    assert {"Get", "BatchGet", "Put", "Watch", "AcquireLock"} <= {
        span.name.rsplit("/", 1)[-1] for span in children
    }


async def test_an_idle_instance_exports_no_span(
    receiver: tuple[Receiver, int], traced_server: int
) -> None:
    """100 % sampling, no traffic: the background loops (write-behind flusher
    polling its queue, outbox drainer, change listener, invalidation bus)
    export nothing, however many times they poll (the flusher polls every
    50 ms here, the outbox every second)."""
    collector, _ = receiver
    await asyncio.sleep(1)  # whatever start-up exported has arrived
    before = len(collector.spans)

    await asyncio.sleep(3)

    idle = collector.spans[before:]
    assert [span.name for span in idle] == []


async def test_background_spans_are_work_done_linked_to_the_requests(
    receiver: tuple[Receiver, int], traced_server: int
) -> None:
    """Under load, every exported span belongs to a request's trace or is
    background work that did something: a flush (linked to the Puts it wrote)
    and the Redis and SQL calls under it."""
    collector, _ = receiver
    await asyncio.sleep(1)
    before = len(collector.spans)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{traced_server}") as channel:
        stub = pb_grpc.CacheCoordServiceStub(channel)
        for n in range(20):
            await stub.Put(pb.PutRequest(namespace="queued", key=f"load-{n % 5}", value=b"v"))
            await stub.Get(pb.GetRequest(namespace="users", key=str(1 + n % 3)))
    for _ in range(100):
        if collector.named("cache.flush") and len(collector.spans) > before:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1)  # the last flush and its children
    spans = collector.spans[before:]
    requests = {
        span.trace_id for span in spans if span.name.startswith("cachecoord.v1.CacheCoordService/")
    }
    puts = {span.span_id for span in spans if span.name == "cachecoord.v1.CacheCoordService/Put"}
    roots = {span.trace_id: span for span in spans if not span.parent_span_id}
    background = {t: root for t, root in roots.items() if t not in requests}

    assert requests
    assert {root.name for root in background.values()} == {"cache.flush"}
    for root in background.values():
        assert root.links, "a flush links to the Puts it writes"
        assert {link.span_id for link in root.links} <= puts
    orphans = [s.name for s in spans if s.trace_id not in requests and s.trace_id not in roots]
    assert orphans == []


async def test_resource_attributes_name_the_service_when_otel_service_name_does_not(
    receiver: tuple[Receiver, int], redis_server: RedisServer, own_database: str, tmp_path: Path
) -> None:
    collector, port = receiver
    attributes_env = "service.name=orders-cache,deployment.environment.name=staging"
    async with serving_traced(
        port,
        redis_server.url,
        own_database,
        tmp_path,
        OTEL_SERVICE_NAME="",
        OTEL_RESOURCE_ATTRIBUTES=attributes_env,
    ) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server}") as channel:
            await pb_grpc.CacheCoordServiceStub(channel).Get(
                pb.GetRequest(namespace="users", key="1")
            )
        for _ in range(100):
            if collector.resources:
                break
            await asyncio.sleep(0.05)

    assert collector.resources
    for resource in collector.resources:
        assert resource["service.name"] == "orders-cache"
        assert resource["deployment.environment.name"] == "staging"


async def test_semantic_convention_opt_in_gives_the_stable_database_attributes(
    receiver: tuple[Receiver, int], redis_server: RedisServer, own_database: str, tmp_path: Path
) -> None:
    """OTEL_SEMCONV_STABILITY_OPT_IN=database (README Tracing): the Redis and
    SQL spans carry db.system.name and not the old db.system."""
    collector, port = receiver
    async with serving_traced(
        port, redis_server.url, own_database, tmp_path, OTEL_SEMCONV_STABILITY_OPT_IN="database"
    ) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server}") as channel:
            await pb_grpc.CacheCoordServiceStub(channel).Get(
                pb.GetRequest(namespace="users", key="31337")  # a miss: Redis, then SQL
            )
        for _ in range(100):
            systems = {attributes(s).get("db.system.name") for s in collector.spans}
            if {"redis", "postgresql"} <= systems:
                break
            await asyncio.sleep(0.05)

    assert {"redis", "postgresql"} <= systems
    assert not [s.name for s in collector.spans if "db.system" in attributes(s)]


@pytest.mark.parametrize(
    ("variable", "value"),
    [("OTEL_TRACES_EXPORTER", "zipkin"), ("OTEL_METRICS_EXPORTER", "otlp,statsd")],
)
async def test_an_unsupported_exporter_stops_start_up_with_a_clear_error(
    variable: str, value: str, tmp_path: Path
) -> None:
    config = tmp_path / "cachecoord.toml"
    # Backends nobody listens on: start-up must stop before it reaches them.
    config.write_text(
        '[server]\nlisten = "127.0.0.1:0"\n[redis]\nurl = "redis://127.0.0.1:1/0"\n'
        '[postgres]\nurl = "postgresql://127.0.0.1:1/postgres"\n'
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cachecoord",
        "serve",
        "--config",
        str(config),
        env={**os.environ, variable: value},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 2
    (line,) = err.decode().strip().splitlines()
    assert variable in line


async def test_log_records_are_exported_over_otlp(
    receiver: tuple[Receiver, int], traced_server: int
) -> None:
    # The collector's logs pipeline (deploy/otel-collector.yaml) gets the
    # server's log records, not only its standard error.
    collector, _ = receiver

    def bodies() -> list[str]:
        return [record.body.string_value for record in collector.log_records]

    for _ in range(100):
        if any("serving on port" in body for body in bodies()):
            break
        await asyncio.sleep(0.1)
    assert any("serving on port" in body for body in bodies()), bodies()[:5]
