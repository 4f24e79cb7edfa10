"""Fixtures: private Redis and PostgreSQL servers, and cachecoord instances.

Never the shared servers on 6379/5432, never fakes: each session starts its
own redis-server and PostgreSQL from the installed binaries, and tests that
kill or restart a backend get servers of their own.

A test that takes the ``backend`` fixture (or ``backend_app``,
``backend_client``, ``own_backend``) runs twice, its id ending in ``redis``
or ``cluster``: on the session's single Redis and on its 6-node Redis Cluster
(3 primaries, 3 replicas), see :class:`Backend`.
"""

from __future__ import annotations

import os

# Tests fork (to start PostgreSQL as its own user) from a process with gRPC
# threads; gRPC's fork handlers then crash the child. Must precede `import grpc`.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

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


CLUSTER_ENV = {"CACHECOORD_REDIS_CLUSTER": "true"}
"""How an operator switches cluster mode on (``[redis] cluster = true`` in the file)."""


def settings_for(
    tmp: Path,
    redis_url: str,
    postgres_url: str,
    extra: str = "",
    namespaces: str = NAMESPACES,
    *,
    cluster: bool = False,
) -> Settings:
    """Settings loaded from a real TOML file, as `cachecoord serve` would;
    *cluster*: Redis Cluster mode, from ``CACHECOORD_REDIS_CLUSTER=true``."""
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
    return load(path, CLUSTER_ENV if cluster else {})


def new_database(server: PostgresServer) -> str:
    """A new database on *server*, with the schema; its URL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = server.dsn.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
    return dsn


RedisClient = aioredis.Redis | aioredis.RedisCluster


@dataclass(frozen=True)
class Backend:
    """The Redis a test runs on, a single server (``redis``) or a cluster
    (``cluster``), with the PostgreSQL database of the instances on it
    (instances that share a database must share one Redis: the outbox drainer
    of any instance applies any instance's leftovers).

    The session's cluster is shared by every cluster test, so tests on it use
    keys or namespaces of their own instead of flushing it."""

    name: str
    urls: tuple[str, ...]  # every node; instances are given the first one's URL
    dsn: str

    @property
    def cluster(self) -> bool:
        return self.name == "cluster"

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def env(self) -> dict[str, str]:
        """The environment of an instance on this Redis (for ``config.load``)."""
        return dict(CLUSTER_ENV) if self.cluster else {}

    def settings(
        self, tmp: Path, *, url: str | None = None, extra: str = "", namespaces: str = NAMESPACES
    ) -> Settings:
        """settings_for this Redis (*url*: another node's) and database."""
        return settings_for(tmp, url or self.url, self.dsn, extra, namespaces, cluster=self.cluster)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[RedisClient]:
        """A client of this Redis as an operator would use: on the cluster, a
        cluster client (keys are routed by their hash tags)."""
        client: RedisClient = (
            aioredis.RedisCluster.from_url(self.url)
            if self.cluster
            else aioredis.Redis.from_url(self.url)
        )
        try:
            yield client
        finally:
            await client.aclose()

    async def kill_pubsub_connections(self, *, within: float = 10) -> int:
        """Cut every pub/sub connection on every node, as a network blip would;
        return how many were cut, once as many are back (every instance on this
        Redis subscribed again, so that the next test is not disturbed)."""
        before = await self._pubsub_connections()
        killed = 0
        for url in self.urls:
            node = aioredis.Redis.from_url(url, protocol=2)
            try:
                killed += int(await node.client_kill_filter(_type="pubsub"))
            finally:
                await node.aclose()
        for _ in range(int(within / 0.05)):
            if await self._pubsub_connections() >= before:
                break
            await asyncio.sleep(0.05)
        return killed

    async def _pubsub_connections(self) -> int:
        count = 0
        for url in self.urls:
            node = aioredis.Redis.from_url(url, protocol=2)
            try:
                count += len(await node.client_list(_type="pubsub"))
            finally:
                await node.aclose()
        return count


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
    return new_database(postgres_server)


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


@pytest.fixture(scope="session")
def redis_backend(redis_server: RedisServer, postgres_server: PostgresServer) -> Backend:
    """The session's single Redis, with the session's database (as ``app``'s)."""
    return Backend("redis", (redis_server.url,), postgres_server.dsn)


@pytest.fixture(scope="session")
def cluster_backend(redis_cluster: RedisCluster, postgres_server: PostgresServer) -> Backend:
    """The session's cluster, with a database of its own."""
    return Backend("cluster", tuple(redis_cluster.urls), new_database(postgres_server))


@pytest.fixture(scope="session", params=["redis", "cluster"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Runs the test on the session's single Redis, then on its cluster."""
    result: Backend = request.getfixturevalue(f"{request.param}_backend")
    return result


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cluster_app(
    cluster_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[App]:
    """The cluster's counterpart of ``app``, for one module: on a cluster, its
    write-behind flushers read each shard in a task of its own, tasks that
    come and go and would upset the leak tests of later modules, which count
    the tasks of this process."""
    instance = App(cluster_backend.settings(tmp_path_factory.mktemp("config")))
    await instance.start()
    yield instance
    await instance.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cluster_client(cluster_app: App) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{cluster_app.port}") as c:
        yield c


@pytest.fixture(scope="module")
def backend_app(backend: Backend, request: pytest.FixtureRequest) -> App:
    """The instance on the backend that a module's tests share: the session's
    ``app``, or ``cluster_app``."""
    result: App = request.getfixturevalue("cluster_app" if backend.cluster else "app")
    return result


@pytest.fixture(scope="module")
def backend_client(backend: Backend, request: pytest.FixtureRequest) -> AsyncClient:
    """A client of ``backend_app``: ``client`` or ``cluster_client``."""
    result: AsyncClient = request.getfixturevalue("cluster_client" if backend.cluster else "client")
    return result


@pytest_asyncio.fixture(loop_scope="session")
async def own_backend(
    backend: Backend, own_database: str, tmp_path: Path
) -> AsyncIterator[Backend]:
    """A Redis and a database of this test's own: a new redis-server, or on
    the cluster (too slow to start per test) the session's cluster, shared:
    there the test's instances must serve namespaces no other instance serves
    (instances serving one namespace on one Redis must share its database),
    and cut only what every instance survives (kill_pubsub_connections)."""
    if backend.cluster:
        yield replace(backend, dsn=own_database)
        return
    server = RedisServer(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    try:
        yield Backend("redis", (server.url,), own_database)
    finally:
        await asyncio.to_thread(server.stop)
