"""The system under test: private Redis and PostgreSQL, and `cachecoord serve`.

Every benchmark starts its own servers (scripts/local_servers.py) in a directory
of its own, so it never disturbs, nor is disturbed by, the shared servers on
6379/5432 or a test run. cachecoord runs as a separate process started exactly
as an operator would (``python -m cachecoord serve --config FILE``), so its CPU
time can be read from /proc without counting the load generator or the harness.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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


class Stack:
    """Redis, PostgreSQL (with examples/schema.sql) and one cachecoord instance
    serving *namespaces* (TOML ``[namespaces.*]`` tables). With *appendonly*,
    Redis keeps an AOF with ``appendfsync always`` (its data survives a kill)."""

    def __init__(self, workdir: Path, namespaces: str, *, appendonly: bool = False) -> None:
        self.workdir = workdir
        self.redis = RedisServer(workdir / "redis", appendonly=appendonly)
        self.postgres = PostgresServer(workdir / "postgres")
        self.config = workdir / "cachecoord.toml"
        self.log = workdir / "cachecoord.log"
        self.port = 0
        self.command = [sys.executable, "-m", "cachecoord"]
        """How to run cachecoord (a profiler can wrap it: ``[python, -m, pyinstrument, ...]``)."""
        self._namespaces = namespaces
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None, "start() first"
        return self._process.pid

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
        self.config.write_text(self.config_text())
        with self.log.open("ab") as out:
            self._process = subprocess.Popen(
                [*self.command, "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # Only the file's settings: a CACHECOORD_* variable in the caller's
                # environment must not point the server elsewhere.
                env={k: v for k, v in os.environ.items() if not k.startswith("CACHECOORD_")},
            )
        self._wait_serving()

    def config_text(self) -> str:
        """The TOML file the server reads (the format of tests/conftest.py)."""
        return f"""\
[server]
listen = "127.0.0.1:{self.port}"
shutdown_grace = "2s"

[redis]
url = "{self.redis.url}"

[postgres]
url = "{self.postgres.dsn}"

{self._namespaces}
"""

    def stop(self) -> None:
        """SIGTERM cachecoord (it drains write-behind queues), then stop the backends."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.postgres.stop()
        self.redis.stop()

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
                f"cachecoord exited with code {self._process.returncode}; "
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
                        f"cachecoord did not report SERVING within {_HEALTH_TIMEOUT:.0f} s; "
                        f"{self.log}:\n{self.log_tail()}"
                    )
                time.sleep(0.1)
