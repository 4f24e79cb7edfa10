"""TLS, mutual TLS, the plaintext health port, and bearer tokens with
per-namespace permissions, through real gRPC against real instances.

The certificates are made for each run (tests/tls_certs.py: a CA, a server
certificate for 127.0.0.1 and localhost, client certificates). Secrets
never reach the logs: one test runs ``cachecoord serve`` as a process with
tokens from a file and from the environment and searches its output for them.
"""

from __future__ import annotations

import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from cli_support import cachecoord
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_serve import list_services, serve, server_env
from tls_certs import Identity, Pki, make_pki

from cachecoord.app import App, StartupError
from cachecoord.config import Settings, load
from cachecoord.rpc import auth, registration
from cachecoord_client import AsyncClient, CacheCoordError
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2_grpc as pb_grpc
from local_servers import PostgresServer, RedisServer, free_port

Code = grpc.StatusCode

# Two namespaces are enough here; no write-behind, so no flusher competes
# with the session instance's.
NAMESPACES = """
[namespaces.users]
kind = "mapped"
table = "users"
key_column = "id"

[namespaces.blobs]
kind = "managed"
"""


# -- certificates and instances ------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def credentials(pki: Pki, identity: Identity | None = None) -> grpc.ChannelCredentials:
    """Trust the test CA; present *identity*'s certificate if given."""
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert,
        private_key=identity.key if identity else None,
        certificate_chain=identity.cert if identity else None,
    )


def config_text(
    redis_url: str,
    postgres_url: str,
    server: str = "",
    sections: str = "",
    listen: str = "127.0.0.1:0",
) -> str:
    return f"""
[server]
listen = "{listen}"
instance_id = "security-{uuid.uuid4().hex[:8]}"
shutdown_grace = "1s"
{server}

[redis]
url = "{redis_url}"

[postgres]
url = "{postgres_url}"
outbox_interval = "200ms"

{sections}
{NAMESPACES}
"""


def load_config(tmp: Path, text: str, environ: Mapping[str, str] | None = None) -> Settings:
    path = tmp / f"cachecoord-{uuid.uuid4().hex[:8]}.toml"
    path.write_text(text)
    return load(path, environ or {})


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tls_app(
    pki: Pki,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[App]:
    """TLS on the main port, plaintext health on a port of its own."""
    text = config_text(
        redis_server.url,
        postgres_server.dsn,
        server='health_listen = "127.0.0.1:0"',
        sections=f"""
[tls]
cert_file = "{pki.server.cert_file}"
key_file = "{pki.server.key_file}"
""",
    )
    app = App(load_config(tmp_path_factory.mktemp("tls"), text))
    await app.start()
    yield app
    await app.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mtls_app(
    pki: Pki,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[App]:
    text = config_text(
        redis_server.url,
        postgres_server.dsn,
        sections=f"""
[tls]
cert_file = "{pki.server.cert_file}"
key_file = "{pki.server.key_file}"
client_ca_file = "{pki.ca.cert_file}"
""",
    )
    app = App(load_config(tmp_path_factory.mktemp("mtls"), text))
    await app.start()
    yield app
    await app.stop()


@dataclass(frozen=True)
class Tokens:
    admin: str
    reader: str
    blobs: str
    watcher: str
    locker: str


@pytest.fixture(scope="module")
def tokens() -> Tokens:
    return Tokens(*(secrets.token_urlsafe(24) for _ in range(5)))


def auth_section(tokens: Tokens, directory: Path) -> tuple[str, dict[str, str]]:
    """[auth] with one token of each kind; some read from files (one with a
    trailing newline, as editors write them), some from the environment (one
    in a CACHECOORD_* variable, which is not a setting)."""
    (directory / "reader.token").write_text(tokens.reader + "\n")
    (directory / "locker.token").write_text(f"  {tokens.locker}  ")
    environ = {
        "ADMIN_TOKEN": tokens.admin,
        "CACHECOORD_TEST_BLOBS_TOKEN": tokens.blobs,
        "WATCHER_TOKEN": tokens.watcher,
    }
    section = f"""
[auth]
enabled = true

[[auth.tokens]]
name = "admin"
token_env = "ADMIN_TOKEN"
permissions = {{ "*" = ["*"] }}
lock_prefixes = ["*"]

[[auth.tokens]]
name = "reader"
token_file = "{directory / "reader.token"}"
permissions = {{ users = ["read"], blobs = ["read"] }}

[[auth.tokens]]
name = "blobs-writer"
token_env = "CACHECOORD_TEST_BLOBS_TOKEN"
permissions = {{ blobs = ["read", "write", "invalidate"] }}

[[auth.tokens]]
name = "watcher"
token_env = "WATCHER_TOKEN"
permissions = {{ blobs = ["watch"] }}

[[auth.tokens]]
name = "locker"
token_file = "{directory / "locker.token"}"
lock_prefixes = ["report-"]
"""
    return section, environ


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def auth_app(
    tokens: Tokens,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[App]:
    directory = tmp_path_factory.mktemp("auth")
    section, environ = auth_section(tokens, directory)
    text = config_text(redis_server.url, postgres_server.dsn, sections=section)
    app = App(load_config(directory, text, environ))
    await app.start()
    yield app
    await app.stop()


def target(app: App) -> str:
    return f"127.0.0.1:{app.port}"


async def refused(call: Awaitable[object], code: grpc.StatusCode) -> CacheCoordError:
    with pytest.raises(CacheCoordError) as info:
        await call
    assert info.value.code == code, f"{info.value.code}: {info.value.details}"
    return info.value


async def health_status(address: str, credentials: grpc.ChannelCredentials | None = None) -> int:
    channel = (
        grpc.aio.secure_channel(address, credentials)
        if credentials
        else grpc.aio.insecure_channel(address)
    )
    async with channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    status: int = response.status
    return status


# -- TLS -------------------------------------------------------------------------


async def test_tls_client_trusting_the_ca_reads(tls_app: App, pki: Pki) -> None:
    async with AsyncClient(target(tls_app), credentials=credentials(pki)) as client:
        got = await client.get("users", "1")
    assert got.found
    assert b"Ada" in got.value


async def test_tls_client_by_host_name_reads(tls_app: App, pki: Pki) -> None:
    async with AsyncClient(f"localhost:{tls_app.port}", credentials=credentials(pki)) as client:
        assert (await client.get("users", "1")).found


async def test_tls_refuses_a_plaintext_client(tls_app: App) -> None:
    async with AsyncClient(target(tls_app)) as client:
        await refused(client.get("users", "1", timeout=5), Code.UNAVAILABLE)


async def test_tls_client_that_does_not_trust_the_server_fails(tls_app: App, pki: Pki) -> None:
    other_ca = grpc.ssl_channel_credentials(root_certificates=pki.stranger.cert)
    async with AsyncClient(target(tls_app), credentials=other_ca) as client:
        await refused(client.get("users", "1", timeout=5), Code.UNAVAILABLE)


async def test_health_answers_in_plaintext_on_the_health_port(tls_app: App, pki: Pki) -> None:
    health = f"127.0.0.1:{tls_app.health_port}"
    assert tls_app.health_port not in (0, tls_app.port)
    assert await health_status(health) == health_pb2.HealthCheckResponse.SERVING
    # ...and over TLS on the main port.
    status = await health_status(target(tls_app), credentials(pki))
    assert status == health_pb2.HealthCheckResponse.SERVING


async def test_health_port_serves_nothing_but_health(tls_app: App) -> None:
    async with AsyncClient(f"127.0.0.1:{tls_app.health_port}") as client:
        await refused(client.get("users", "1", timeout=5), Code.UNIMPLEMENTED)


async def test_a_taken_health_port_stops_start_up_naming_it(
    redis_server: RedisServer, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        server = f'health_listen = "{address}"'
        app = App(load_config(tmp_path, config_text(redis_server.url, postgres_server.dsn, server)))
        with pytest.raises(StartupError) as info:
            await app.start()
    assert "server.health_listen" in str(info.value)
    assert address in str(info.value)


# -- mutual TLS -----------------------------------------------------------------


async def test_mtls_refuses_a_client_without_a_certificate(mtls_app: App, pki: Pki) -> None:
    async with AsyncClient(target(mtls_app), credentials=credentials(pki)) as client:
        await refused(client.get("users", "1", timeout=5), Code.UNAVAILABLE)


async def test_mtls_accepts_a_client_certificate_of_the_ca(mtls_app: App, pki: Pki) -> None:
    creds = credentials(pki, pki.client)
    async with AsyncClient(target(mtls_app), credentials=creds) as client:
        assert (await client.get("users", "1")).found


async def test_mtls_refuses_a_certificate_of_another_ca(mtls_app: App, pki: Pki) -> None:
    creds = credentials(pki, pki.stranger)
    async with AsyncClient(target(mtls_app), credentials=creds) as client:
        await refused(client.get("users", "1", timeout=5), Code.UNAVAILABLE)


# -- bearer tokens: authentication -------------------------------------------------


async def test_no_token_is_unauthenticated(auth_app: App) -> None:
    async with AsyncClient(target(auth_app)) as client:
        err = await refused(client.get("users", "1"), Code.UNAUTHENTICATED)
    assert "authorization: Bearer" in err.details


async def test_unknown_token_is_unauthenticated_and_not_echoed(auth_app: App) -> None:
    wrong = secrets.token_urlsafe(24)
    async with AsyncClient(target(auth_app), token=wrong) as client:
        err = await refused(client.get("users", "1"), Code.UNAUTHENTICATED)
    assert wrong not in err.details


async def test_a_known_token_with_one_character_changed_is_unauthenticated(
    auth_app: App, tokens: Tokens
) -> None:
    near_miss = tokens.admin[:-1] + ("A" if tokens.admin[-1] != "A" else "B")
    async with AsyncClient(target(auth_app), token=near_miss) as client:
        await refused(client.get("users", "1"), Code.UNAUTHENTICATED)


async def test_other_schemes_are_unauthenticated(auth_app: App, tokens: Tokens) -> None:
    async with grpc.aio.insecure_channel(target(auth_app)) as channel:
        stub = pb_grpc.CacheCoordServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Get(
                pb.GetRequest(namespace="users", key="1"),
                metadata=(("authorization", f"Basic {tokens.admin}"),),
                timeout=5,
            )
    assert info.value.code() == Code.UNAUTHENTICATED


async def test_an_unparsable_request_without_a_token_is_unauthenticated(auth_app: App) -> None:
    """Authentication comes first: an anonymous caller learns nothing else."""
    async with grpc.aio.insecure_channel(target(auth_app)) as channel:
        call = channel.unary_unary(
            "/cachecoord.v1.CacheCoordService/Get",
            request_serializer=bytes,
            response_deserializer=bytes,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"\xff\xff\xff", timeout=5)
    assert info.value.code() == Code.UNAUTHENTICATED


async def test_health_and_reflection_need_no_token(auth_app: App) -> None:
    assert await health_status(target(auth_app)) == health_pb2.HealthCheckResponse.SERVING
    assert "cachecoord.v1.CacheCoordService" in await list_services(target(auth_app))


# -- bearer tokens: permissions -----------------------------------------------------


def test_every_rpc_has_exactly_one_permission_rule() -> None:
    """A new RPC without a rule fails at import (fail closed); this keeps the table exact."""
    assert set(auth.RULES) == {method.name for method in registration.SERVICE.methods}


async def test_token_from_a_file_reads_but_may_not_write(auth_app: App, tokens: Tokens) -> None:
    async with AsyncClient(target(auth_app), token=tokens.reader) as client:
        assert (await client.get("users", "1")).found
        assert len(await client.batch_get("users", ["1", "2"])) == 2
        err = await refused(client.put("users", "1", b'{"name": "x"}'), Code.PERMISSION_DENIED)
        assert "'write'" in err.details
        assert "'users'" in err.details
        assert tokens.reader not in err.details
        await refused(client.delete("users", "1"), Code.PERMISSION_DENIED)
        await refused(client.invalidate("users", ["1"]), Code.PERMISSION_DENIED)
        await refused(client.invalidate_tags("users", ["t"]), Code.PERMISSION_DENIED)


async def test_token_from_the_environment_is_scoped_to_its_namespace(
    auth_app: App, tokens: Tokens, key: str
) -> None:
    async with AsyncClient(target(auth_app), token=tokens.blobs) as client:
        version = await client.put("blobs", key, b"v1")
        got = await client.get("blobs", key)
        assert (got.value, got.version) == (b"v1", version)
        await client.invalidate("blobs", [key])
        await client.invalidate_tags("blobs", [key])  # the invalidate permission
        await client.delete("blobs", key)

        err = await refused(client.get("users", "1"), Code.PERMISSION_DENIED)
        assert "'read'" in err.details
        assert "'users'" in err.details
        await refused(client.put("users", "1", b'{"name": "x"}'), Code.PERMISSION_DENIED)


async def test_an_unconfigured_namespace_is_denied_not_listed(
    auth_app: App, tokens: Tokens
) -> None:
    """A scoped token does not learn which namespaces exist (NOT_FOUND lists them)."""
    async with AsyncClient(target(auth_app), token=tokens.reader) as client:
        err = await refused(client.get("nope", "1"), Code.PERMISSION_DENIED)
    assert "blobs" not in err.details
    async with AsyncClient(target(auth_app), token=tokens.admin) as admin:
        await refused(admin.get("nope", "1"), Code.NOT_FOUND)


async def test_locks_need_a_matching_lock_prefix(auth_app: App, tokens: Tokens) -> None:
    name = f"report-{uuid.uuid4().hex[:8]}"
    async with AsyncClient(target(auth_app), token=tokens.locker) as client:
        lock = await client.acquire_lock(name, ttl_ms=5_000)
        await client.extend_lock(name, lock.token, ttl_ms=5_000)
        await client.release_lock(name, lock.token)
        async with client.hold_lock(name, ttl_ms=5_000) as held:
            assert held.fencing_token > lock.fencing_token

        err = await refused(client.acquire_lock("billing", ttl_ms=5_000), Code.PERMISSION_DENIED)
        assert "'lock'" in err.details
        assert "'billing'" in err.details
        await refused(client.release_lock("billing", "t"), Code.PERMISSION_DENIED)
        await refused(client.extend_lock("billing", "t", ttl_ms=1_000), Code.PERMISSION_DENIED)
        with pytest.raises(CacheCoordError) as held_info:
            async with client.hold_lock("billing", ttl_ms=5_000):
                pass
        assert held_info.value.code == Code.PERMISSION_DENIED
        # Namespace permissions grant no locks.
        await refused(client.get("blobs", "x"), Code.PERMISSION_DENIED)

    async with AsyncClient(target(auth_app), token=tokens.reader) as reader:
        await refused(reader.acquire_lock(name, ttl_ms=5_000), Code.PERMISSION_DENIED)


async def test_watch_needs_watch_on_every_namespace(
    auth_app: App, tokens: Tokens, key: str
) -> None:
    async with grpc.aio.insecure_channel(target(auth_app)) as channel:
        stub = pb_grpc.CacheCoordServiceStub(channel)
        watcher = (("authorization", f"Bearer {tokens.watcher}"),)

        denied = stub.Watch(pb.WatchRequest(namespaces=["blobs", "users"]), metadata=watcher)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await denied.read()
        assert info.value.code() == Code.PERMISSION_DENIED
        assert "'users'" in (info.value.details() or "")

        reader = (("authorization", f"Bearer {tokens.reader}"),)
        denied = stub.Watch(pb.WatchRequest(namespaces=["blobs"]), metadata=reader)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await denied.read()
        assert info.value.code() == Code.PERMISSION_DENIED

        stream = stub.Watch(pb.WatchRequest(namespaces=["blobs"]), metadata=watcher, timeout=10)
        async with AsyncClient(target(auth_app), token=tokens.blobs) as writer:
            await writer.put("blobs", key, b"v")
            # The watch may subscribe after the first Put: write until an event arrives.
            event = await _next_invalidation(stream, writer, key)
        stream.cancel()
    assert (event.namespace, event.key) == ("blobs", key)


async def _next_invalidation(
    stream: grpc.aio.UnaryStreamCall[pb.WatchRequest, pb.WatchResponse],
    writer: AsyncClient,
    key: str,
) -> pb.Invalidation:
    for _ in range(50):
        response = await stream.read()
        assert isinstance(response, pb.WatchResponse)
        if response.WhichOneof("event") == "invalidation":
            invalidation: pb.Invalidation = response.invalidation
            return invalidation
        await writer.put("blobs", key, b"v")
    raise AssertionError("no invalidation event")


# -- secrets stay out of the logs ------------------------------------------------------


async def test_serve_never_logs_a_token(
    pki: Pki,
    tokens: Tokens,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path: Path,
) -> None:
    """`cachecoord serve` with TLS, a health port and tokens from a file and
    the environment, at DEBUG: a denial is logged by the token's name, an
    unknown token by the caller's address; no token appears in the output."""
    section, environ = auth_section(tokens, tmp_path)
    listen, health = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = tmp_path / "cachecoord.toml"
    config.write_text(
        config_text(
            redis_server.url,
            postgres_server.dsn,
            server=f'health_listen = "{health}"',
            sections=f'{section}\n[tls]\ncert_file = "{pki.server.cert_file}"\n'
            f'key_file = "{pki.server.key_file}"\n',
            listen=listen,
        )
    )
    wrong = secrets.token_urlsafe(24)
    env = server_env(**environ, CACHECOORD_LOG_LEVEL="DEBUG")

    async with serve(config, tmp_path, env) as server:
        await server.wait_serving(health)
        creds = credentials(pki)
        async with AsyncClient(f"localhost:{listen.rsplit(':')[1]}", credentials=creds) as anon:
            await refused(anon.get("users", "1"), Code.UNAUTHENTICATED)
        async with AsyncClient(listen, credentials=creds, token=wrong) as stranger:
            await refused(stranger.get("users", "1"), Code.UNAUTHENTICATED)
        async with AsyncClient(listen, credentials=creds, token=tokens.reader) as reader:
            assert (await reader.get("users", "1")).found
            await refused(reader.put("users", "1", b"{}"), Code.PERMISSION_DENIED)
        assert await server.terminate() == 0, server.output()

    output = server.output()
    assert "token 'reader' lacks the 'write' permission" in output  # named, not quoted
    assert "bearer tokens required: admin, reader" in output
    for secret in (*vars(tokens).values(), wrong):
        assert secret not in output, "a token appeared in the server log"


# -- the CLI's client commands --------------------------------------------------------


async def test_cli_reads_over_tls_trusting_the_ca_and_fails_without_tls(
    tls_app: App, pki: Pki
) -> None:
    got = await cachecoord(
        tls_app, "get", "users", "1", "--json", "--tls-ca", str(pki.ca.cert_file)
    )
    assert got.code == 0, got.stderr
    assert "Ada" in got.json()["value"]["name"]
    plaintext = await cachecoord(tls_app, "get", "users", "1", "--timeout", "3")
    assert plaintext.code == 64 + Code.UNAVAILABLE.value[0]
    assert "UNAVAILABLE" in plaintext.stderr


async def test_cli_presents_its_certificate_for_mutual_tls(mtls_app: App, pki: Pki) -> None:
    ca = ("--tls-ca", str(pki.ca.cert_file))
    mine = ("--tls-cert", str(pki.client.cert_file), "--tls-key", str(pki.client.key_file))
    assert (await cachecoord(mtls_app, "get", "users", "1", *ca, *mine)).code == 0
    refused = await cachecoord(mtls_app, "get", "users", "1", "--timeout", "3", *ca)
    assert refused.code == 64 + Code.UNAVAILABLE.value[0]
    half = await cachecoord(mtls_app, "get", "users", "1", *ca, mine[0], mine[1])
    assert half.code != 0
    assert "--tls-cert and --tls-key go together" in half.stderr


async def test_cli_sends_the_token_of_its_environment_or_file_and_never_prints_it(
    auth_app: App, tokens: Tokens, tmp_path: Path
) -> None:
    without = await cachecoord(auth_app, "get", "users", "1")
    assert without.code == 64 + Code.UNAUTHENTICATED.value[0]
    assert "UNAUTHENTICATED" in without.stderr
    from_env = await cachecoord(
        auth_app, "get", "users", "1", env={"CACHECOORD_TOKEN": tokens.admin}
    )
    token_file = tmp_path / "token"
    token_file.write_text(tokens.admin + "\n")
    from_file = await cachecoord(auth_app, "get", "users", "1", "--token-file", str(token_file))
    for result in (from_env, from_file):
        assert result.code == 0, result.stderr
        assert tokens.admin not in result.stdout + result.stderr
    missing = await cachecoord(
        auth_app, "get", "users", "1", "--token-file", str(tmp_path / "absent")
    )
    assert missing.code != 0
    assert "--token-file" in missing.stderr
