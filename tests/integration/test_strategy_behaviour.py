"""One behaviour suite, written once, run against every strategy and both kinds
of namespace (the dogpile.cache conformance-suite idea): what a client may rely
on whatever the operator configured. Each strategy's own guarantees follow.

Every test runs against two instances sharing Redis and PostgreSQL: the
session's ``backend_client`` and ``other``, a second instance started here;
and it runs twice: on a single Redis, and on a Redis Cluster (``backend``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from strategy_support import named, serving

from cachecoord.app import App
from cachecoord_client import AsyncClient, Layer, VersionConflict
from conftest import Backend


@dataclass(frozen=True)
class Flavour:
    """A namespace of the test configuration, and how its values look."""

    namespace: str
    strategy: str
    column: str | None = None  # mapped: the integer column the number goes to

    @property
    def mapped(self) -> bool:
        return self.column is not None

    def new_key(self) -> str:
        if self.mapped:  # keys of mapped namespaces are integer ids
            return str(1_000_000 + uuid.uuid4().int % 1_000_000_000)
        return f"k-{uuid.uuid4().hex[:12]}"

    def value(self, n: int) -> bytes:
        """The value that carries the number *n*."""
        if self.column is None:
            return b"%d" % n
        return json.dumps({"name": f"name-{n}", self.column: n}).encode()

    def number(self, value: bytes) -> int:
        """The number a stored value carries (a mapped row has more columns)."""
        if self.column is None:
            return int(value)
        row = json.loads(value)
        assert row["name"] == f"name-{row[self.column]}", row
        return int(row[self.column])

    def same(self, a: bytes, b: bytes) -> bool:
        """Equal values; a mapped row may be reformatted once PostgreSQL has it."""
        return json.loads(a) == json.loads(b) if self.mapped else a == b


FLAVOURS = [
    Flavour("blobs", "cache-aside"),
    Flavour("sessions", "write-through"),
    Flavour("queued", "write-behind"),
    Flavour("users", "cache-aside", column="karma"),
    Flavour("profiles", "write-behind", column="score"),
]


@pytest.fixture(
    params=FLAVOURS, ids=[f"{f.strategy}-{'mapped' if f.mapped else 'managed'}" for f in FLAVOURS]
)
def flavour(request: pytest.FixtureRequest) -> Flavour:
    result: Flavour = request.param
    return result


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def other(
    backend: Backend, backend_app: App, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AsyncClient]:
    """A client of a second instance sharing backend_app's Redis and PostgreSQL;
    on the cluster, given another node's URL."""
    settings = backend.settings(tmp_path_factory.mktemp("other"), url=backend.urls[-1])
    async with serving(named(settings, f"other-{uuid.uuid4().hex[:6]}")) as (_, client):
        yield client


@pytest.fixture
def sql_log(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every SQL statement run in this process (a spy, not a fake)."""
    statements: list[str] = []
    original = psycopg.AsyncCursor.execute

    async def execute(self: psycopg.AsyncCursor[Any], query: Any, *args: Any, **kw: Any) -> Any:
        statements.append(query if isinstance(query, str) else query.as_string(None))
        return await original(self, query, *args, **kw)

    monkeypatch.setattr(psycopg.AsyncCursor, "execute", execute)
    return statements


# -- what every strategy guarantees ------------------------------------------


async def test_put_then_get_returns_value_and_version_on_every_instance(
    flavour: Flavour, backend_client: AsyncClient, other: AsyncClient
) -> None:
    key = flavour.new_key()
    version = await backend_client.put(flavour.namespace, key, flavour.value(1))

    there = await other.get(flavour.namespace, key)
    here = await backend_client.get(flavour.namespace, key)

    for got in (there, here):
        assert got.found
        assert flavour.number(got.value) == 1
        assert got.version == version


async def test_versions_strictly_increase_across_writes_deletes_and_instances(
    flavour: Flavour, backend_client: AsyncClient, other: AsyncClient
) -> None:
    ns, key = flavour.namespace, flavour.new_key()
    versions = [
        await backend_client.put(ns, key, flavour.value(1)),
        await other.put(ns, key, flavour.value(2)),
        await backend_client.put(ns, key, flavour.value(3)),
        (await other.delete(ns, key)).version,
        await backend_client.put(ns, key, flavour.value(4)),
    ]

    assert versions == sorted(set(versions)), versions
    assert (await other.get(ns, key)).version == versions[-1]


async def test_delete_makes_the_key_not_found_on_every_instance(
    flavour: Flavour, backend_client: AsyncClient, other: AsyncClient
) -> None:
    ns, key = flavour.namespace, flavour.new_key()
    await backend_client.put(ns, key, flavour.value(1))
    await backend_client.get(ns, key)
    await other.get(ns, key)  # cached (or read) on both first

    deleted = await backend_client.delete(ns, key)
    again = await other.delete(ns, key)

    assert deleted.deleted
    assert not again.deleted
    assert not (await backend_client.get(ns, key)).found
    assert not (await other.get(ns, key)).found


async def test_expected_version_zero_creates_only_a_missing_key(
    flavour: Flavour, backend_client: AsyncClient, other: AsyncClient
) -> None:
    ns, key = flavour.namespace, flavour.new_key()
    created = await backend_client.put(ns, key, flavour.value(1), expected_version=0)

    with pytest.raises(VersionConflict) as conflict:
        await other.put(ns, key, flavour.value(2), expected_version=0)

    assert str(created) in conflict.value.details
    got = await other.get(ns, key)
    assert (flavour.number(got.value), got.version) == (1, created)


async def test_mismatched_expected_version_fails_naming_the_current_one(
    flavour: Flavour, backend_client: AsyncClient, other: AsyncClient
) -> None:
    ns, key = flavour.namespace, flavour.new_key()
    first = await backend_client.put(ns, key, flavour.value(1))
    current = await backend_client.put(ns, key, flavour.value(2))

    with pytest.raises(VersionConflict) as conflict:
        await other.put(ns, key, flavour.value(3), expected_version=first)
    matched = await other.put(ns, key, flavour.value(4), expected_version=current)

    assert str(current) in conflict.value.details, conflict.value.details
    assert matched > current
    got = await backend_client.get(ns, key)
    assert (flavour.number(got.value), got.version) == (4, matched)


async def test_invalidate_never_loses_the_value(
    flavour: Flavour, backend_client: AsyncClient, other: AsyncClient
) -> None:
    ns, key = flavour.namespace, flavour.new_key()
    version = await backend_client.put(ns, key, flavour.value(1))
    before = await backend_client.get(ns, key)  # cached now (fill or write)

    await other.invalidate(ns, [key])

    for got in (await backend_client.get(ns, key), await other.get(ns, key)):
        assert got.found, got
        assert flavour.same(got.value, before.value)
        assert got.version == version


async def test_batch_get_agrees_with_get(
    flavour: Flavour, backend_client: AsyncClient, other: AsyncClient
) -> None:
    ns = flavour.namespace
    keys = [flavour.new_key() for _ in range(4)]
    for n, key in enumerate(keys[:3]):
        await backend_client.put(ns, key, flavour.value(n))
    await other.get(ns, keys[0])  # one hit, two misses, one missing key

    batch = await other.batch_get(ns, keys)
    singles = [await other.get(ns, key) for key in keys]

    assert [e.key for e in batch] == keys
    assert [e.found for e in batch] == [True, True, True, False]
    for entry, single in zip(batch, singles, strict=True):
        assert entry.found == single.found
        assert entry.version == single.version
        if entry.found:
            assert flavour.same(entry.value, single.value)


async def test_concurrent_compare_and_set_increments_count_exactly(
    flavour: Flavour, backend_client: AsyncClient, other: AsyncClient
) -> None:
    """20 clients increment one counter with read, +1, put(expected_version),
    retrying on FAILED_PRECONDITION: no increment is lost or doubled."""
    ns, key = flavour.namespace, flavour.new_key()

    async def increment(via: AsyncClient) -> int:
        for attempt in range(1, 500):
            got = await via.get(ns, key)
            count = flavour.number(got.value) if got.found else 0
            try:
                await via.put(
                    ns,
                    key,
                    flavour.value(count + 1),
                    expected_version=got.version if got.found else 0,
                )
            except VersionConflict:
                continue
            return attempt
        raise AssertionError("no increment succeeded in 500 attempts")

    attempts = await asyncio.gather(*(increment((backend_client, other)[i % 2]) for i in range(20)))

    assert sum(attempts) > 20, "the clients never collided: not a concurrency test"
    for via in (backend_client, other):
        assert flavour.number((await via.get(ns, key)).value) == 20


# -- each strategy's own guarantee -------------------------------------------


async def test_write_through_get_on_another_instance_is_a_redis_hit_without_sql(
    backend_client: AsyncClient, other: AsyncClient, sql_log: list[str], key: str
) -> None:
    await backend_client.put("sessions", key, b"old")
    await other.get("sessions", key)
    version = await backend_client.put("sessions", key, b"new")
    sql_log.clear()

    got = await other.get("sessions", key)

    assert (got.value, got.version, got.layer) == (b"new", version, Layer.REDIS)
    # No read of PostgreSQL. Background work may run meanwhile (outbox drains,
    # flushes of other namespaces, whose row locks are SELECT ... FOR UPDATE).
    reads = [s for s in sql_log if s.lstrip().upper().startswith("SELECT")]
    assert [s for s in reads if "FOR UPDATE" not in s.upper()] == []


async def test_cache_aside_put_drops_the_cached_copy_so_the_next_get_loads(
    backend_client: AsyncClient, other: AsyncClient, key: str
) -> None:
    await backend_client.put("blobs", key, b"old")
    assert (await other.get("blobs", key)).layer is Layer.DATABASE
    assert (await other.get("blobs", key)).layer is Layer.REDIS
    version = await backend_client.put("blobs", key, b"new")

    got = await other.get("blobs", key)

    assert (got.value, got.version, got.layer) == (b"new", version, Layer.DATABASE)
