"""Bad input through real gRPC: every mistake gets a precise status and message,
and nothing is written. Also keys full of syntax (braces, colons, newlines,
SQL) round-trip exactly, and compare-and-set answers.

Every rejected call must come back with a non-empty message and never as
UNKNOWN or INTERNAL; after it, the key is read back from PostgreSQL (cached
copy dropped first) to show that nothing changed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable

import grpc
import psycopg
import pytest

from cachecoord.app import App
from cachecoord.config import Kind
from cachecoord_client import AsyncClient, CacheCoordError, Layer

Code = grpc.StatusCode
NewUserId = Callable[[], str]
Op = Callable[[AsyncClient, str, str], Awaitable[object]]

CONFIGURED = ("blobs", "sessions", "short", "users")
WRITABLE_USER_COLUMNS = "email, id, karma, name, updated_at"

OPS: dict[str, Op] = {
    "get": lambda c, ns, k: c.get(ns, k),
    "batch_get": lambda c, ns, k: c.batch_get(ns, [k]),
    "put": lambda c, ns, k: c.put(ns, k, b'{"name": "x"}'),
    "delete": lambda c, ns, k: c.delete(ns, k),
    "invalidate": lambda c, ns, k: c.invalidate(ns, [k]),
}
NAMESPACE_OPS: dict[str, Op] = {
    **OPS,
    "invalidate_all": lambda c, ns, k: c.invalidate(ns, all=True),
}


async def rejected(
    call: Awaitable[object], code: grpc.StatusCode, *fragments: str
) -> CacheCoordError:
    """Await *call*, expect it to fail with *code* and a message holding *fragments*."""
    with pytest.raises(CacheCoordError) as info:
        await call
    err = info.value
    assert err.code not in (Code.UNKNOWN, Code.INTERNAL), f"{err.code.name}: {err.details}"
    assert err.code == code, f"expected {code.name}, got {err.code.name}: {err.details}"
    assert err.details.strip(), f"{err.code.name} came without a message"
    for fragment in fragments:
        assert fragment in err.details, f"{fragment!r} not in {err.details!r}"
    return err


async def stored(client: AsyncClient, namespace: str, key: str) -> tuple[bool, bytes, int]:
    """The key as PostgreSQL holds it: any cached copy is dropped first."""
    await client.invalidate(namespace, [key])
    got = await client.get(namespace, key)
    if got.found:
        assert got.layer is Layer.DATABASE
    return got.found, got.value, got.version


ABSENT = (False, b"", 0)


async def assert_version_unused(client: AsyncClient, namespace: str, key: str) -> None:
    """A rejected write to a new key must not have consumed a version: the
    first real write still creates version 1."""
    value = b'{"name": "after"}' if namespace == "users" else b"after"
    assert await client.put(namespace, key, value) == 1


async def users_table_rows(app: App) -> int:
    async with await psycopg.AsyncConnection.connect(app.settings.postgres.url) as conn:
        cur = await conn.execute("SELECT count(*) FROM users")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def create_user(client: AsyncClient, user_id: str, **columns: object) -> dict[str, object]:
    row = {"name": f"user {user_id}", "karma": 5, **columns}
    await client.put("users", user_id, json.dumps(row).encode())
    got = await client.get("users", user_id)
    assert got.found
    value: dict[str, object] = json.loads(got.value)
    return value


# -- namespaces -----------------------------------------------------------------


@pytest.mark.parametrize("op", NAMESPACE_OPS)
async def test_unknown_namespace_is_not_found_and_lists_the_configured_ones(
    client: AsyncClient, app: App, key: str, op: str
) -> None:
    err = await rejected(NAMESPACE_OPS[op](client, "no-such-ns", key), Code.NOT_FOUND)
    assert "'no-such-ns'" in err.details
    configured = set(app.settings.namespaces)
    assert set(CONFIGURED) <= configured
    for name in configured:
        assert name in err.details


@pytest.mark.parametrize("namespace", ["Users", " users", "users ", "users\n", "blobs:x", "*"])
async def test_namespace_names_match_exactly(client: AsyncClient, key: str, namespace: str) -> None:
    await rejected(client.put(namespace, key, b"v"), Code.NOT_FOUND, "users")
    for name in ("blobs", "sessions", "short"):
        assert await stored(client, name, key) == ABSENT


@pytest.mark.parametrize("op", NAMESPACE_OPS)
async def test_empty_namespace_is_invalid_argument(client: AsyncClient, key: str, op: str) -> None:
    await rejected(NAMESPACE_OPS[op](client, "", key), Code.INVALID_ARGUMENT, "namespace")


# -- keys ----------------------------------------------------------------------


@pytest.mark.parametrize("namespace", ["blobs", "users"])
@pytest.mark.parametrize("op", OPS)
async def test_empty_key_is_invalid_argument(client: AsyncClient, namespace: str, op: str) -> None:
    await rejected(OPS[op](client, namespace, ""), Code.INVALID_ARGUMENT, "key", "empty")


@pytest.mark.parametrize("op", OPS)
async def test_key_over_512_bytes_is_invalid_argument(
    client: AsyncClient, key: str, op: str
) -> None:
    long_key = key + "x" * (513 - len(key))
    await rejected(OPS[op](client, "blobs", long_key), Code.INVALID_ARGUMENT, "513 bytes", "512")
    assert await stored(client, "blobs", long_key[:512]) == ABSENT


async def test_key_limit_counts_utf8_bytes_not_characters(client: AsyncClient, key: str) -> None:
    # 171 euro signs are 513 bytes; 170 are 510.
    too_long = "€" * 171
    await rejected(client.put("blobs", too_long, b"v"), Code.INVALID_ARGUMENT, "513 bytes")
    fits = key + "é" * ((512 - len(key)) // 2)
    assert 511 <= len(fits.encode()) <= 512
    version = await client.put("blobs", fits, b"fits")
    got = await client.get("blobs", fits)
    assert (got.found, got.value, got.version) == (True, b"fits", version)


@pytest.mark.parametrize("op", OPS)
async def test_key_with_nul_is_invalid_argument(client: AsyncClient, key: str, op: str) -> None:
    await rejected(OPS[op](client, "blobs", f"{key}\x00tail"), Code.INVALID_ARGUMENT, "NUL")
    # Not truncated at the NUL either.
    assert await stored(client, "blobs", key) == ABSENT


async def test_one_bad_key_fails_the_whole_batch(client: AsyncClient, key: str) -> None:
    await client.put("blobs", key, b"v")
    await rejected(client.batch_get("blobs", [key, ""]), Code.INVALID_ARGUMENT, "empty")
    await rejected(client.batch_get("blobs", [key, "a\x00"]), Code.INVALID_ARGUMENT, "NUL")
    await rejected(client.invalidate("blobs", [key, ""]), Code.INVALID_ARGUMENT, "empty")
    await rejected(client.batch_get("users", ["1", "01"]), Code.INVALID_ARGUMENT, "'1'")


# -- values --------------------------------------------------------------------


@pytest.mark.parametrize("namespace", ["blobs", "sessions"])
async def test_value_over_max_value_bytes_is_invalid_argument(
    client: AsyncClient, app: App, key: str, namespace: str
) -> None:
    limit = app.settings.server.max_value_bytes
    assert limit == 1_048_576
    await rejected(
        client.put(namespace, key, b"x" * (limit + 1)),
        Code.INVALID_ARGUMENT,
        f"{limit + 1} bytes",
        "server.max_value_bytes",
    )
    assert await stored(client, namespace, key) == ABSENT
    await assert_version_unused(client, namespace, key)


async def test_value_of_exactly_max_value_bytes_is_stored(
    client: AsyncClient, app: App, key: str
) -> None:
    value = bytes(range(256)) * (app.settings.server.max_value_bytes // 256)
    version = await client.put("blobs", key, value)
    assert await stored(client, "blobs", key) == (True, value, version)


# -- mapped keys ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "canonical"),
    [("01", "'1'"), ("007", "'7'"), ("+5", "'5'"), (" 1", "'1'"), ("1 ", "'1'"),
     ("-0", "'0'"), ("1_000", "'1000'"), ("\u0661", "'1'")],
)  # fmt: skip
@pytest.mark.parametrize("op", OPS)
async def test_non_canonical_mapped_key_names_the_canonical_form(
    client: AsyncClient, op: str, bad: str, canonical: str
) -> None:
    await rejected(OPS[op](client, "users", bad), Code.INVALID_ARGUMENT, "canonical", canonical)
    # User 1 is untouched when "01" was refused.
    got = await client.get("users", "1")
    assert got.found
    assert json.loads(got.value)["name"] == "Ada Lovelace"


@pytest.mark.parametrize(
    "bad", ["abc", "1.0", "1e3", "0x10", "2147483648", "-2147483649", "1; DROP TABLE users"]
)
@pytest.mark.parametrize("op", OPS)
async def test_mapped_key_that_is_not_an_integer_is_invalid_argument(
    client: AsyncClient, app: App, op: str, bad: str
) -> None:
    await rejected(OPS[op](client, "users", bad), Code.INVALID_ARGUMENT, "integer", repr(bad))
    assert await users_table_rows(app) >= 3


# -- mapped values -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (b"{not json", "JSON object"),
        (b"", "JSON object"),
        (b"\xff\xfe{}", "JSON object"),
        (b'{"name": "x"', "JSON object"),
        (b'{"name": "x"} trailing', "JSON object"),
        (b"[1, 2]", "not list"),
        (b'[{"name": "x"}]', "not list"),
        (b'"a string"', "not str"),
        (b"42", "not int"),
        (b"null", "not NoneType"),
        (b"true", "not bool"),
    ],
)
async def test_mapped_value_that_is_not_a_json_object_is_invalid_argument(
    client: AsyncClient, new_user_id: NewUserId, value: bytes, fragment: str
) -> None:
    user = new_user_id()
    await rejected(client.put("users", user, value), Code.INVALID_ARGUMENT, "users", fragment)
    assert await stored(client, "users", user) == ABSENT
    await assert_version_unused(client, "users", user)


async def test_unknown_column_lists_the_writable_columns(
    client: AsyncClient, new_user_id: NewUserId
) -> None:
    user = new_user_id()
    await rejected(
        client.put("users", user, b'{"name": "x", "nmae": "y"}'),
        Code.INVALID_ARGUMENT,
        "'nmae'",
        WRITABLE_USER_COLUMNS,
    )
    assert await stored(client, "users", user) == ABSENT
    await assert_version_unused(client, "users", user)


@pytest.mark.parametrize(
    "column",
    [
        "name; DROP TABLE users; --",
        'name") VALUES (1); DROP TABLE users; --',
        "1'; DROP TABLE users; --",
        "NAME",
        "",
    ],
)
async def test_sql_fragment_as_a_column_name_is_invalid_argument_and_harmless(
    client: AsyncClient, app: App, new_user_id: NewUserId, column: str
) -> None:
    rows = await users_table_rows(app)
    user = new_user_id()
    await rejected(
        client.put("users", user, json.dumps({"name": "x", column: "y"}).encode()),
        Code.INVALID_ARGUMENT,
        repr(column),
        WRITABLE_USER_COLUMNS,
    )
    assert await users_table_rows(app) == rows
    assert await stored(client, "users", user) == ABSENT
    ada = await stored(client, "users", "1")
    assert ada[0]
    assert json.loads(ada[1])["name"] == "Ada Lovelace"


async def test_sql_in_a_column_value_is_stored_verbatim(
    client: AsyncClient, app: App, new_user_id: NewUserId
) -> None:
    user = new_user_id()
    name = "Robert'); DROP TABLE users; -- %s %(x)s {}"
    row = await create_user(client, user, name=name)
    assert row["name"] == name
    assert await users_table_rows(app) >= 4


@pytest.mark.parametrize(
    "given", [lambda u: int(u) + 1, lambda u: str(int(u) + 1), lambda u: "0" + u, lambda u: None,
              lambda u: True, lambda u: float(u), lambda u: [u]],
)  # fmt: skip
async def test_id_different_from_the_key_is_invalid_argument(
    client: AsyncClient, new_user_id: NewUserId, given: Callable[[str], object]
) -> None:
    user = new_user_id()
    value = json.dumps({"id": given(user), "name": "x"}).encode()
    await rejected(client.put("users", user, value), Code.INVALID_ARGUMENT, "'id'", repr(user))
    assert await stored(client, "users", user) == ABSENT
    other = str(int(user) + 1)
    assert await stored(client, "users", other) == ABSENT
    await assert_version_unused(client, "users", user)


@pytest.mark.parametrize("given", [int, str])
async def test_id_equal_to_the_key_is_accepted(
    client: AsyncClient, new_user_id: NewUserId, given: Callable[[str], object]
) -> None:
    user = new_user_id()
    await client.put("users", user, json.dumps({"id": given(user), "name": "x"}).encode())
    found, value, _ = await stored(client, "users", user)
    assert found
    assert json.loads(value)["id"] == int(user)


@pytest.mark.parametrize("value", [{"karma": 3}, {}, {"email": "x@example.com"}, {"name": None}])
async def test_new_row_without_name_violates_not_null(
    client: AsyncClient, new_user_id: NewUserId, value: dict[str, object]
) -> None:
    user = new_user_id()
    await rejected(
        client.put("users", user, json.dumps(value).encode()),
        Code.INVALID_ARGUMENT,
        "name",
        "null",
    )
    assert await stored(client, "users", user) == ABSENT
    await assert_version_unused(client, "users", user)


@pytest.mark.parametrize("value", [{"name": None}, {"karma": None}])
async def test_null_into_a_not_null_column_of_an_existing_row_changes_nothing(
    client: AsyncClient, new_user_id: NewUserId, value: dict[str, object]
) -> None:
    user = new_user_id()
    await create_user(client, user)
    before = await stored(client, "users", user)
    await rejected(
        client.put("users", user, json.dumps(value).encode()), Code.INVALID_ARGUMENT, "null"
    )
    assert await stored(client, "users", user) == before


async def test_check_violation_is_invalid_argument(
    client: AsyncClient, new_user_id: NewUserId
) -> None:
    new = new_user_id()
    await rejected(
        client.put("users", new, b'{"name": "x", "karma": -1}'),
        Code.INVALID_ARGUMENT,
        "karma",
        "check",
    )
    assert await stored(client, "users", new) == ABSENT
    await assert_version_unused(client, "users", new)

    existing = new_user_id()
    await create_user(client, existing)
    before = await stored(client, "users", existing)
    await rejected(
        client.put("users", existing, b'{"karma": -1}'), Code.INVALID_ARGUMENT, "karma", "check"
    )
    assert await stored(client, "users", existing) == before


@pytest.mark.parametrize(
    "value",
    [
        b'{"karma": "lots"}',
        b'{"karma": 1.5}',
        b'{"karma": true}',
        b'{"karma": [1]}',
        b'{"karma": {"n": 1}}',
        b'{"karma": 3000000000}',
        b'{"karma": NaN}',
        b'{"karma": Infinity}',
        b'{"updated_at": "not a time"}',
        b'{"name": "a\\u0000b"}',
    ],
)
async def test_value_of_the_wrong_type_for_a_column_is_invalid_argument(
    client: AsyncClient, new_user_id: NewUserId, value: bytes
) -> None:
    new = new_user_id()
    row = json.loads(value)
    row.setdefault("name", "x")
    await rejected(
        client.put("users", new, json.dumps(row).encode()), Code.INVALID_ARGUMENT, "PostgreSQL"
    )
    assert await stored(client, "users", new) == ABSENT
    await assert_version_unused(client, "users", new)

    existing = new_user_id()
    await create_user(client, existing)
    before = await stored(client, "users", existing)
    await rejected(client.put("users", existing, value), Code.INVALID_ARGUMENT, "PostgreSQL")
    assert await stored(client, "users", existing) == before


async def test_unique_violation_is_failed_precondition(
    client: AsyncClient, new_user_id: NewUserId
) -> None:
    ada = await client.get("users", "1")
    assert ada.found
    email = json.loads(ada.value)["email"]
    assert email

    new = new_user_id()
    err = await rejected(
        client.put("users", new, json.dumps({"name": "Copy", "email": email}).encode()),
        Code.FAILED_PRECONDITION,
        "email",
    )
    assert "unique" in err.details.lower()
    assert await stored(client, "users", new) == ABSENT
    await assert_version_unused(client, "users", new)

    existing = new_user_id()
    await create_user(client, existing, email=f"{existing}@example.com")
    before = await stored(client, "users", existing)
    await rejected(
        client.put("users", existing, json.dumps({"email": email}).encode()),
        Code.FAILED_PRECONDITION,
        "unique",
    )
    assert await stored(client, "users", existing) == before
    assert json.loads((await stored(client, "users", "1"))[1])["email"] == email


async def test_deeply_nested_json_is_invalid_argument(
    client: AsyncClient, new_user_id: NewUserId
) -> None:
    user = new_user_id()
    depth = 100_000
    value = b'{"name": ' + b"[" * depth + b"]" * depth + b"}"
    await rejected(client.put("users", user, value), Code.INVALID_ARGUMENT)
    assert await stored(client, "users", user) == ABSENT


async def test_integer_with_too_many_digits_is_invalid_argument(
    client: AsyncClient, new_user_id: NewUserId
) -> None:
    user = new_user_id()
    value = b'{"name": "x", "karma": ' + b"9" * 5000 + b"}"
    await rejected(client.put("users", user, value), Code.INVALID_ARGUMENT, "digits")
    assert await stored(client, "users", user) == ABSENT


@pytest.mark.parametrize(
    "payload",
    [
        b"\x0a\x05blobs\x12\x02\xff\xfe",  # namespace "blobs", key b"\xff\xfe"
        b"\xff\xff\xff",  # not protobuf at all
    ],
)
async def test_request_that_does_not_parse_is_invalid_argument(app: App, payload: bytes) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        get = channel.unary_unary(
            "/cachecoord.v1.CacheCoordService/Get",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await get(payload, timeout=5)
    assert info.value.code() == Code.INVALID_ARGUMENT, info.value.details()
    assert "DecodeError" not in (info.value.details() or "")


# -- numbers in requests -------------------------------------------------------------


@pytest.mark.parametrize("ttl_ms", [-1, -(2**63), 365 * 86_400_000 + 1, 2**63 - 1])
async def test_ttl_out_of_range_is_invalid_argument(
    client: AsyncClient, key: str, ttl_ms: int
) -> None:
    await rejected(
        client.put("blobs", key, b"v", ttl_ms=ttl_ms), Code.INVALID_ARGUMENT, "ttl_ms", str(ttl_ms)
    )
    assert await stored(client, "blobs", key) == ABSENT
    await assert_version_unused(client, "blobs", key)


@pytest.mark.parametrize("expected_version", [-1, -(2**63)])
async def test_negative_expected_version_is_invalid_argument(
    client: AsyncClient, key: str, expected_version: int
) -> None:
    await rejected(
        client.put("blobs", key, b"v", expected_version=expected_version),
        Code.INVALID_ARGUMENT,
        "expected_version",
    )
    assert await stored(client, "blobs", key) == ABSENT

    version = await client.put("blobs", key, b"kept")
    assert version == 1
    await rejected(
        client.delete("blobs", key, expected_version=expected_version),
        Code.INVALID_ARGUMENT,
        "expected_version",
    )
    assert await stored(client, "blobs", key) == (True, b"kept", version)


# -- batches -------------------------------------------------------------------


async def test_batch_get_without_keys_is_invalid_argument(client: AsyncClient) -> None:
    await rejected(client.batch_get("blobs", []), Code.INVALID_ARGUMENT, "key")
    await rejected(client.batch_get("users", []), Code.INVALID_ARGUMENT, "key")


async def test_batch_get_over_1000_keys_is_invalid_argument(client: AsyncClient, key: str) -> None:
    keys = [f"{key}-{i}" for i in range(1001)]
    await rejected(
        client.batch_get("blobs", keys), Code.INVALID_ARGUMENT, "1001", "server.max_batch_keys"
    )


async def test_batch_get_of_exactly_1000_keys_answers_each_in_order(
    client: AsyncClient, key: str
) -> None:
    keys = [f"{key}-{i}" for i in reversed(range(1000))]
    await client.put("blobs", keys[500], b"middle")
    entries = await client.batch_get("blobs", keys)
    assert [e.key for e in entries] == keys
    assert [e.found for e in entries] == [i == 500 for i in range(1000)]
    assert entries[500].value == b"middle"


async def test_invalidate_with_neither_keys_nor_all_is_invalid_argument(
    client: AsyncClient,
) -> None:
    await rejected(client.invalidate("blobs"), Code.INVALID_ARGUMENT, "all")


async def test_invalidate_with_both_keys_and_all_is_invalid_argument(
    client: AsyncClient, key: str
) -> None:
    await client.put("blobs", key, b"v")
    await client.get("blobs", key)
    assert (await client.get("blobs", key)).layer is Layer.REDIS
    await rejected(client.invalidate("blobs", [key], all=True), Code.INVALID_ARGUMENT, "both")
    # Nothing was dropped.
    assert (await client.get("blobs", key)).layer is Layer.REDIS


async def test_invalidate_over_1000_keys_is_invalid_argument(client: AsyncClient, key: str) -> None:
    keys = [f"{key}-{i}" for i in range(1001)]
    await rejected(client.invalidate("blobs", keys), Code.INVALID_ARGUMENT, "1001")


# -- keys full of syntax -------------------------------------------------------------

AWKWARD = [
    "{",
    "}",
    "a}",
    "{a}",
    "}{",
    ":",
    "a:b",
    "a}:lease",
    ":lease",
    "}:lease",
    "cc:{blobs:x}",
    "line\nbreak",
    "\r\n",
    "tab\there",
    " ",
    "  padded  ",
    "ünïcødé ✓ 🎉 日本語",
    "\u200b",
    "1'; DROP TABLE users; --",
    "'; DELETE FROM cachecoord.entries; --",
    "%s %(ns)s %%",
    "* ? [a-z] \\",
    '"quoted"',
    "null",
    "-",
]


@pytest.mark.parametrize("suffix", AWKWARD)
async def test_awkward_key_round_trips_exactly(client: AsyncClient, key: str, suffix: str) -> None:
    k = key + suffix
    value = k.encode() + b"\x00\xff"
    version = await client.put("blobs", k, value)
    assert await stored(client, "blobs", k) == (True, value, version)
    # Served from Redis too, unchanged.
    assert (await client.get("blobs", k)).layer is Layer.REDIS
    cached = await client.get("blobs", k)
    assert (cached.found, cached.value, cached.version) == (True, value, version)
    [entry] = await client.batch_get("blobs", [k])
    assert (entry.key, entry.found, entry.value) == (k, True, value)
    # The prefix alone is another key, never written.
    assert await stored(client, "blobs", key) == ABSENT
    deleted = await client.delete("blobs", k)
    assert deleted.deleted
    assert await stored(client, "blobs", k) == ABSENT


@pytest.mark.parametrize("suffix", AWKWARD)
async def test_awkward_key_alone_round_trips(client: AsyncClient, suffix: str) -> None:
    # Exactly the awkward key, no prefix: only this test writes it, and it
    # leaves it deleted.
    await client.delete("blobs", suffix)
    version = await client.put("blobs", suffix, b"alone")
    assert await stored(client, "blobs", suffix) == (True, b"alone", version)
    assert (await client.delete("blobs", suffix)).deleted


async def test_awkward_keys_round_trip_in_every_managed_namespace(
    client: AsyncClient, app: App, key: str
) -> None:
    managed = [ns.name for ns in app.settings.namespaces.values() if ns.kind is Kind.MANAGED]
    assert {"blobs", "sessions"} <= set(managed)
    keys = [key + suffix for suffix in AWKWARD]
    for namespace in managed:
        expected = {k: f"{namespace}/{k!r}".encode() for k in keys}
        for k, value in expected.items():
            await client.put(namespace, k, value)
        entries = await client.batch_get(namespace, keys)
        assert [(e.key, e.found, e.value) for e in entries] == [
            (k, True, expected[k]) for k in keys
        ], namespace
        for k, value in expected.items():
            got = await client.get(namespace, k)
            assert (got.found, got.value) == (True, value), (namespace, k)
        # Deleting one leaves the others.
        assert (await client.delete(namespace, keys[0])).deleted
        entries = await client.batch_get(namespace, keys)
        assert [e.found for e in entries] == [k != keys[0] for k in keys], namespace


async def test_keys_that_collide_under_naive_key_naming_stay_apart(
    client: AsyncClient, key: str
) -> None:
    suffixes = ["", "}", "}}", ":lease", "}:lease", ":lease}", "}:ver", "{", "\n", ":"]
    keys = [key + s for s in suffixes]
    versions = {k: await client.put("blobs", k, f"value of {k!r}".encode()) for k in keys}
    for k in keys:
        assert await stored(client, "blobs", k) == (True, f"value of {k!r}".encode(), versions[k])
        assert (await client.get("blobs", k)).layer is Layer.REDIS
    entries = await client.batch_get("blobs", keys)
    assert [(e.key, e.value) for e in entries] == [(k, f"value of {k!r}".encode()) for k in keys]

    # Invalidating, rewriting and deleting one touches no other.
    await client.invalidate("blobs", [key + "}"])
    await client.put("blobs", key + ":lease", b"rewritten")
    await client.delete("blobs", key)
    for k in keys:
        got = await client.get("blobs", k)
        if k == key:
            assert not got.found
        elif k == key + ":lease":
            assert got.value == b"rewritten"
        else:
            assert got.value == f"value of {k!r}".encode()
            assert got.version == versions[k]
        if k not in (key, key + "}", key + ":lease"):
            assert got.layer is Layer.REDIS, f"{k!r} lost its cached copy"


async def test_same_key_in_two_namespaces_is_two_entries(client: AsyncClient, key: str) -> None:
    k = key + "}:{sessions:" + key
    await client.put("blobs", k, b"in blobs")
    await client.put("sessions", k, b"in sessions")
    await client.put("sessions", key, b"plain")
    assert (await client.get("blobs", k)).value == b"in blobs"
    assert (await client.get("sessions", k)).value == b"in sessions"
    assert (await client.get("sessions", key)).value == b"plain"
    await client.delete("blobs", k)
    assert (await client.get("sessions", k)).value == b"in sessions"


async def test_sql_fragment_key_in_mapped_namespace_is_rejected_and_the_table_survives(
    client: AsyncClient, app: App
) -> None:
    rows = await users_table_rows(app)
    fragment = "1'; DROP TABLE users; --"
    for op in OPS.values():
        await rejected(op(client, "users", fragment), Code.INVALID_ARGUMENT, "integer")
    assert await users_table_rows(app) == rows
    found, value, _ = await stored(client, "users", "1")
    assert found
    assert json.loads(value)["name"] == "Ada Lovelace"


# -- compare-and-set -------------------------------------------------------------


def mentions_version(details: str, key: str, version: int) -> bool:
    return re.search(rf"\b{version}\b", details.replace(repr(key), "")) is not None


@pytest.mark.parametrize("namespace", ["blobs", "sessions"])
async def test_put_with_expected_version_zero_creates_only_once(
    client: AsyncClient, key: str, namespace: str
) -> None:
    first = await client.put(namespace, key, b"first", expected_version=0)
    assert first >= 1
    err = await rejected(
        client.put(namespace, key, b"second", expected_version=0), Code.FAILED_PRECONDITION
    )
    assert mentions_version(err.details, key, first), err.details
    assert await stored(client, namespace, key) == (True, b"first", first)


async def test_put_with_the_current_version_succeeds_and_a_stale_one_fails(
    client: AsyncClient, key: str
) -> None:
    v1 = await client.put("blobs", key, b"one")
    v2 = await client.put("blobs", key, b"two", expected_version=v1)
    assert v2 > v1
    for wrong in (v1, v2 + 1, 2**63 - 1):
        err = await rejected(
            client.put("blobs", key, b"lost", expected_version=wrong), Code.FAILED_PRECONDITION
        )
        assert mentions_version(err.details, key, v2), err.details
    assert await stored(client, "blobs", key) == (True, b"two", v2)
    # The refused writes used no version.
    assert await client.put("blobs", key, b"three") == v2 + 1


async def test_put_with_expected_version_on_a_missing_key_fails(
    client: AsyncClient, key: str
) -> None:
    err = await rejected(
        client.put("blobs", key, b"v", expected_version=1), Code.FAILED_PRECONDITION
    )
    assert mentions_version(err.details, key, 0), err.details
    assert await stored(client, "blobs", key) == ABSENT


async def test_delete_with_wrong_expected_version_keeps_the_key(
    client: AsyncClient, key: str
) -> None:
    version = await client.put("blobs", key, b"keep me")
    for wrong in (0, version + 1, version - 1):
        err = await rejected(
            client.delete("blobs", key, expected_version=wrong), Code.FAILED_PRECONDITION
        )
        assert mentions_version(err.details, key, version), err.details
        assert await stored(client, "blobs", key) == (True, b"keep me", version)
    deleted = await client.delete("blobs", key, expected_version=version)
    assert deleted.deleted
    assert deleted.version > version
    assert await stored(client, "blobs", key) == ABSENT


async def test_mapped_put_with_expected_version_zero_creates_only_once(
    client: AsyncClient, new_user_id: NewUserId
) -> None:
    user = new_user_id()
    first = await client.put("users", user, b'{"name": "first"}', expected_version=0)
    err = await rejected(
        client.put("users", user, b'{"name": "second"}', expected_version=0),
        Code.FAILED_PRECONDITION,
    )
    assert mentions_version(err.details, user, first), err.details
    found, value, version = await stored(client, "users", user)
    assert (found, json.loads(value)["name"], version) == (True, "first", first)


async def test_expected_version_zero_refuses_a_row_created_outside_cachecoord(
    client: AsyncClient, app: App, new_user_id: NewUserId
) -> None:
    user = new_user_id()
    async with await psycopg.AsyncConnection.connect(
        app.settings.postgres.url, autocommit=True
    ) as conn:
        await conn.execute("INSERT INTO users (id, name) VALUES (%s, 'outside')", (int(user),))
    await rejected(
        client.put("users", user, b'{"name": "overwritten"}', expected_version=0),
        Code.FAILED_PRECONDITION,
    )
    found, value, _ = await stored(client, "users", user)
    assert (found, json.loads(value)["name"]) == (True, "outside")
