"""Property-based tests (Hypothesis) through real gRPC against the session's
instance: random and hostile requests never get UNKNOWN or INTERNAL, only the
documented status codes (and the exact one where the rules make it
predictable), never crash the server, and never let one key read or
overwrite another key's or another namespace's data.

How Hypothesis runs here. The session's instance (conftest ``app``) serves
from the session event loop, so the client must never block that loop:

* Most tests are ``async`` and decorated with ``@given``. pytest-asyncio (1.5,
  auto mode) recognises such a test and runs each *example* as a coroutine on
  the session loop (``AsyncHypothesisTest``), so the server runs while the
  example awaits its calls. They send requests with the generated async stub
  (or a bytes-in, bytes-out channel method), not through the client library,
  so that every field, including unset optional ones and unknown ones, is
  exactly what the test chose.
* The stateful test (``hypothesis.stateful``) has synchronous rules. It runs
  the whole state machine in a worker thread (``asyncio.to_thread``) with a
  blocking gRPC stub and a blocking PostgreSQL connection, while the session
  loop, free, keeps serving.

Hypothesis examples share the one instance, so every example that writes
uses keys, user ids or lock names containing a fresh random token: no example
sees another's data, and no other test's data is touched (rows 1-3 of
``users`` are read, never written).

Size: about 2,700 examples plus 100 state-machine runs of 30 steps, chosen
to run in well under a minute on a 2-core machine (about 30 s when idle).
``CACHECOORD_FUZZ_SCALE=10`` multiplies every count for a longer hunt.

Echoed input: error messages quote parts of the request (a namespace name,
a JSON column or value, PostgreSQL quoting a bad value). gRPC sends the
message percent-encoded in a header, and past its metadata limits (8 KiB
soft, 16 KiB hard) the client gets RESOURCE_EXHAUSTED ("received metadata
size exceeds ... limit") instead of the status the server chose. The server
now cuts messages at 1024 characters, which is not enough for non-ASCII text
(xfail cases in the last test). The random tests keep echoed fields to a few
hundred characters so that they test everything else.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import grpc
import psycopg
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cachecoord.app import App
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2_grpc as pb_grpc

T = TypeVar("T")
Code = grpc.StatusCode
OK = Code.OK

SCALE = float(os.environ.get("CACHECOORD_FUZZ_SCALE", "1"))
SERVICE = "/cachecoord.v1.CacheCoordService/"
CALL_TIMEOUT = 10.0

# The session instance's namespaces (tests/conftest.py) and its limits.
MANAGED = ("blobs", "sessions", "queued", "short")  # cache-aside, write-through, write-behind
MAPPED = ("users", "profiles")
CONFIGURED = (*MANAGED, *MAPPED)
MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 1_048_576
MAX_BATCH_KEYS = 1000
MAX_TTL_MS = 365 * 86_400_000
MAX_LOCK_TTL_MS = 86_400_000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
USER_COLUMNS = ("id", "name", "email", "karma", "updated_at")

# What a healthy instance may answer besides OK: the statuses the README
# documents for client mistakes and contention. UNAVAILABLE and
# DEADLINE_EXCEEDED are documented too, but only for sick backends or an
# expired deadline, neither of which happens here; UNKNOWN and INTERNAL never.
CLIENT_ERRORS = frozenset(
    {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.ABORTED}
)


def examples(n: int) -> int:
    return max(1, round(n * SCALE))


def fuzz_settings(n: int) -> settings:
    return settings(
        max_examples=examples(n),
        deadline=None,
        # Each example makes real network calls; generation of big inputs is
        # deliberate, and the function-scoped autouse fixture below runs once
        # per test, not per example (which is what it is for).
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,
        ],
    )


def token() -> str:
    return uuid.uuid4().hex[:12]


# -- strategies ---------------------------------------------------------------

# Every code point a protobuf string can carry: all of Unicode but surrogates
# (upb refuses them), control characters and NUL included.
CHAR = st.characters(codec="utf-8")
NASTY_PIECES = st.sampled_from(
    [
        "{", "}", ":", "{}", "}{", ":lease", "}:lease", ":gen", "}:gen", ":g0", "}:g1",
        ":v:", ":l:", ":queue", "}:queue", "cc:", "cc:{blobs:", "cc:{sessions:x}",
        "cc:wb:{queued:0}:v:", "cc:lock:{", "}:{queued:", "}:{users:1",
        "\n", "\r\n", "\t", "\x00", "\x01", "\x1b[31m", "\x7f", "\u0085", "\u2028",
        "\u200b", "\ufeff", "\uffff", "\U0010ffff", "é", "€", "日本", "🎉",
        "'", '"', "\\", "%", "%s", "%(x)s", "*", "?", "[a-z]", "$1", "::text",
        "'; DROP TABLE users; --", "1; DELETE FROM cachecoord.entries",
        "NULL", "null", " ", "  ",
    ]
)  # fmt: skip
NASTY_TEXT = st.lists(NASTY_PIECES | st.text(CHAR, max_size=6), max_size=6).map("".join)
# Over the 512-byte key limit, or right around it (a 4-byte character counts 4).
HUGE_TEXT = st.builds(
    lambda unit, n: unit * n, st.text(CHAR, min_size=1, max_size=3), st.integers(100, 700)
)
KEY_TEXT = NASTY_TEXT | HUGE_TEXT | st.text(CHAR, max_size=40)

NAMESPACE = (
    st.sampled_from(CONFIGURED)
    | st.sampled_from(["", "Blobs", "blobs ", " blobs", "blobs\x00", "blobs:x", "*", "cc"])
    | NASTY_TEXT
    # Long, but short enough that the NOT_FOUND message quoting it stays
    # within gRPC's metadata limit (see "Echoed input" above).
    | st.builds(
        lambda unit, n: unit * n, st.text(CHAR, min_size=1, max_size=2), st.integers(1, 150)
    )
)

INT64 = st.integers(INT64_MIN, INT64_MAX) | st.sampled_from(
    [INT64_MIN, INT64_MIN + 1, -1, 0, 1, 2, MAX_TTL_MS, MAX_TTL_MS + 1, INT64_MAX - 1, INT64_MAX]
)
TTL = st.none() | INT64 | st.integers(0, MAX_TTL_MS)
EXPECTED_VERSION = st.none() | INT64 | st.integers(0, 3)

# Values: arbitrary bytes, envelope look-alikes, and sizes around the limit
# (built by repetition: drawing a megabyte byte by byte would be slow).
VALUE = (
    st.binary(max_size=64)
    | st.sampled_from([b"", b"\x00", b"v", b"n", b"1:2:3:", b"9:9:9:vfake", b"}", b"\xff\xfe"])
    | st.builds(
        lambda unit, size: (unit * (size // len(unit) + 1))[:size],
        st.binary(min_size=1, max_size=4),
        st.sampled_from([MAX_VALUE_BYTES - 1, MAX_VALUE_BYTES, MAX_VALUE_BYTES + 1])
        | st.integers(1000, 70_000),
    )
)


def valid_key(key: str) -> bool:
    return 0 < len(key.encode()) <= MAX_KEY_BYTES and "\x00" not in key


@st.composite
def fresh_key(draw: st.DrawFn, text: st.SearchStrategy[str] = KEY_TEXT) -> str:
    """A hostile key; when it is a valid key, a fresh token is inserted at a
    drawn position, so that no earlier example can have written it."""
    key = draw(text)
    if not valid_key(key):
        return key
    at = draw(st.integers(0, len(key)))
    return key[:at] + token() + key[at:]


# -- calls and statuses -------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str = ""


async def outcome(call: Awaitable[T]) -> tuple[Outcome, T | None]:
    """Await a call; its status, and its reply when OK. Never UNKNOWN or
    INTERNAL, and an error always comes with a message."""
    try:
        reply = await call
    except grpc.aio.AioRpcError as err:
        code, details = err.code(), err.details() or ""
        assert code not in (Code.UNKNOWN, Code.INTERNAL), f"{code.name}: {details}"
        assert details.strip(), f"{code.name} came without a message"
        return Outcome(code, details), None
    return Outcome(OK), reply


def check(got: Outcome, expected: grpc.StatusCode) -> None:
    assert got.code == expected, f"expected {expected.name}, got {got.code.name}: {got.details}"


def namespace_status(namespace: str) -> grpc.StatusCode | None:
    """The status a request naming *namespace* gets for it (None: configured)."""
    if namespace in CONFIGURED:
        return None
    return Code.INVALID_ARGUMENT if namespace == "" else Code.NOT_FOUND


def key_status(namespace: str, key: str) -> grpc.StatusCode | None:
    if not valid_key(key):
        return Code.INVALID_ARGUMENT
    if namespace in MAPPED and not canonical_int(key, 63 if namespace == "profiles" else 31):
        return Code.INVALID_ARGUMENT
    return None


def canonical_int(key: str, bits: int) -> bool:
    """Whether *key* is an integer of the column type in canonical text form."""
    try:
        number = int(key)
    except ValueError:
        return False
    return str(number) == key and -(2**bits) <= number < 2**bits


# -- fixtures -------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        yield chan


@pytest.fixture(scope="module")
def stub(channel: grpc.aio.Channel) -> pb_grpc.CacheCoordServiceAsyncStub:
    return pb_grpc.CacheCoordServiceStub(channel)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def db(app: App) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection to the instance's PostgreSQL, to look behind its back."""
    async with await psycopg.AsyncConnection.connect(
        app.settings.postgres.url, autocommit=True
    ) as conn:
        yield conn


async def serving_status(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        health = health_pb2_grpc.HealthStub(chan)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return int(reply.status)


@pytest_asyncio.fixture(autouse=True, loop_scope="session")
async def still_serving(app: App, stub: pb_grpc.CacheCoordServiceAsyncStub) -> AsyncIterator[None]:
    """After each test (all its examples): the instance still reports SERVING,
    a known row still reads, and a fresh write still reads back."""
    yield
    assert await serving_status(app.port) == health_pb2.HealthCheckResponse.SERVING
    ada = await stub.Get(pb.GetRequest(namespace="users", key="1"), timeout=CALL_TIMEOUT)
    assert ada.found
    assert json.loads(ada.value)["name"] == "Ada Lovelace"
    key = f"alive-{token()}"
    put = await stub.Put(pb.PutRequest(namespace="blobs", key=key, value=b"ok"), timeout=5)
    got = await stub.Get(pb.GetRequest(namespace="blobs", key=key), timeout=5)
    assert (got.found, got.value, got.version) == (True, b"ok", put.version)


# -- reads and invalidations of anything ---------------------------------------------


@fuzz_settings(500)
@given(
    namespace=NAMESPACE,
    keys=st.lists(KEY_TEXT, max_size=6)
    | st.builds(lambda n: [f"k{i}" for i in range(n)], st.sampled_from([999, 1000, 1001])),
    everything=st.booleans(),
    op=st.sampled_from(["Get", "BatchGet", "Invalidate"]),
)
async def test_any_read_or_invalidate_gets_the_status_the_rules_give(
    stub: pb_grpc.CacheCoordServiceAsyncStub,
    namespace: str,
    keys: list[str],
    everything: bool,
    op: str,
) -> None:
    expected = namespace_status(namespace)
    if op == "Get":
        key = keys[0] if keys else ""
        got, _ = await outcome(
            stub.Get(pb.GetRequest(namespace=namespace, key=key), timeout=CALL_TIMEOUT)
        )
        expected = expected or key_status(namespace, key) or OK
    elif op == "BatchGet":
        got, batch = await outcome(
            stub.BatchGet(pb.BatchGetRequest(namespace=namespace, keys=keys), timeout=CALL_TIMEOUT)
        )
        if expected is None:
            bad = not keys or len(keys) > MAX_BATCH_KEYS
            bad = bad or any(key_status(namespace, k) for k in keys)
            expected = Code.INVALID_ARGUMENT if bad else OK
        if batch is not None:
            assert [e.key for e in batch.entries] == keys
    else:
        # Invalidating a whole namespace scans Redis: keep it to a few examples.
        everything = everything and namespace_status(namespace) is None and len(keys) == 1
        request = pb.InvalidateRequest(namespace=namespace, keys=[] if everything else keys)
        request.all = everything
        got, _ = await outcome(stub.Invalidate(request, timeout=CALL_TIMEOUT))
        if expected is None and not everything:
            bad = not keys or len(keys) > MAX_BATCH_KEYS
            bad = bad or any(key_status(namespace, k) for k in keys)
            expected = Code.INVALID_ARGUMENT if bad else OK
        expected = expected or OK
    check(got, expected)


@fuzz_settings(300)
@given(key=KEY_TEXT | st.integers().map(str) | st.sampled_from(["1", "01", "-0", "+1", "1 "]))
async def test_mapped_keys_are_accepted_only_in_the_columns_canonical_form(
    stub: pb_grpc.CacheCoordServiceAsyncStub, key: str
) -> None:
    got, reply = await outcome(
        stub.Get(pb.GetRequest(namespace="users", key=key), timeout=CALL_TIMEOUT)
    )
    check(got, key_status("users", key) or OK)
    if reply is not None and reply.found:
        assert json.loads(reply.value)["id"] == int(key)


# -- writes of anything -------------------------------------------------------------


@fuzz_settings(500)
@given(
    namespace=st.sampled_from(MANAGED) | NAMESPACE,
    key=fresh_key(),
    value=VALUE,
    ttl_ms=TTL,
    expected_version=EXPECTED_VERSION,
    other=st.sampled_from(MANAGED),
)
async def test_any_put_gets_the_status_the_rules_give_and_reads_back(
    stub: pb_grpc.CacheCoordServiceAsyncStub,
    namespace: str,
    key: str,
    value: bytes,
    ttl_ms: int | None,
    expected_version: int | None,
    other: str,
) -> None:
    request = pb.PutRequest(namespace=namespace, key=key, value=value)
    if ttl_ms is not None:
        request.ttl_ms = ttl_ms
    if expected_version is not None:
        request.expected_version = expected_version
    got, reply = await outcome(stub.Put(request, timeout=CALL_TIMEOUT))
    expected = namespace_status(namespace) or key_status(namespace, key)
    if expected is None:
        if namespace in MAPPED:
            # Opaque bytes are rarely a JSON object of the right columns.
            assert got.code in CLIENT_ERRORS | {OK}, got
            return
        bad = len(value) > MAX_VALUE_BYTES
        bad = bad or (expected_version is not None and expected_version < 0)
        bad = bad or (ttl_ms is not None and not 0 <= ttl_ms <= MAX_TTL_MS)
        if bad:
            expected = Code.INVALID_ARGUMENT
        elif expected_version not in (None, 0):  # the key is new: its version is 0
            expected = Code.FAILED_PRECONDITION
        else:
            expected = OK
    check(got, expected)
    # Nothing was written unless the Put succeeded, and only under its own key.
    readable = namespace in MANAGED and valid_key(key)
    read = None
    if readable:
        read = await stub.Get(pb.GetRequest(namespace=namespace, key=key), timeout=CALL_TIMEOUT)
    if got.code is OK:
        assert isinstance(reply, pb.PutResponse)
        assert reply.version >= 1
        assert read is not None
        assert (read.found, read.value, read.version) == (True, value, reply.version)
        deleted = await stub.Delete(
            pb.DeleteRequest(namespace=namespace, key=key), timeout=CALL_TIMEOUT
        )
        assert deleted.deleted
        assert deleted.version > reply.version
        read = await stub.Get(pb.GetRequest(namespace=namespace, key=key), timeout=CALL_TIMEOUT)
    if read is not None:
        assert not read.found, f"{namespace}/{key!r} holds {read.value[:50]!r}"
    if other != namespace and valid_key(key):
        siblings = [key, key + "}", "{" + key, key + ":lease", key + "}:lease"]
        siblings = [k for k in siblings if valid_key(k)]
        entries = await stub.BatchGet(
            pb.BatchGetRequest(namespace=other, keys=siblings), timeout=CALL_TIMEOUT
        )
        assert not any(e.found for e in entries.entries), f"leaked into {other}"


@fuzz_settings(150)
@given(
    namespace=st.sampled_from(MANAGED) | NAMESPACE,
    key=fresh_key(),
    expected_version=EXPECTED_VERSION,
)
async def test_any_delete_of_a_missing_key_gets_the_status_the_rules_give(
    stub: pb_grpc.CacheCoordServiceAsyncStub,
    namespace: str,
    key: str,
    expected_version: int | None,
) -> None:
    request = pb.DeleteRequest(namespace=namespace, key=key)
    if expected_version is not None:
        request.expected_version = expected_version
    got, reply = await outcome(stub.Delete(request, timeout=CALL_TIMEOUT))
    expected = namespace_status(namespace) or key_status(namespace, key)
    if expected is None:
        if expected_version is not None and expected_version < 0:
            expected = Code.INVALID_ARGUMENT
        elif expected_version not in (None, 0):
            expected = Code.FAILED_PRECONDITION
        else:
            expected = OK
    check(got, expected)
    if reply is not None:
        assert not reply.deleted
        assert reply.version >= 1


# -- the mapped namespace: JSON of every shape into a real table ------------------------

SQL_COLUMNS = st.sampled_from(
    [
        "name; DROP TABLE users; --",
        'name") VALUES (1); DROP TABLE users; --',
        "1'; DROP TABLE users; --",
        "id = id OR 1=1",
        "name = 'x' FROM users --",
        "NAME",
        "Name",
        " name",
        "name\x00",
        "users.name",
        '"name"',
        "karma::text",
        "*",
        "",
        "ctid",
        "xmin",
        "oid",
        "tableoid",
    ]
)
COLUMN = st.sampled_from(USER_COLUMNS) | SQL_COLUMNS | st.text(CHAR, max_size=12)
JSON_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.integers(-(2**31) - 2, 2**31 + 1)
    | st.floats()  # NaN and infinities included: json.dumps writes NaN, Infinity
    | st.text(CHAR, max_size=30)
    | NASTY_TEXT
    | st.sampled_from(["2024-01-01T00:00:00Z", "infinity", "-infinity", "epoch", "now", "1"])
)
JSON_VALUE = st.recursive(
    JSON_SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


@st.composite
def user_rows(draw: st.DrawFn, key: str) -> dict[str, Any]:
    """A JSON object for the ``users`` row *key*: mostly real columns (often
    with a valid name, so that many writes succeed), sometimes hostile ones."""
    row: dict[str, Any] = draw(st.dictionaries(COLUMN, JSON_VALUE, max_size=4))
    if draw(st.booleans()):
        row["name"] = draw(st.text(CHAR, max_size=30))
    match draw(st.sampled_from(["drawn", "absent", "int", "str"])):
        case "absent":
            row.pop("id", None)
        case "int":
            row["id"] = int(key)
        case "str":
            row["id"] = key
    return row


@fuzz_settings(300)
@given(data=st.data(), raw=st.none() | st.none() | st.binary(max_size=30))
async def test_any_json_into_the_users_table_changes_at_most_its_own_row(
    stub: pb_grpc.CacheCoordServiceAsyncStub,
    db: psycopg.AsyncConnection[Any],
    data: st.DataObject,
    raw: bytes | None,
) -> None:
    key = str(10_000_000 + uuid.uuid4().int % 2_000_000_000)  # a row nobody has written
    row = data.draw(user_rows(key), label="row")
    value = raw if raw is not None else json.dumps(row).encode()
    before = await user_count(db)
    got, reply = await outcome(
        stub.Put(pb.PutRequest(namespace="users", key=key, value=value), timeout=CALL_TIMEOUT)
    )
    stored = await stub.Get(pb.GetRequest(namespace="users", key=key), timeout=CALL_TIMEOUT)
    assert got.code in {OK, Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION}, got
    if raw is not None:
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            check(got, Code.INVALID_ARGUMENT)
    elif set(row) - set(USER_COLUMNS):
        check(got, Code.INVALID_ARGUMENT)
        assert "column" in got.details, got.details
    elif "id" in row and str(row["id"]) != key:
        check(got, Code.INVALID_ARGUMENT)
    elif row.get("name") is None:
        check(got, Code.INVALID_ARGUMENT)  # a new row needs its NOT NULL name
    if got.code is Code.FAILED_PRECONDITION:  # only a UNIQUE violation: the email
        assert "email" in got.details, got.details
    assert await user_count(db) == before + (got.code is OK)
    if got.code is not OK:
        assert not stored.found
        return
    assert isinstance(reply, pb.PutResponse)
    assert stored.found
    assert stored.version == reply.version
    document = json.loads(stored.value)
    assert document["id"] == int(key)
    if isinstance(row.get("name"), str):
        assert document["name"] == row["name"]
    if isinstance(row.get("karma"), int):
        assert document["karma"] == row["karma"]
    await stub.Delete(pb.DeleteRequest(namespace="users", key=key), timeout=CALL_TIMEOUT)


async def user_count(db: psycopg.AsyncConnection[Any]) -> int:
    cur = await db.execute("SELECT count(*) FROM users")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_the_fuzzed_writes_left_the_first_users_alone(
    db: psycopg.AsyncConnection[Any],
) -> None:
    cur = await db.execute("SELECT id, name, email FROM users WHERE id <= 3 ORDER BY id")
    assert await cur.fetchall() == [
        (1, "Ada Lovelace", "ada@example.com"),
        (2, "Alan Turing", "alan@example.com"),
        (3, "Grace Hopper", "grace@example.com"),
    ]


# -- bytes that are not a request, and requests with unknown fields ----------------------

UNARY = ("Get", "BatchGet", "Put", "Delete", "Invalidate", "AcquireLock", "ReleaseLock",
         "ExtendLock")  # fmt: skip
REQUESTS: dict[str, type[Any]] = {
    "Get": pb.GetRequest,
    "BatchGet": pb.BatchGetRequest,
    "Put": pb.PutRequest,
    "Delete": pb.DeleteRequest,
    "Invalidate": pb.InvalidateRequest,
    "AcquireLock": pb.AcquireLockRequest,
    "ReleaseLock": pb.ReleaseLockRequest,
    "ExtendLock": pb.ExtendLockRequest,
    "Watch": pb.WatchRequest,
    "HoldLock": pb.HoldLockRequest,
}


def parses(method: str, raw: bytes) -> bool:
    try:
        REQUESTS[method].FromString(raw)
    except Exception:  # DecodeError, or upb's RuntimeError on deep nesting
        return False
    return True


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def unknown_fields(draw: st.DrawFn) -> bytes:
    """Well-formed protobuf fields with numbers no request message uses."""
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        number = draw(st.integers(16, 2**29 - 1) | st.integers(8, 15))
        wire = draw(st.sampled_from([0, 1, 2, 3, 5]))
        tag = varint(number << 3 | wire)
        if wire == 0:
            parts.append(tag + varint(draw(st.integers(0, 2**64 - 1))))
        elif wire == 1:
            parts.append(tag + draw(st.binary(min_size=8, max_size=8)))
        elif wire == 2:
            payload = draw(st.binary(max_size=40))
            parts.append(tag + varint(len(payload)) + payload)
        elif wire == 3:  # an empty group: start and end tags of one number
            parts.append(tag + varint(number << 3 | 4))
        else:
            parts.append(tag + draw(st.binary(min_size=4, max_size=4)))
    return b"".join(parts)


GARBAGE = (
    st.binary(max_size=200)
    | st.sampled_from([b"\xff", b"\x0a", b"\x0a\xff", b"\x0a\x05blobs\x12\x02\xff\xfe", b"\x00",
                       b"\x08" + b"\xff" * 11, b"\x0b" * 200, b"\x0a\x80\x80\x80\x80\x10"])
    | st.builds(lambda n: b"\x0a\x7f" * n, st.integers(1, 200))
)  # fmt: skip


@fuzz_settings(400)
@given(method=st.sampled_from(UNARY), raw=GARBAGE)
async def test_bytes_that_are_not_a_request_get_invalid_argument(
    channel: grpc.aio.Channel, method: str, raw: bytes
) -> None:
    call = channel.unary_unary(SERVICE + method, None, None)  # bytes in, bytes out
    got, _ = await outcome(call(raw, timeout=CALL_TIMEOUT))
    if parses(method, raw):
        # It happens to be a request (of some namespace or lock): any rule status.
        assert got.code in CLIENT_ERRORS | {OK}, got
    else:
        check(got, Code.INVALID_ARGUMENT)
        assert "DecodeError" not in got.details, got.details


@fuzz_settings(60)
@given(method=st.sampled_from(["Watch", "HoldLock"]), raw=GARBAGE)
async def test_bytes_that_are_not_a_request_end_a_stream_with_invalid_argument(
    channel: grpc.aio.Channel, method: str, raw: bytes
) -> None:
    assume(not parses(method, raw))
    if method == "Watch":
        call: Any = channel.unary_stream(SERVICE + method, None, None)(raw, timeout=CALL_TIMEOUT)
    else:
        call = channel.stream_stream(SERVICE + method, None, None)(
            iter([raw]), timeout=CALL_TIMEOUT
        )
    try:
        got, _ = await outcome(call.read())
    finally:
        call.cancel()
    check(got, Code.INVALID_ARGUMENT)  # not a first message: OK would mean it parsed


@fuzz_settings(200)
@given(
    extra=unknown_fields(),
    before=st.booleans(),
    value=st.binary(max_size=40),
    method=st.sampled_from(["Get", "BatchGet", "Put", "Delete", "Invalidate", "AcquireLock"]),
)
async def test_unknown_fields_are_ignored(
    channel: grpc.aio.Channel,
    stub: pb_grpc.CacheCoordServiceAsyncStub,
    extra: bytes,
    before: bool,
    value: bytes,
    method: str,
) -> None:
    key = f"unknown-fields-{token()}"
    written = await stub.Put(pb.PutRequest(namespace="sessions", key=key, value=b"stored"))
    requests: dict[str, Any] = {
        "Get": pb.GetRequest(namespace="sessions", key=key),
        "BatchGet": pb.BatchGetRequest(namespace="sessions", keys=[key, key + "}"]),
        "Put": pb.PutRequest(namespace="sessions", key=key, value=value),
        "Delete": pb.DeleteRequest(namespace="sessions", key=key),
        "Invalidate": pb.InvalidateRequest(namespace="sessions", keys=[key]),
        "AcquireLock": pb.AcquireLockRequest(name=key, ttl_ms=60_000),
    }
    plain = requests[method].SerializeToString()
    raw = extra + plain if before else plain + extra
    call = channel.unary_unary(SERVICE + method, None, None)
    got, reply = await outcome(call(raw, timeout=CALL_TIMEOUT))
    check(got, OK)
    assert isinstance(reply, bytes)
    after = await stub.Get(pb.GetRequest(namespace="sessions", key=key), timeout=CALL_TIMEOUT)
    if method == "Get":
        read = pb.GetResponse.FromString(reply)
        assert (read.found, read.value, read.version) == (True, b"stored", written.version)
    elif method == "BatchGet":
        entries = pb.BatchGetResponse.FromString(reply).entries
        assert [(e.key, e.found, e.value) for e in entries] == [
            (key, True, b"stored"),
            (key + "}", False, b""),
        ]
    elif method == "Put":
        version = pb.PutResponse.FromString(reply).version
        assert (after.found, after.value, after.version) == (True, value, version)
    elif method == "Delete":
        assert pb.DeleteResponse.FromString(reply).deleted
        assert not after.found
    elif method == "AcquireLock":
        lock = pb.AcquireLockResponse.FromString(reply)
        await stub.ReleaseLock(pb.ReleaseLockRequest(name=key, token=lock.token))
    if method in ("Get", "BatchGet", "Invalidate", "AcquireLock"):
        assert (after.found, after.value, after.version) == (True, b"stored", written.version)


# -- locks and watches with hostile names and numbers ----------------------------------------

LOCK_TTL = st.integers(1, MAX_LOCK_TTL_MS) | INT64
MIN_LOCK_TTL_MS = 100  # cachecoord.coordination.locks.MIN_TTL_MS


def lock_status(name: str, ttl_ms: int, wait_timeout_ms: int = 0) -> grpc.StatusCode:
    bad = (
        not name
        or len(name.encode()) > MAX_KEY_BYTES
        or "\x00" in name
        or not MIN_LOCK_TTL_MS <= ttl_ms <= MAX_LOCK_TTL_MS
    )
    return Code.INVALID_ARGUMENT if bad or wait_timeout_ms < 0 else OK


@fuzz_settings(200)
@given(
    name=fresh_key(NASTY_TEXT | HUGE_TEXT),
    ttl_ms=LOCK_TTL,
    wait_timeout_ms=st.integers(0, 20) | INT64,
    extend_ttl_ms=LOCK_TTL,
)
async def test_any_lock_request_gets_the_status_the_rules_give_and_locks_only_its_name(
    stub: pb_grpc.CacheCoordServiceAsyncStub,
    name: str,
    ttl_ms: int,
    wait_timeout_ms: int,
    extend_ttl_ms: int,
) -> None:
    acquire = pb.AcquireLockRequest(name=name, ttl_ms=ttl_ms, wait_timeout_ms=wait_timeout_ms)
    got, lock = await outcome(stub.AcquireLock(acquire, timeout=CALL_TIMEOUT))
    check(got, lock_status(name, ttl_ms, wait_timeout_ms))
    if lock is None:
        return
    assert lock.fencing_token > 0
    release = pb.ReleaseLockRequest(name=name, token=lock.token)
    # A lock with a TTL of a few ms may expire between any two calls.
    held = ttl_ms >= 5_000
    if held:
        again = pb.AcquireLockRequest(name=name, ttl_ms=60_000, wait_timeout_ms=0)
        check((await outcome(stub.AcquireLock(again, timeout=CALL_TIMEOUT)))[0], Code.ABORTED)
        wrong = pb.ExtendLockRequest(name=name, token=lock.token + "x", ttl_ms=60_000)
        check(
            (await outcome(stub.ExtendLock(wrong, timeout=CALL_TIMEOUT)))[0],
            Code.FAILED_PRECONDITION,
        )
        # Locks whose names look like this one's Redis keys are other locks.
        for other in (name + "}", "{" + name, name + ":fencing", name + "}:fencing"):
            if lock_status(other, 60_000) is not OK:
                continue
            free = pb.AcquireLockRequest(name=other, ttl_ms=60_000, wait_timeout_ms=0)
            got_other, other_lock = await outcome(stub.AcquireLock(free, timeout=CALL_TIMEOUT))
            check(got_other, OK)
            assert other_lock is not None
            await stub.ReleaseLock(pb.ReleaseLockRequest(name=other, token=other_lock.token))
        extend = pb.ExtendLockRequest(name=name, token=lock.token, ttl_ms=extend_ttl_ms)
        extended = (await outcome(stub.ExtendLock(extend, timeout=CALL_TIMEOUT)))[0]
        check(extended, lock_status(name, extend_ttl_ms))
        held = extended.code is not OK or extend_ttl_ms >= 5_000
    released = (await outcome(stub.ReleaseLock(release, timeout=CALL_TIMEOUT)))[0]
    if held:
        check(released, OK)
    else:
        assert released.code in (OK, Code.FAILED_PRECONDITION), released
    check(
        (await outcome(stub.ReleaseLock(release, timeout=CALL_TIMEOUT)))[0],
        Code.FAILED_PRECONDITION,
    )


@fuzz_settings(60)
@given(
    namespaces=st.lists(st.sampled_from(CONFIGURED) | NAMESPACE, max_size=4),
    key_prefix=NASTY_TEXT | HUGE_TEXT,
)
async def test_any_watch_request_starts_with_a_reset_or_gets_the_status_the_rules_give(
    stub: pb_grpc.CacheCoordServiceAsyncStub, namespaces: list[str], key_prefix: str
) -> None:
    expected: grpc.StatusCode | None = None if namespaces else Code.INVALID_ARGUMENT
    for name in namespaces:
        expected = expected or namespace_status(name)
    if expected is None and len(key_prefix.encode()) > MAX_KEY_BYTES:
        expected = Code.INVALID_ARGUMENT
    call = stub.Watch(pb.WatchRequest(namespaces=namespaces, key_prefix=key_prefix), timeout=5)
    try:
        got, first = await outcome(call.read())
    finally:
        call.cancel()
    if expected is None:
        check(got, OK)
        assert isinstance(first, pb.WatchResponse)
        assert first.WhichOneof("event") == "reset"
    else:
        check(got, expected)


# -- isolation: a stateful model of the managed namespaces --------------------------------

# Keys are <prefix><run token><suffix>; these shapes imitate the Redis key
# names of other keys and namespaces (keys.py), plus whatever Hypothesis makes.
KEY_SHAPES = st.sampled_from(
    [
        ("", ""), ("", "}"), ("{", ""), ("{", "}"), ("", ":lease"), ("", "}:lease"),
        ("", ":gen"), ("", "}:gen"), ("", "}:g0"), ("", ":v:"), ("cc:{blobs:", "}"),
        ("}:{sessions:", ""), ("", "}:{queued:0}:queue"), ("cc:wb:{queued:1}:v:", ""),
        ("", "\n"), ("\x01", "\x7f"), ("", " "), ("", "'; DELETE FROM cachecoord.entries; --"),
        ("%", "_"), ("*", "?"), ("", "\u2028"), ("🎉", "é"),
    ]
) | st.tuples(
    st.text(CHAR.filter(lambda c: c != "\x00"), max_size=8),
    st.text(CHAR.filter(lambda c: c != "\x00"), max_size=8),
)  # fmt: skip
MODEL_RUNS = 100  # of MODEL_STEPS steps each
MODEL_STEPS = 30
MODEL_VALUE = st.binary(max_size=24) | st.sampled_from([b"", b"\x00", b"1:2:3:v", b"n", b"}"])


@dataclass
class ModelResults:
    """What the state-machine runs that finished expect PostgreSQL to hold."""

    rows: dict[tuple[str, str], tuple[bytes, int]] = field(default_factory=dict)
    absent: set[tuple[str, str]] = field(default_factory=set)
    runs: int = 0
    steps: int = 0


class Isolation(RuleBasedStateMachine):
    """Random Put, compare-and-set, Delete, Invalidate, Get and BatchGet over
    adversarial keys of every managed namespace, against a model of
    (namespace, key) -> (value, version). Every read is checked against the
    model: a key never sees another key's or another namespace's value."""

    keys = Bundle("keys")
    # Set by run_isolation_model on a subclass (Hypothesis builds the machine).
    stub: ClassVar[pb_grpc.CacheCoordServiceStub]
    results: ClassVar[ModelResults]

    def __init__(self) -> None:
        super().__init__()
        self.token = token()
        self.model: dict[tuple[str, str], tuple[bytes, int]] = {}
        self.last_version: dict[tuple[str, str], int] = {}
        self.seen: set[str] = set()
        self.invalidated_all = False

    # -- helpers -----------------------------------------------------------

    def call(self, method: Callable[..., T], request: Any) -> T:
        """The reply of a call that must succeed."""
        try:
            return method(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as err:
            failure = err
        code = failure.code() if isinstance(failure, grpc.Call) else Code.UNKNOWN
        raise AssertionError(f"{type(request).__name__} failed with {code}: {failure}")

    def refused(self, method: Callable[..., Any], request: Any) -> grpc.StatusCode:
        """The status of a call that must fail."""
        try:
            method(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as err:
            failure = err
        else:
            raise AssertionError(f"{type(request).__name__} succeeded: {request}")
        return failure.code() if isinstance(failure, grpc.Call) else Code.UNKNOWN

    def bump(self, namespace: str, key: str, version: int) -> None:
        last = self.last_version.get((namespace, key), 0)
        assert version > last, f"{namespace}/{key!r}: version {version} after {last}"
        self.last_version[(namespace, key)] = version

    def expect(self, namespace: str, key: str, found: bool, value: bytes, version: int) -> None:
        want = self.model.get((namespace, key))
        got = (found, value, version) if found else None
        assert got == (None if want is None else (True, *want)), (
            f"{namespace}/{key!r}: read {got}, the model says {want}"
        )

    # -- rules ---------------------------------------------------------------

    @rule(target=keys, shape=KEY_SHAPES)
    def new_key(self, shape: tuple[str, str]) -> str:
        key = shape[0] + self.token + shape[1]
        self.seen.add(key)
        return key

    @rule(namespace=st.sampled_from(MANAGED), key=keys, value=MODEL_VALUE,
          ttl_ms=st.sampled_from([None, 0, 1, 50, 60_000]))  # fmt: skip
    def put(self, namespace: str, key: str, value: bytes, ttl_ms: int | None) -> None:
        request = pb.PutRequest(namespace=namespace, key=key, value=value)
        if ttl_ms is not None:
            request.ttl_ms = ttl_ms
        reply = self.call(self.stub.Put, request)
        self.bump(namespace, key, reply.version)
        self.model[(namespace, key)] = (value, reply.version)

    @rule(namespace=st.sampled_from(MANAGED), key=keys, value=MODEL_VALUE,
          off_by=st.sampled_from([0, 0, 1, -1, 2**40]))  # fmt: skip
    def compare_and_set(self, namespace: str, key: str, value: bytes, off_by: int) -> None:
        current = self.model.get((namespace, key))
        right = current[1] if current else 0
        expected = right + off_by if right + off_by >= 0 else right + 1
        request = pb.PutRequest(
            namespace=namespace, key=key, value=value, expected_version=expected
        )
        if expected != right:
            assert self.refused(self.stub.Put, request) is Code.FAILED_PRECONDITION
            return
        reply = self.call(self.stub.Put, request)
        self.bump(namespace, key, reply.version)
        self.model[(namespace, key)] = (value, reply.version)

    @rule(namespace=st.sampled_from(MANAGED), key=keys)
    def delete(self, namespace: str, key: str) -> None:
        reply = self.call(self.stub.Delete, pb.DeleteRequest(namespace=namespace, key=key))
        assert reply.deleted == ((namespace, key) in self.model), f"{namespace}/{key!r}"
        self.bump(namespace, key, reply.version)
        self.model.pop((namespace, key), None)

    @rule(namespace=st.sampled_from(MANAGED), keys=st.lists(keys, min_size=1, max_size=4))
    def invalidate(self, namespace: str, keys: list[str]) -> None:
        request = pb.InvalidateRequest(namespace=namespace, keys=keys)
        reply = self.call(self.stub.Invalidate, request)
        assert 0 <= reply.invalidated <= len(set(keys))

    @precondition(lambda self: not self.invalidated_all)
    @rule(namespace=st.sampled_from(MANAGED))
    def invalidate_all(self, namespace: str) -> None:
        self.invalidated_all = True  # once per run: it scans the whole of Redis
        request = pb.InvalidateRequest(namespace=namespace, all=True)
        self.call(self.stub.Invalidate, request)

    @rule(namespace=st.sampled_from(MANAGED), key=keys)
    def get(self, namespace: str, key: str) -> None:
        reply = self.call(self.stub.Get, pb.GetRequest(namespace=namespace, key=key))
        self.expect(namespace, key, reply.found, reply.value, reply.version)

    @rule(namespace=st.sampled_from(MANAGED), keys=st.lists(keys, min_size=1, max_size=6))
    def batch_get(self, namespace: str, keys: list[str]) -> None:
        request = pb.BatchGetRequest(namespace=namespace, keys=keys)
        reply = self.call(self.stub.BatchGet, request)
        assert [e.key for e in reply.entries] == keys
        for entry in reply.entries:
            self.expect(namespace, entry.key, entry.found, entry.value, entry.version)

    def teardown(self) -> None:
        """Every key of the run, in every managed namespace, read once more."""
        keys = sorted(self.seen)
        for namespace in MANAGED if keys else ():
            reply = self.call(
                self.stub.BatchGet, pb.BatchGetRequest(namespace=namespace, keys=keys)
            )
            for entry in reply.entries:
                self.expect(namespace, entry.key, entry.found, entry.value, entry.version)
            for key in keys:
                if (namespace, key) in self.model:
                    self.results.rows[(namespace, key)] = self.model[(namespace, key)]
                else:
                    self.results.absent.add((namespace, key))
        self.results.runs += 1


def stored_rows(dsn: str, keys: set[str]) -> dict[tuple[str, str], tuple[bytes, int]]:
    """(namespace, key) -> (value, version) in PostgreSQL, for *keys*."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT e.namespace, e.key, e.value, v.version FROM cachecoord.entries e "
            "JOIN cachecoord.versions v USING (namespace, key) WHERE e.key = ANY(%s)",
            (sorted(keys),),
        ).fetchall()
    return {(ns, key): (bytes(value), int(version)) for ns, key, value, version in rows}


def run_isolation_model(target: str, dsn: str) -> ModelResults:
    """Run the state machine (blocking: call it from a worker thread), then
    check that PostgreSQL holds exactly the model's final state (write-behind
    once its queue has drained)."""
    results = ModelResults()
    with grpc.insecure_channel(target) as chan:

        class Run(Isolation):
            stub = pb_grpc.CacheCoordServiceStub(chan)

        Run.results = results
        run_state_machine_as_test(
            Run,
            settings=settings(
                max_examples=examples(MODEL_RUNS),
                stateful_step_count=MODEL_STEPS,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    keys = {key for _, key in results.rows} | {key for _, key in results.absent}
    deadline = time.monotonic() + 10
    while True:
        stored = {k: v for k, v in stored_rows(dsn, keys).items() if k[0] in MANAGED}
        if stored == results.rows or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    missing = {k: v for k, v in results.rows.items() if stored.get(k) != v}
    extra = {k: v for k, v in stored.items() if k not in results.rows}
    assert not missing, f"PostgreSQL does not hold: {dict(list(missing.items())[:5])}"
    assert not extra, f"PostgreSQL holds rows the model deleted: {dict(list(extra.items())[:5])}"
    return results


@pytest.mark.timeout(180)
async def test_no_key_reads_or_overwrites_another_keys_or_namespaces_data(app: App) -> None:
    results = await asyncio.to_thread(
        run_isolation_model, f"127.0.0.1:{app.port}", app.settings.postgres.url
    )
    assert results.runs >= examples(MODEL_RUNS) // 2, results.runs
    assert results.rows, "no run wrote anything"


# -- regressions found by the tests above ---------------------------------------------------


HUGE = "c" * 20_000
WIDE = "\u65e5" * 20_000  # 3 bytes of UTF-8, 9 once percent-encoded in grpc-message
ECHO_REASON = (
    "server bug: rpc/status.py _bounded() cuts error details at 1024 characters, but gRPC "
    "sends grpc-message percent-encoded (a 3-byte character becomes 9 bytes): quoting 1000 "
    "CJK characters makes ~9 KB of metadata, past gRPC's 8 KiB soft limit, and the client "
    "gets RESOURCE_EXHAUSTED 'received metadata size exceeds soft limit' instead of "
    "INVALID_ARGUMENT for a random share of calls (9 % and 1 % in 100 tries); bound the "
    "encoded size instead"
)
ECHOES: dict[str, tuple[str, str, bytes]] = {
    "namespace name": ("n" * 20_000, "k", b"v"),
    "column name": ("users", "123456789", json.dumps({HUGE: 1}).encode()),
    "id that differs from the key": ("users", "123456789", json.dumps({"id": HUGE}).encode()),
    "value quoted by PostgreSQL": (
        "users",
        "123456789",
        json.dumps({"name": "x", "updated_at": HUGE}).encode(),
    ),
    "non-ASCII namespace name": (WIDE, "k", b"v"),
    "non-ASCII column name": ("users", "123456789", json.dumps({WIDE: 1}).encode()),
    "non-ASCII id": ("users", "123456789", json.dumps({"id": WIDE}).encode()),
    "non-ASCII value quoted by PostgreSQL": (
        "users",
        "123456789",
        json.dumps({"name": "x", "updated_at": WIDE}, ensure_ascii=False).encode(),
    ),
}
KNOWN_ECHOES: set[str] = set()  # every echo is now bounded (rpc/status.py)


@pytest.mark.parametrize(
    "echoed",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=ECHO_REASON))
        if name in KNOWN_ECHOES
        else name
        for name in ECHOES
    ],
)
async def test_an_error_about_a_huge_input_keeps_its_status_and_a_short_message(
    stub: pb_grpc.CacheCoordServiceAsyncStub, echoed: str
) -> None:
    namespace, key, value = ECHOES[echoed]
    request = pb.PutRequest(namespace=namespace, key=key, value=value)
    got, _ = await outcome(stub.Put(request, timeout=CALL_TIMEOUT))
    check(got, Code.NOT_FOUND if "namespace" in echoed else Code.INVALID_ARGUMENT)
    # What travels is the percent-encoded message: the 8 KiB soft limit applies
    # to that (with the other headers), and past it the status is lost at random.
    assert grpc_message_size(got.details) < 4096, grpc_message_size(got.details)


def grpc_message_size(details: str) -> int:
    """Bytes of the grpc-message header: UTF-8, percent-encoded outside 0x20-0x7E."""
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in details.encode())


async def test_a_write_behind_value_read_past_its_ttl_before_its_flush_is_still_found(
    stub: pb_grpc.CacheCoordServiceAsyncStub, app: App
) -> None:
    """Found by the state machine above (ttl_ms=1 on the write-behind
    namespace): a Put acknowledged a moment ago, past its fresh time and not
    yet flushed, read as "not found" from PostgreSQL."""
    key = f"unflushed-{token()}"
    async with await psycopg.AsyncConnection.connect(app.settings.postgres.url) as blocker:
        # Flushes wait for this lock (reads do not): the Put stays unflushed.
        await blocker.execute("LOCK TABLE cachecoord.entries IN EXCLUSIVE MODE")
        try:
            put = await stub.Put(
                pb.PutRequest(namespace="queued", key=key, value=b"acked", ttl_ms=1), timeout=5
            )
            await asyncio.sleep(0.01)  # past its 1 ms fresh time
            got = await stub.Get(pb.GetRequest(namespace="queued", key=key), timeout=5)
        finally:
            await blocker.rollback()
    assert (got.found, got.value, got.version) == (True, b"acked", put.version)
