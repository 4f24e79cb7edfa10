"""``cachecoord serve --config FILE`` as a real process: health, reflection,
serving, SIGTERM, configuration errors and environment overrides."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from importlib.metadata import version
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from kubelet_env import service, service_links

from cachecoord_client import AsyncClient
from conftest import NAMESPACES
from local_servers import PostgresServer, RedisServer, free_port

CLI = str(Path(sys.executable).with_name("cachecoord"))
SERVICE = "cachecoord.v1.CacheCoordService"
STARTUP_S = 30  # bound on start-up (or on failing to start)
STOP_S = 10  # bound on a SIGTERM shutdown
# Reconnect quickly while the server is still starting (the default backoff is 1 s and up).
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
]


def write_config(
    tmp: Path,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    *,
    listen: str,
    namespaces: str = NAMESPACES,
) -> Path:
    path = tmp / "cachecoord.toml"
    path.write_text(
        f"""
[server]
listen = "{listen}"
shutdown_grace = "1s"

[redis]
url = "{redis_server.url}"

[postgres]
url = "{postgres_server.dsn}"
outbox_interval = "200ms"

{namespaces}
"""
    )
    return path


def server_env(**overrides: str) -> dict[str, str]:
    """This environment without CACHECOORD_* variables, plus *overrides*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHECOORD_")}
    return {**env, **overrides}


class Serve:
    """A ``cachecoord serve`` process, its stderr in a file."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_serving(self, target: str) -> None:
        """Poll grpc.health.v1 Check at *target* until SERVING; fail if the process exits."""
        deadline = time.monotonic() + STARTUP_S
        request = health_pb2.HealthCheckRequest(service="")
        exited = asyncio.ensure_future(self.proc.wait())
        async with grpc.aio.insecure_channel(target, options=FAST_RECONNECT) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                while not exited.done():
                    if time.monotonic() > deadline:
                        raise AssertionError(f"not SERVING after {STARTUP_S} s:\n{self.output()}")
                    try:
                        response = await stub.Check(request, timeout=1)
                    except grpc.aio.AioRpcError:
                        pass  # not listening yet, or health not set yet
                    else:
                        if response.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    await asyncio.wait({exited}, timeout=0.05)  # an exit ends the pause
            finally:
                exited.cancel()
        raise AssertionError(
            f"cachecoord serve exited with {self.proc.returncode}:\n{self.output()}"
        )

    async def terminate(self) -> int:
        """SIGTERM, then the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), STOP_S)

    async def exit_code(self) -> int:
        """The exit code of a process expected to stop by itself."""
        return await asyncio.wait_for(self.proc.wait(), STARTUP_S)


@asynccontextmanager
async def serve(
    config: Path, tmp: Path, env: Mapping[str, str] | None = None
) -> AsyncIterator[Serve]:
    """Start ``cachecoord serve --config CONFIG``; kill it on the way out if still running."""
    log = tmp / f"serve-{time.monotonic_ns()}.log"
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            CLI,
            "serve",
            "--config",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            env=dict(env) if env is not None else server_env(),
        )
    try:
        yield Serve(proc, log)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def list_services(target: str) -> list[str]:
    """Service names, as `grpcurl list` gets them through server reflection."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names: list[str] = []
        async for response in call:
            names += [service.name for service in response.list_services_response.service]
        return names


async def test_serve_becomes_healthy_serves_and_stops_on_sigterm(
    redis_server: RedisServer, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, redis_server, postgres_server, listen=target)

    async with serve(config, tmp_path) as server:
        await server.wait_serving(target)

        assert SERVICE in await list_services(target)
        async with AsyncClient(target) as client:
            got = await client.get("users", "1")
        assert got.found
        assert b"Ada Lovelace" in got.value

        started = time.monotonic()
        code = await server.terminate()
        stopped_in = time.monotonic() - started

    assert code == 0, server.output()
    assert stopped_in < 5, f"took {stopped_in:.1f} s to stop"
    # Nothing a user would take for a problem, from start to stop.
    assert "Warning" not in server.output(), server.output()


async def test_health_of_the_service_itself_is_serving(
    redis_server: RedisServer, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, redis_server, postgres_server, listen=target)

    async with serve(config, tmp_path) as server:
        await server.wait_serving(target)
        async with grpc.aio.insecure_channel(target) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=5
            )
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        assert await server.terminate() == 0, server.output()


@pytest.mark.parametrize(
    ("namespace", "named"),
    [
        pytest.param('kind = "mapped"', "namespaces.x.table", id="mapped-without-table"),
        pytest.param('kind = "managed"\nttl = "soon"', "namespaces.x.ttl", id="bad-duration"),
        pytest.param('kind = "managed"\ncolour = "blue"', "namespaces.x.colour", id="unknown-key"),
        pytest.param('kind = "cached"', "namespaces.x.kind", id="bad-kind"),
    ],
)
async def test_bad_config_exits_2_naming_the_key(
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path: Path,
    namespace: str,
    named: str,
) -> None:
    config = write_config(
        tmp_path,
        redis_server,
        postgres_server,
        listen=f"127.0.0.1:{free_port()}",
        namespaces=f"[namespaces.x]\n{namespace}\n",
    )

    async with serve(config, tmp_path) as server:
        code = await server.exit_code()

    stderr = server.output()
    assert code == 2, stderr
    assert named in stderr
    assert str(config) in stderr
    assert "Traceback" not in stderr


async def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "nowhere.toml"

    async with serve(config, tmp_path) as server:
        code = await server.exit_code()

    assert code == 2, server.output()
    assert str(config) in server.output()


async def test_environment_overrides_the_listen_address_of_the_file(
    redis_server: RedisServer, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    in_file = f"127.0.0.1:{free_port()}"
    from_env = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, redis_server, postgres_server, listen=in_file)

    env = server_env(CACHECOORD_SERVER_LISTEN=from_env)
    async with serve(config, tmp_path, env) as server:
        await server.wait_serving(from_env)

        async with grpc.aio.insecure_channel(in_file) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1
                )
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert await server.terminate() == 0, server.output()


async def test_unknown_environment_setting_exits_2_naming_it(
    redis_server: RedisServer, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path, redis_server, postgres_server, listen=f"127.0.0.1:{free_port()}"
    )

    env = server_env(CACHECOORD_SERVER_LISTN="127.0.0.1:1")
    async with serve(config, tmp_path, env) as server:
        code = await server.exit_code()

    assert code == 2, server.output()
    assert "CACHECOORD_SERVER_LISTN" in server.output()


async def test_cli_variables_in_the_environment_do_not_stop_serve(
    redis_server: RedisServer, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, redis_server, postgres_server, listen=target)

    # Read by the command line (serve --log-level, the client commands), not settings.
    env = server_env(CACHECOORD_LOG_LEVEL="DEBUG", CACHECOORD_TARGET="127.0.0.1:1")
    async with serve(config, tmp_path, env) as server:
        await server.wait_serving(target)
        assert await server.terminate() == 0, server.output()


async def test_kubernetes_service_links_do_not_stop_serve(
    redis_server: RedisServer, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    # A pod of the Service cachecoord in a namespace that also runs
    # cachecoord-redis, as the kubelet gives it when service links are on.
    target = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, redis_server, postgres_server, listen=target)
    links = service_links([service("cachecoord", 50051), service("cachecoord-redis", 6379)])
    assert "CACHECOORD_PORT" in links
    async with serve(config, tmp_path, server_env(**links)) as server:
        await server.wait_serving(target)
        assert await server.terminate() == 0, server.output()


async def test_version_prints_the_installed_version() -> None:
    proc = await asyncio.create_subprocess_exec(
        CLI, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), STARTUP_S)
    assert proc.returncode == 0, err
    assert out.decode().split() == ["cachecoord", version("cachecoord")]
