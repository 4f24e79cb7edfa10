# cachecoord server image. Build from the repository root:
#   docker build -t cachecoord .
# Health: the image speaks grpc.health.v1 on the gRPC port and reports
# NOT_SERVING while draining after SIGTERM. Kubernetes probes it natively
# (`grpc: {port: 50051}`, deploy/k8s/deployment.yaml); Docker's HEALTHCHECK
# below runs deploy/healthcheck.py, a grpc.health.v1 client on the image's own
# grpcio (no grpc_health_probe binary needed). From outside:
# `grpcurl -plaintext HOST:50051 grpc.health.v1.Health/Check`.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
# Exactly the locked set (uv.lock), without the dev tools; the version of uv
# is the one pyproject.toml requires.
RUN pip install --no-cache-dir uv==0.13.9
ENV UV_PROJECT_ENVIRONMENT=/opt/cachecoord \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
COPY pyproject.toml uv.lock README.md LICENSE /src/
COPY clients/python /src/clients/python
RUN uv sync --locked --no-dev --no-editable --no-install-project
COPY server /src/server
RUN uv sync --locked --no-dev --no-editable

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --no-create-home cachecoord
COPY --from=build /opt/cachecoord /opt/cachecoord
COPY examples/cachecoord.toml /etc/cachecoord/cachecoord.toml
COPY deploy/healthcheck.py /opt/cachecoord/healthcheck.py
ENV PATH=/opt/cachecoord/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CACHECOORD_CONFIG=/etc/cachecoord/cachecoord.toml \
    CACHECOORD_SERVER_LISTEN=0.0.0.0:50051
USER 10001
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "/opt/cachecoord/healthcheck.py", "127.0.0.1:50051"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["cachecoord", "serve"]
