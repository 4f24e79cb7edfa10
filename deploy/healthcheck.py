"""grpc.health.v1 check of a cachecoord instance, for container health checks.

Exits 0 when the server answers SERVING, 1 otherwise (NOT_SERVING while it
drains after SIGTERM, unreachable, or no answer within the timeout). It needs
only grpcio and grpcio-health-checking, which the server image has:

    python healthcheck.py [HOST:PORT] [--service NAME] [--timeout SECONDS]

The Dockerfile's HEALTHCHECK and docker-compose.yml run it; Kubernetes uses
its native gRPC probe instead (deploy/k8s/deployment.yaml).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout: float = 2.0) -> bool:
    """True when *service* ("" is the whole server) on *target* is SERVING."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as err:
            print(f"{target}: {err.code().name}: {err.details()}", file=sys.stderr)
            return False
    serving: bool = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"{target}: {status}", file=sys.stderr)
    return serving


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("target", nargs="?", default="127.0.0.1:50051")
    parser.add_argument("--service", default="", help='health service name ("": the server)')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    return 0 if check(args.target, args.service, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
