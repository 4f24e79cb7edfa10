"""A small OTLP/gRPC trace receiver: opentelemetry-proto's TraceService.Export,
counting the spans it is sent per ``service.name``, in its own process.

The tracing benchmark points cachecoord's OTLP exporter at it, so the exporter
does all of its real work (batching, serializing, a gRPC call per batch) and
the receiver does what a collector's receiver must at least do: parse the
request. Counting per service name lets several servers share one receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as service_grpc

from bench.loadgen import use_uvloop

_START_TIMEOUT = 30.0
_REPLY_TIMEOUT = 30.0


class SpanReceiver:
    """The receiver process; ``with SpanReceiver(context) as receiver``."""

    def __init__(self, context: multiprocessing.context.SpawnContext) -> None:
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child,), name="bench-otlp-receiver", daemon=True
        )
        self._process.start()
        child.close()
        try:
            if not self._conn.poll(_START_TIMEOUT):
                raise RuntimeError(f"the OTLP receiver did not start in {_START_TIMEOUT:.0f} s")
            self.port: int = self._conn.recv()
        except EOFError:
            self.close()
            raise RuntimeError(
                f"the OTLP receiver exited at start (code {self._process.exitcode})"
            ) from None
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        pid = self._process.pid
        assert pid is not None, "started in __init__"
        return pid

    @property
    def endpoint(self) -> str:
        """The value of OTEL_EXPORTER_OTLP_TRACES_ENDPOINT that reaches it."""
        return f"http://127.0.0.1:{self.port}"

    def spans(self) -> dict[str, int]:
        """Spans received so far, per service.name."""
        self._conn.send("count")
        if not self._conn.poll(_REPLY_TIMEOUT):
            raise RuntimeError("the OTLP receiver did not answer")
        counts: dict[str, int] = self._conn.recv()
        return counts

    def __enter__(self) -> SpanReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._conn.close()


class _Counting(service_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: Counter[str] = Counter()

    async def Export(  # noqa: N802  (the RPC's name)
        self, request: service_pb2.ExportTraceServiceRequest, context: Any
    ) -> service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            self.spans[service] += sum(len(scope.spans) for scope in resource_spans.scope_spans)
        return service_pb2.ExportTraceServiceResponse()


def _serve(conn: Connection) -> None:
    """Process entry point: serve until the parent sends None."""
    use_uvloop()
    asyncio.run(_main(conn))


async def _main(conn: Connection) -> None:
    counting = _Counting()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    service_grpc.add_TraceServiceServicer_to_server(counting, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn.send(port)
    loop = asyncio.get_running_loop()
    try:
        while (message := await loop.run_in_executor(None, conn.recv)) is not None:
            if message == "count":
                conn.send(dict(counting.spans))
    except EOFError:
        pass
    finally:
        await server.stop(1)
