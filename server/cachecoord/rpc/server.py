"""Assemble the gRPC server: our service, grpc.health.v1 and reflection, on
a plaintext or TLS port; and, if configured, a plaintext health-only server.

Health and reflection are never behind a bearer token (the auth check lives
in the CacheCoordService handlers only): probes need no secret, and
reflection reveals only the public contract. With TLS on they are served
over TLS like everything on the main port, so probes that cannot speak TLS
(or have no client certificate) use ``server.health_listen``: a second grpc
server, not a second port of the first, because every port of a server
serves all of its services.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Public as grpc_health.v1.health.aio.HealthServicer, which mypy cannot see.
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from cachecoord.config import ServerSettings, TlsSettings
from cachecoord.rpc import registration
from cachecoord.rpc.servicer import CacheCoordServicer
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2_grpc as pb_grpc

SERVICE_NAME = registration.SERVICE.full_name


# A HoldLock stream holds its lock until the connection under it dies. A
# killed client process closes its socket, which ends the stream at once; a
# client whose host died, froze or was cut off is found by HTTP/2 keepalive:
# ping every 20 s, drop the connection if no answer comes within 10 s. grpc
# core (1.85) times a keepalive ping out after grpc.http2.ping_timeout_ms
# (default 60 s), not after grpc.keepalive_timeout_ms, so both are set.
# Clients may ping every 10 s (the default refuses more than one in 5 min).
KEEPALIVE: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


class StartupError(RuntimeError):
    """The server could not start; the message says why."""


class _DrainingHealth(HealthServicer):  # type: ignore[misc]  # untyped in grpcio-health
    """grpc.health.v1 that also tells *on_drain* when the server starts draining."""

    def __init__(self, on_drain: Callable[[], None]) -> None:
        super().__init__()
        self._on_drain = on_drain

    async def enter_graceful_shutdown(self) -> None:
        self._on_drain()
        await super().enter_graceful_shutdown()


def build(
    servicer: pb_grpc.CacheCoordServiceServicer,
    settings: ServerSettings,
    tls: TlsSettings | None = None,
) -> tuple[grpc.aio.Server, HealthServicer, int]:
    """A started-to-be server bound to settings.listen (TLS if *tls* is
    enabled); returns it, its health servicer and the bound port. Call inside
    the running event loop."""
    options: list[tuple[str, Any]] = [
        # grpc turns SO_REUSEPORT on by default: a second server on the same
        # port would silently share it. Only `serve --workers N` asks for it.
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        ("grpc.max_connection_age_ms", settings.max_connection_age),
        ("grpc.max_connection_age_grace_ms", settings.max_connection_age_grace),
        ("grpc.max_receive_message_length", settings.max_value_bytes + 1_048_576),
        *KEEPALIVE,
    ]
    server = grpc.aio.server(options=options)
    # Our service first: the generic handlers are asked in this order.
    registration.add_to_server(servicer, server)
    health_servicer = HealthServicer()
    if isinstance(servicer, CacheCoordServicer):
        # A HoldLock stream outlives no connection: it hands its lock off
        # before the connection's grace can run out, and when the server
        # drains (reported through health, which the shutdown does first).
        servicer.handoffs.every = settings.max_connection_age_grace / 2000
        servicer.hold_first_message_timeout = settings.lock_first_message_timeout / 1000
        health_servicer = _DrainingHealth(servicer.handoffs.drain)
    generic = registration.GenericOnly(server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, generic)
    names = (
        SERVICE_NAME,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    # What reflection.enable_server_reflection does for a grpc.aio server.
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        ReflectionServicer(names),
        generic,
    )
    try:
        if tls is not None and tls.enabled:
            port = server.add_secure_port(settings.listen, _credentials(tls))
        else:
            port = server.add_insecure_port(settings.listen)
    except RuntimeError as err:
        raise StartupError(f"cannot listen on {settings.listen} (server.listen): {err}") from None
    return server, health_servicer, port


def build_health(health_servicer: HealthServicer, listen: str) -> tuple[grpc.aio.Server, int]:
    """A plaintext server answering only grpc.health.v1 from *health_servicer*
    (the main server's, so draining shows on both); returns it and its port."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as err:
        raise StartupError(f"cannot listen on {listen} (server.health_listen): {err}") from None
    return server, port


def _credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """Server credentials from the PEM files (checked when the settings were
    loaded); with a client CA, clients must present a certificate it signed."""
    try:
        cert = Path(tls.cert_file).read_bytes()
        key = Path(tls.key_file).read_bytes()
        ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    except OSError as err:
        raise StartupError(f"cannot read a [tls] file: {err}") from None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


async def set_serving(health_servicer: HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
