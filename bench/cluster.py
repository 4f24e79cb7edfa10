"""Several `cachecoord serve` processes over one private Redis (or Redis
Cluster) and PostgreSQL.

The single-instance :class:`bench.stack.Stack` covers the throughput scenarios;
coordination across instances (leases, fill notices) needs more than one
server. Each instance is started exactly as an operator would start it, with
its own TOML file, port and log, and the cluster waits until every one reports
SERVING. A *prepare* step runs against PostgreSQL (as its superuser) before
any instance starts, because cachecoord checks mapped tables at start-up; it
returns the URL the instances connect with (e.g. as a role of its own).

With ``redis_cluster`` (``python -m bench SCENARIO --cluster``), Redis is a
private Redis Cluster of 3 primaries and 3 replicas (``local_servers.RedisCluster``)
and every instance runs with ``redis.cluster = true``; a scenario's own Redis
commands go through :meth:`Cluster.redis_client`, which picks the client that
fits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

import bench.stack  # noqa: F401  (puts scripts/ on sys.path for local_servers)
from local_servers import PostgresServer, RedisCluster, RedisServer, free_port

_HEALTH_TIMEOUT = 30.0
_STOP_TIMEOUT = 15.0

AsyncRedis = aioredis.Redis | aioredis.RedisCluster
"""A scenario's own asyncio client of the stack's Redis or Redis Cluster."""


class Instance:
    """One ``python -m cachecoord serve --config FILE`` process."""

    def __init__(self, workdir: Path, name: str, port: int, config: str) -> None:
        self.name = name
        self.port = port
        self.workdir = workdir
        self.config = workdir / f"{name}.toml"
        self.log = workdir / f"{name}.log"
        self.config.write_text(config)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None, "start() first"
        return self._process.pid

    def start(self) -> None:
        """Spawn the process; :meth:`wait_serving` waits for it."""
        with self.log.open("ab") as out:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "cachecoord", "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # Only the file's settings: a CACHECOORD_* variable of the caller
                # must not point the server elsewhere.
                env={k: v for k, v in os.environ.items() if not k.startswith("CACHECOORD_")},
            )

    def wait_serving(self, deadline: float) -> None:
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                self.check_alive()
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name} did not report SERVING within {_HEALTH_TIMEOUT:.0f} s; "
                        f"{self.log}:\n{self.log_tail()}"
                    )
                time.sleep(0.1)

    def check_alive(self) -> None:
        """Raise with the log's tail if the process has exited."""
        assert self._process is not None
        if self._process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with code {self._process.returncode}; "
                f"{self.log}:\n{self.log_tail()}"
            )

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Cluster:
    """Redis (a Redis Cluster with *redis_cluster*), PostgreSQL and *instances*
    cachecoord processes serving *namespaces*; ``with Cluster(...) as cluster``."""

    def __init__(
        self,
        workdir: Path,
        namespaces: str,
        *,
        instances: int,
        prepare: Callable[[str], str],
        redis_cluster: bool = False,
    ) -> None:
        self.workdir = workdir
        self.redis_cluster = redis_cluster
        self.redis: RedisServer | RedisCluster = (
            RedisCluster(workdir / "redis-cluster")
            if redis_cluster
            else RedisServer(workdir / "redis")
        )
        self.postgres = PostgresServer(workdir / "postgres")
        self.database_url = ""
        """The URL the instances connect with (what *prepare* returned)."""
        self.instances: list[Instance] = []
        self._namespaces = namespaces
        self._count = instances
        self._prepare = prepare

    @property
    def targets(self) -> list[str]:
        return [instance.target for instance in self.instances]

    def describe_redis(self) -> str:
        """What the instances use as Redis, for the scenario's first lines."""
        if isinstance(self.redis, RedisCluster):
            ports = ", ".join(str(node.port) for node in self.redis.nodes)
            return (
                f"a private Redis Cluster of {self.redis.primaries} primaries + "
                f"{self.redis.primaries * self.redis.replicas} replicas "
                f"(127.0.0.1 ports {ports}; redis.cluster = true)"
            )
        return f"one private Redis on 127.0.0.1:{self.redis.port}"

    def redis_client(self, connections: int = 64) -> AsyncRedis:
        """An asyncio client (RESP2, as cachecoord's) for the scenario's own commands.

        One Redis: a blocking pool of *connections* (a burst waits for a free
        one). A cluster: ``redis.asyncio.cluster.RedisCluster``, which finds every
        node from one and sends each command to the primary of its key's slot
        (cachecoord's keys carry a hash tag, e.g. ``cc:{<namespace>:<partition>}:v:<key>``).
        Its per-node pools cannot make a caller wait (a burst past their size
        fails with MaxConnectionsError), so they are not bounded."""
        if isinstance(self.redis, RedisCluster):
            return aioredis.RedisCluster.from_url(self.redis.url, max_connections=2**31, protocol=2)
        pool = aioredis.BlockingConnectionPool.from_url(
            self.redis.url, max_connections=connections, timeout=30, protocol=2
        )
        return aioredis.Redis(connection_pool=pool)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.redis.start()
        self.postgres.start()
        self.database_url = self._prepare(self.postgres.dsn)
        for number in range(self._count):
            name, port = f"cachecoord-{number + 1}", free_port()
            instance = Instance(self.workdir, name, port, self._config(name, port))
            self.instances.append(instance)
            instance.start()
        deadline = time.monotonic() + _HEALTH_TIMEOUT
        for instance in self.instances:
            instance.wait_serving(deadline)

    def check_alive(self) -> None:
        for instance in self.instances:
            instance.check_alive()

    def stop(self) -> None:
        """SIGTERM every instance, then stop the backends."""
        for instance in self.instances:
            instance.stop()
        self.postgres.stop()
        self.redis.stop()

    def _config(self, name: str, port: int) -> str:
        return f"""\
[server]
listen = "127.0.0.1:{port}"
instance_id = "{name}"
shutdown_grace = "2s"

[redis]
url = "{self.redis.url}"
cluster = {"true" if self.redis_cluster else "false"}

[postgres]
url = "{self.database_url}"

{self._namespaces}
"""
