# cachecoord server image. Build from the repository root:
#   docker build -t cachecoord .
# Health: the image speaks grpc.health.v1 on the gRPC port; use the
# orchestrator's native gRPC probe (Kubernetes `grpc: {port: 50051}`) or
# `grpcurl -plaintext HOST:50051 grpc.health.v1.Health/Check`. It reports
# NOT_SERVING while draining after SIGTERM.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
RUN python -m venv /opt/cachecoord
ENV PATH=/opt/cachecoord/bin:$PATH
COPY clients/python /src/clients/python
RUN pip install --no-cache-dir /src/clients/python
COPY pyproject.toml README.md /src/
COPY server /src/server
RUN pip install --no-cache-dir /src

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --no-create-home cachecoord
COPY --from=build /opt/cachecoord /opt/cachecoord
COPY examples/cachecoord.toml /etc/cachecoord/cachecoord.toml
ENV PATH=/opt/cachecoord/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CACHECOORD_CONFIG=/etc/cachecoord/cachecoord.toml \
    CACHECOORD_SERVER_LISTEN=0.0.0.0:50051
USER 10001
EXPOSE 50051
STOPSIGNAL SIGTERM
ENTRYPOINT ["cachecoord", "serve"]
