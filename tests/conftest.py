"""Fixtures: private Redis and PostgreSQL servers, and cachecoord instances.

Never the shared servers on 6379/5432, never fakes: each session starts its
own redis-server and PostgreSQL from the installed binaries, and tests that
kill or restart a backend get servers of their own.
"""

from __future__ import annotations

import os

# Tests fork (to start PostgreSQL as its own user) from a process with gRPC
# threads; gRPC's fork handlers then crash the child. Must precede `import grpc`.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio

from cachecoord.app import App
from cachecoord.config import Settings, load
from cachecoord_client import AsyncClient
from local_servers import PostgresServer, RedisCluster, RedisServer, redis_supports_cluster

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = (
    (ROOT / "examples" / "schema.sql").read_text()
    + """
-- For write-behind on a mapped table (constraints make poison entries).
CREATE TABLE IF NOT EXISTS profiles (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    score integer NOT NULL DEFAULT 0 CHECK (score >= 0)
);
"""
)

# The namespaces every test instance serves, beside the example's `users`.
NAMESPACES = """
[namespaces.users]
kind = "mapped"
table = "users"
key_column = "id"
ttl = "5m"

[namespaces.blobs]
kind = "managed"
strategy = "cache-aside"
ttl = "5m"

[namespaces.sessions]
kind = "managed"
strategy = "write-through"
ttl = "5m"

[namespaces.queued]
kind = "managed"
strategy = "write-behind"
ttl = "5m"
flush_interval = "50ms"
retry_after = "200ms"
claim_idle = "1s"
max_attempts = 3

[namespaces.profiles]
kind = "mapped"
table = "profiles"
key_column = "id"
strategy = "write-behind"
flush_interval = "50ms"
retry_after = "200ms"
claim_idle = "1s"
max_attempts = 3

[namespaces.short]
kind = "managed"
ttl = "300ms"
ttl_jitter = 0
negative_ttl = "300ms"
"""


def settings_for(
    tmp: Path, redis_url: str, postgres_url: str, extra: str = "", namespaces: str = NAMESPACES
) -> Settings:
    """Settings loaded from a real TOML file, as `cachecoord serve` would."""
    path = tmp / f"cachecoord-{uuid.uuid4().hex[:8]}.toml"
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:0"
shutdown_grace = "1s"

[redis]
url = "{redis_url}"

[postgres]
url = "{postgres_url}"
outbox_interval = "200ms"
{extra}
{namespaces}
"""
    )
    return load(path, {})


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def server_dirs() -> Iterator[Callable[[str], Path]]:
    """Directories for PostgreSQL data, outside pytest's temporary root: pytest
    makes that root private (0700) whenever any pytest process starts, which
    would lock out the `postgres` user of a server already running."""
    root = Path(tempfile.mkdtemp(prefix="cachecoord-test-"))
    root.chmod(0o755)
    yield lambda name: Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server(server_dirs: Callable[[str], Path]) -> Iterator[PostgresServer]:
    with PostgresServer(server_dirs("postgres")) as server:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
        yield server


@pytest.fixture
def own_database(postgres_server: PostgresServer) -> str:
    """A database of this test's own on the session PostgreSQL, with the schema.

    Instances that share a PostgreSQL must share one Redis too (the outbox
    drainer of any instance applies any instance's leftovers), so a test that
    runs its own Redis needs its own database."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = postgres_server.dsn.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
    return dsn


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def app(
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[App]:
    instance = App(
        settings_for(tmp_path_factory.mktemp("config"), redis_server.url, postgres_server.dsn)
    )
    await instance.start()
    yield instance
    await instance.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def client(app: App) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{app.port}") as c:
        yield c


@pytest.fixture
def key() -> str:
    """A key no other test uses."""
    return f"k-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def new_user_id() -> Callable[[], str]:
    """Ids of users rows no other test uses."""
    return lambda: str(1000 + uuid.uuid4().int % 1_000_000_000)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A private 6-node Redis Cluster (3 primaries, 3 replicas)."""
    problem = redis_supports_cluster()
    if problem is not None:
        pytest.skip(f"Redis Cluster tests need a cluster-capable redis-server: {problem}")
    with RedisCluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster
