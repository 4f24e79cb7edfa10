"""Keys of mapped tables have one spelling per row: the text PostgreSQL
writes for the key's value. Another spelling (an alias) is refused with the
canonical one named; a key column type without a canonical form that
cachecoord enforces is refused at start-up, naming the column.

Without this, a Put through ``2024-1-1`` updates the row of ``2024-01-01``
while Gets of ``2024-01-01`` keep serving its old cached copy until its TTL.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio
from strategy_support import serving

from cachecoord.app import App
from cachecoord.config import ConfigError
from cachecoord_client import AsyncClient, CacheCoordError, InvalidArgument
from conftest import new_database, settings_for
from local_servers import PostgresServer, RedisServer

# namespace -> key column type (each namespace's table has `k` as its key, and `note`)
KEYED = {
    "days": "date",
    "amounts": "numeric(10,0)",
    "rates": "numeric(6,2)",
    "codes": "character(4)",
    "tags": "varchar(5)",
    "names": "text",
}


def mapped(namespaces: dict[str, str]) -> str:
    return "".join(
        f'[namespaces.{ns}]\nkind = "mapped"\ntable = "{ns}"\nkey_column = "k"\nttl = "5m"\n'
        for ns in namespaces
    )


async def create_tables(dsn: str, tables: dict[str, str], collation: str = "") -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        if collation:
            await conn.execute(collation)
        for table, key_type in tables.items():
            await conn.execute(f"CREATE TABLE {table} (k {key_type} PRIMARY KEY, note text)")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def keyed(
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[AsyncClient]:
    """One instance for the module, on a database of its own (the only one
    with these tables, so no other instance serves these namespaces)."""
    dsn = new_database(postgres_server)
    await create_tables(dsn, KEYED)
    tmp = tmp_path_factory.mktemp("keyed")
    async with serving(settings_for(tmp, redis_server.url, dsn, namespaces=mapped(KEYED))) as (
        _,
        client,
    ):
        yield client


@pytest.mark.parametrize(
    ("namespace", "canonical", "alias"),
    [
        ("days", "2024-01-01", "2024-1-1"),
        ("amounts", "1", "1.0"),
        ("amounts", "-2", "-02"),
        ("rates", "1.50", "1.5"),
        ("rates", "0.00", "-0"),
        ("codes", "ab  ", "ab"),
        ("codes", "ab  ", "ab   "),
    ],
)
async def test_an_alias_of_a_key_is_refused_naming_the_canonical_form(
    keyed: AsyncClient, namespace: str, canonical: str, alias: str
) -> None:
    await keyed.put(namespace, canonical, b'{"note": "before"}')
    assert json.loads((await keyed.get(namespace, canonical)).value)["note"] == "before"

    refused = [
        await error_of(keyed.put(namespace, alias, b'{"note": "through the alias"}')),
        await error_of(keyed.get(namespace, alias)),
        await error_of(keyed.batch_get(namespace, [canonical, alias])),
        await error_of(keyed.delete(namespace, alias)),
    ]

    for err in refused:
        assert isinstance(err, InvalidArgument), err
        assert repr(canonical) in err.details, err.details
    assert json.loads((await keyed.get(namespace, canonical)).value)["note"] == "before"


@pytest.mark.parametrize(
    ("namespace", "key"),
    [("days", "2024-02-30"), ("days", "20240101"), ("amounts", "1e99"), ("tags", "abcdef")],
)
async def test_a_key_that_is_no_value_of_the_column_type_is_refused(
    keyed: AsyncClient, namespace: str, key: str
) -> None:
    err = await error_of(keyed.put(namespace, key, b'{"note": "x"}'))
    assert isinstance(err, InvalidArgument), err
    assert "column k" in err.details, err.details


@pytest.mark.parametrize(
    ("namespace", "key"),
    [("days", "0999-12-31"), ("rates", "-1234.56"), ("codes", "abcd"), ("names", " A b ")],
)
async def test_canonical_keys_round_trip(keyed: AsyncClient, namespace: str, key: str) -> None:
    version = await keyed.put(namespace, key, b'{"note": "here"}')
    got = await keyed.get(namespace, key)
    assert (got.version, json.loads(got.value)) == (version, {"k": got_key(key), "note": "here"})


def got_key(key: str) -> object:
    """The key as row_to_json gives it back: numbers as numbers."""
    try:
        return float(key) if "." in key else int(key)
    except ValueError:
        return key


@pytest.mark.parametrize(
    ("key_type", "shown"),
    [
        ("numeric", "numeric"),  # '1', '1.0': one row, shown with the scale it was written with
        ("timestamptz", "timestamp with time zone"),
        ("boolean", "boolean"),
        ("real", "real"),
        ("bpchar", "bpchar"),
        ("text COLLATE case_insensitive", "text"),
    ],
)
async def test_startup_refuses_a_key_column_type_without_a_canonical_form(
    redis_server: RedisServer, own_database: str, tmp_path: Path, key_type: str, shown: str
) -> None:
    await create_tables(
        own_database,
        {"loose": key_type},
        "CREATE COLLATION case_insensitive "
        "(provider = icu, locale = 'und-u-ks-level2', deterministic = false)",
    )
    app = App(
        settings_for(tmp_path, redis_server.url, own_database, namespaces=mapped({"loose": ""}))
    )
    with pytest.raises(ConfigError) as refused:
        await app.start()

    message = str(refused.value)
    assert "namespaces.loose.key_column" in message
    assert f"has type {shown}," in message


async def error_of(call: Awaitable[object]) -> CacheCoordError | None:
    try:
        await call
    except CacheCoordError as err:
        return err
    return None
