"""The system under test: private Redis and PostgreSQL, and `cachecoord serve`.

Every benchmark starts its own servers (scripts/local_servers.py) in a directory
of its own, so it never disturbs, nor is disturbed by, the shared servers on
6379/5432 or a test run. cachecoord runs as a separate process started exactly
as an operator would (``python -m cachecoord serve --config FILE``), so its CPU
time can be read from /proc without counting the load generator or the harness.
A scenario that compares server settings (tracing, ``--workers``) starts more
cachecoord processes over the same Redis and PostgreSQL with :meth:`Stack.add_server`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from local_servers import PostgresServer, RedisServer, free_port  # noqa: E402

_HEALTH_TIMEOUT = 30.0
_STOP_TIMEOUT = 15.0
# Variables of the caller that would change what is measured: CACHECOORD_* could
# point the server elsewhere, OTEL_* would turn tracing or metrics on.
_SCRUBBED = ("CACHECOORD_", "OTEL_")


class Server:
    """One ``cachecoord serve`` process: its TOML file, log, port and pid."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        port: int,
        config: str,
        *,
        command: Sequence[str],
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.workdir = workdir
        self.config = workdir / f"{name}.toml"
        self.log = workdir / f"{name}.log"
        self.config.write_text(config)
        self._command = [*command, "serve", "--config", str(self.config), *args]
        self._env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED)}
        self._env.update(env or {})
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None, "start() first"
        return self._process.pid

    def start(self) -> None:
        """Spawn the process and wait until it reports SERVING."""
        with self.log.open("ab") as out:
            self._process = subprocess.Popen(
                self._command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self._env,
            )
        self._wait_serving()

    def stop(self) -> None:
        """SIGTERM (cachecoord drains write-behind queues and flushes spans), then wait."""
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

    def check_alive(self) -> None:
        """Raise with the server's log if it has exited (a crash mid-benchmark)."""
        assert self._process is not None
        if self._process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with code {self._process.returncode}; "
                f"{self.log}:\n{self.log_tail()}"
            )

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + _HEALTH_TIMEOUT
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


class Stack:
    """Redis, PostgreSQL (with examples/schema.sql) and one cachecoord instance
    serving *namespaces* (TOML ``[namespaces.*]`` tables). With *appendonly*,
    Redis keeps an AOF with ``appendfsync always`` (its data survives a kill).
    With ``serve=False`` only the backends start (a scenario that runs the
    server in its own process, as ``profile`` does)."""

    def __init__(
        self, workdir: Path, namespaces: str, *, appendonly: bool = False, serve: bool = True
    ) -> None:
        self.workdir = workdir
        self.redis = RedisServer(workdir / "redis", appendonly=appendonly)
        self.postgres = PostgresServer(workdir / "postgres")
        self.config = workdir / "cachecoord.toml"
        self.log = workdir / "cachecoord.log"
        self.port = 0
        self.command = [sys.executable, "-m", "cachecoord"]
        """How to run cachecoord (a profiler can wrap it: ``[python, -m, pyinstrument, ...]``)."""
        self.servers: list[Server] = []
        """Every cachecoord process started, the main one first."""
        self._namespaces = namespaces
        self._serve = serve

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.servers, "start() first"
        return self.servers[0].pid

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
        with psycopg.connect(self.postgres.dsn, autocommit=True) as conn:
            conn.execute((ROOT / "examples" / "schema.sql").read_text())
        self.port = free_port()
        if self._serve:
            self._start_server(
                Server(
                    self.workdir, "cachecoord", self.port, self.config_text(), command=self.command
                )
            )

    def add_server(
        self, name: str, *, args: Sequence[str] = (), env: Mapping[str, str] | None = None
    ) -> Server:
        """Start another ``cachecoord serve`` over the same backends and namespaces,
        on a port of its own, with extra command-line *args* and environment *env*."""
        port = free_port()
        server = Server(
            self.workdir,
            name,
            port,
            self.config_text(port),
            command=self.command,
            args=args,
            env=env,
        )
        self._start_server(server)
        return server

    def _start_server(self, server: Server) -> None:
        self.servers.append(server)  # before start: stop() must stop it even if it fails
        server.start()

    def config_text(self, port: int | None = None) -> str:
        """The TOML file a server reads (the format of tests/conftest.py); the main
        server's port unless *port* is given."""
        return f"""\
[server]
listen = "127.0.0.1:{self.port if port is None else port}"
shutdown_grace = "2s"

[redis]
url = "{self.redis.url}"

[postgres]
url = "{self.postgres.dsn}"

{self._namespaces}
"""

    def stop(self) -> None:
        """SIGTERM every cachecoord (they drain write-behind queues), then stop the backends."""
        servers, self.servers = self.servers, []
        for server in servers:
            server.stop()
        self.postgres.stop()
        self.redis.stop()

    def log_tail(self, lines: int = 30) -> str:
        if not self.servers:
            return "(no log)"
        return self.servers[0].log_tail(lines)

    def check_alive(self) -> None:
        """Raise with a server's log if one has exited (a crash mid-benchmark)."""
        assert self.servers, "start() first"
        for server in self.servers:
            server.check_alive()
