"""The private Redis/PostgreSQL servers of scripts/local_servers.py: lifecycle, durability, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis

from local_servers import PostgresServer, RedisServer, _pg_reachable, _redis_reachable

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "local_servers.py"


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=5)


def test_redis_without_aof_loses_data_on_kill(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        port = server.port
        assert port not in (0, 6379)
        client = _client(server)
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()

        server.kill()
        assert not server.is_running()
        server.restart()
        assert server.port == port
        client = _client(server)
        assert client.get("k") is None
        client.close()
    assert not server.is_running()


def test_redis_appendonly_survives_kill(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", appendonly=True) as server:
        client = _client(server)
        client.set("durable", "yes")
        client.close()

        server.kill()
        server.restart()
        client = _client(server)
        assert client.get("durable") == b"yes"
        client.close()


def test_postgres_committed_row_survives_kill(tmp_path: Path) -> None:
    with PostgresServer(tmp_path / "postgres") as server:
        port = server.port
        assert port not in (0, 5432)
        with psycopg.connect(server.dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO t VALUES (1, 'kept')")

        server.kill()
        assert not server.is_running()
        server.restart()
        assert server.port == port
        with psycopg.connect(server.dsn) as conn:
            assert conn.execute("SELECT v FROM t WHERE id = 1").fetchone() == ("kept",)
    assert not server.is_running()


def _cli(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHECOORD_")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _parse(stdout: str) -> dict[str, str]:
    lines = stdout.splitlines()
    assert len(lines) == 2, stdout  # nothing but the two assignments on stdout
    return dict(line.split("=", 1) for line in lines)


def test_cli_up_down_round_trip(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    try:
        # Unreachable URLs given: falls back to private servers.
        urls = _parse(
            _cli(
                "up",
                "--state-dir",
                state,
                "--redis-url",
                "redis://127.0.0.1:1/0",
                "--database-url",
                "postgresql://postgres@127.0.0.1:1/cachecoord",
            )
        )
        redis_url, database_url = urls["CACHECOORD_REDIS_URL"], urls["CACHECOORD_DATABASE_URL"]
        assert ":6379/" not in redis_url
        assert ":5432/" not in database_url
        assert _redis_reachable(redis_url)
        assert _pg_reachable(database_url)

        # A second `up` reuses the private servers; a reachable URL given is used as is.
        assert _parse(_cli("up", "--state-dir", state)) == urls
        assert _parse(_cli("up", "--state-dir", state, "--redis-url", redis_url)) == urls
    finally:
        _cli("down", "--state-dir", state)
    assert not _redis_reachable(redis_url)
    assert not _pg_reachable(database_url)
    assert not list(Path(state).glob("*.pid"))


@pytest.mark.parametrize("server_class", [RedisServer, PostgresServer])
def test_stop_when_not_running_is_a_no_op(
    tmp_path: Path, server_class: type[RedisServer] | type[PostgresServer]
) -> None:
    server = server_class(tmp_path / "s")
    assert not server.is_running()
    server.stop()
    server.kill()
