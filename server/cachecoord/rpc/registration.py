"""Register CacheCoordService with request parsing that cannot fail.

The generated ``add_CacheCoordServiceServicer_to_server`` parses requests with
``FromString``; a request that is not valid protobuf (a string field that is
not UTF-8, garbage bytes) then makes grpc answer UNKNOWN before our code runs.
Here the same handlers are registered, built from the service descriptor, but
an unparsable request reaches the handler as :class:`Undecodable`, which the
status wrapper answers with INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["CacheCoordService"]

_HANDLER_KINDS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request message that did not parse."""

    error: str

    @property
    def message(self) -> str:
        return f"the request is not a valid protobuf message ({self.error})"


def add_to_server(servicer: object, server: grpc.aio.Server) -> None:
    handlers = {}
    for method in SERVICE.methods:
        request = getattr(pb, method.input_type.name)
        response = getattr(pb, method.output_type.name)
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_tolerant(request.FromString),
            response_serializer=response.SerializeToString,
        )
    GenericOnly(server).add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )


class GenericOnly:
    """*server* as the generated ``add_*Servicer_to_server`` functions see it:
    their handlers are served through the generic handler they also add, never
    as registered methods.

    grpc.aio's server keeps one pending request-call task per registered
    method and wakes from ``asyncio.wait`` over all of them for every call it
    accepts (15 methods with health and reflection: 44 % of a near-cache
    hit's event-loop CPU under cProfile, docs/benchmarks.md). With generic
    handlers only, one task waits for every call; finding the handler is a
    dict lookup per generic handler.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(
        self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: object) -> None:
        """Left out on purpose (see the class docstring)."""


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse_or_report(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as err:
            return Undecodable(str(err))

    return parse_or_report
