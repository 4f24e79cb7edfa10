"""The PostgreSQL tables that hold namespace values.

*Mapped*: an existing table; a value is one row as a JSON object. *Managed*:
cachecoord's own table of opaque bytes. Both load any number of keys in one
query, together with the keys' versions. Identifiers are quoted with
psycopg.sql and values are always bound parameters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from cachecoord.config import ConfigError, Kind, NamespaceSettings
from cachecoord.errors import InvalidArgument
from cachecoord.model import Row
from cachecoord.storage.key_forms import (
    SAMPLES,
    SUPPORTED,
    Canonical,
    NotAKey,
    UnsupportedKeyType,
    canonical_form,
)
from cachecoord.storage.tag_templates import TagTemplate, derive


class Table(Protocol):
    """Where one namespace's values live in PostgreSQL."""

    @property
    def merges_rows(self) -> bool:
        """True when a write names some columns of a row (mapped), so the value
        written is the current row with those columns replaced."""

    @property
    def writable_columns(self) -> frozenset[str]: ...

    @property
    def tagged(self) -> bool:
        """Whether rows may carry tags without a Put giving them (mapped
        tables with tag templates)."""

    def check_tags(self, tags: Sequence[str]) -> None:
        """Raise InvalidArgument if a Put may not give *tags*."""

    def row_tags(self, value: bytes, given: Sequence[str]) -> tuple[str, ...]:
        """The tags of a row as written with the Put's tags *given*."""

    def check_key(self, key: str) -> None:
        """Raise InvalidArgument if *key* cannot name a row of this table."""

    def prepare(self, key: str, value: bytes) -> Any:
        """Validate a value to be written; return what ``write`` takes."""

    async def load(self, conn: AsyncConnection, keys: Sequence[str]) -> dict[str, Row]:
        """Every key's row and version, in one query."""

    async def exists(self, conn: AsyncConnection, key: str, *, lock: bool = False) -> bool:
        """Whether the key has a row; with *lock*, the row stays locked until
        the transaction ends."""

    async def lock(self, conn: AsyncConnection, keys: Sequence[str]) -> None:
        """Lock the rows of *keys* that exist until the transaction ends,
        before their version rows (the order every writer takes them in)."""

    async def write(
        self, conn: AsyncConnection, key: str, prepared: Any, tags: Sequence[str] = ()
    ) -> bytes:
        """Upsert the row (with *tags*, where the table stores them); return
        the value as it is now stored."""

    async def delete(self, conn: AsyncConnection, key: str) -> bool: ...


class ManagedTable:
    """Opaque bytes in ``cachecoord.entries``."""

    _LOAD = """
        SELECT k.key, e.value, coalesce(v.version, 0), e.tags
        FROM unnest(%(keys)s::text[]) AS k(key)
        LEFT JOIN cachecoord.entries e ON e.namespace = %(ns)s AND e.key = k.key
        LEFT JOIN cachecoord.versions v ON v.namespace = %(ns)s AND v.key = k.key
    """
    _WRITE = """
        INSERT INTO cachecoord.entries (namespace, key, value, tags) VALUES (%s, %s, %s, %s)
        ON CONFLICT (namespace, key)
        DO UPDATE SET value = EXCLUDED.value, tags = EXCLUDED.tags, updated_at = now()
    """

    merges_rows = False
    writable_columns: frozenset[str] = frozenset()
    tagged = False

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def check_key(self, key: str) -> None:
        return None

    def prepare(self, key: str, value: bytes) -> bytes:
        return value

    def check_tags(self, tags: Sequence[str]) -> None:
        return None

    def row_tags(self, value: bytes, given: Sequence[str]) -> tuple[str, ...]:
        return tuple(given)

    async def load(self, conn: AsyncConnection, keys: Sequence[str]) -> dict[str, Row]:
        cur = await conn.execute(self._LOAD, {"keys": list(keys), "ns": self.namespace})
        return {
            key: Row(value, version, tuple(tags or ())) async for key, value, version, tags in cur
        }

    async def exists(self, conn: AsyncConnection, key: str, *, lock: bool = False) -> bool:
        cur = await conn.execute(
            "SELECT 1 FROM cachecoord.entries WHERE namespace = %s AND key = %s"
            + (" FOR UPDATE" if lock else ""),
            (self.namespace, key),
        )
        return await cur.fetchone() is not None

    async def lock(self, conn: AsyncConnection, keys: Sequence[str]) -> None:
        pass  # only cachecoord writes these rows, always after the version row

    async def write(
        self, conn: AsyncConnection, key: str, prepared: bytes, tags: Sequence[str] = ()
    ) -> bytes:
        await conn.execute(self._WRITE, (self.namespace, key, prepared, list(tags)))
        return prepared

    async def delete(self, conn: AsyncConnection, key: str) -> bool:
        cur = await conn.execute(
            "DELETE FROM cachecoord.entries WHERE namespace = %s AND key = %s",
            (self.namespace, key),
        )
        return cur.rowcount > 0


_INTEGER_TYPES = frozenset({"smallint", "integer", "bigint"})


@dataclass(frozen=True, slots=True)
class MappedTable:
    """An existing table, one row per key, rows exchanged as JSON objects."""

    namespace: str
    table: sql.Composable
    key_column: str
    key_type: str
    writable_columns: frozenset[str]
    canonical: Canonical
    tag_templates: tuple[TagTemplate, ...] = ()
    merges_rows = True

    @property
    def tagged(self) -> bool:
        return bool(self.tag_templates)

    @classmethod
    async def introspect(cls, conn: AsyncConnection, ns: NamespaceSettings) -> MappedTable:
        """Read the table's columns; refuse a missing table, a non-unique key,
        or a key column type without a canonical form (key_forms.py)."""
        where = f"namespaces.{ns.name}"
        cur = await conn.execute("SELECT to_regclass(%s)::oid", (ns.table,))
        found = await cur.fetchone()
        if found is None or found[0] is None:
            raise ConfigError(f"{where}.table: table {ns.table!r} does not exist in the database")
        oid = found[0]
        cur = await conn.execute(
            """SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '',
                      EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid
                              AND i.indisunique AND i.indnkeyatts = 1
                              AND i.indkey[0] = a.attnum AND i.indpred IS NULL),
                      coalesce((SELECT c.collisdeterministic FROM pg_collation c
                                WHERE c.oid = a.attcollation), true)
               FROM pg_attribute a
               WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped""",
            (oid,),
        )
        columns = {
            name: (kind, generated, unique, det) async for name, kind, generated, unique, det in cur
        }
        if ns.key_column not in columns:
            raise ConfigError(
                f"{where}.key_column: table {ns.table!r} has no column {ns.key_column!r}; "
                f"columns: {', '.join(columns)}"
            )
        key_type, _, unique, deterministic = columns[ns.key_column]
        if not unique:
            raise ConfigError(
                f"{where}.key_column: column {ns.key_column!r} of {ns.table!r} must be the "
                "primary key or have a unique index (one row per key)"
            )
        try:
            canonical = canonical_form(key_type, deterministic=deterministic)
        except UnsupportedKeyType as err:
            raise ConfigError(
                f"{where}.key_column: column {ns.key_column!r} of {ns.table!r} has type "
                f"{key_type}, whose keys cachecoord cannot hold to one spelling per row: {err}. "
                f"Key column types it can: {SUPPORTED}"
            ) from None
        await _check_canonical_form(conn, where, ns.key_column, key_type, canonical)
        cur = await conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = %s",
            (oid,),
        )
        schema_table = await cur.fetchone()
        assert schema_table is not None
        templates = tuple(TagTemplate.parse(text) for text in ns.tags)
        for template in templates:
            unknown = [name for name in template.columns if name not in columns]
            if unknown:
                raise ConfigError(
                    f"{where}.tags: the template {template.text!r} names column(s) "
                    f"{', '.join(map(repr, unknown))} that {ns.table!r} does not have; "
                    f"columns: {', '.join(columns)}"
                )
        return cls(
            namespace=ns.name,
            table=sql.Identifier(*schema_table),
            key_column=ns.key_column,
            key_type=key_type,
            writable_columns=frozenset(name for name, (_, gen, *_) in columns.items() if not gen),
            canonical=canonical,
            tag_templates=templates,
        )

    def check_key(self, key: str) -> None:
        # Keys must be in the column type's canonical text form: "01" and "1"
        # name one row, but would be two cache entries, and only one of them
        # would be invalidated when the row changes (key_forms.py).
        try:
            canonical = self.canonical(key)
        except ValueError as err:
            why = f" ({err})" if isinstance(err, NotAKey) else ""
            raise InvalidArgument(
                f"key {key!r} is not a valid {self.key_type} for column {self.key_column} "
                f"of namespace {self.namespace!r}{why}"
            ) from None
        if canonical != key:
            raise InvalidArgument(
                f"key {key!r} is not in canonical form for {self.key_type} column "
                f"{self.key_column}; use {canonical!r}"
            )

    def check_tags(self, tags: Sequence[str]) -> None:
        if tags:
            raise InvalidArgument(
                f"namespace {self.namespace!r} is mapped: its values' tags come from its "
                f"columns (namespaces.{self.namespace}.tags), since its table, not "
                "cachecoord's, has no place to keep tags given by a Put; send no tags"
            )

    def row_tags(self, value: bytes, given: Sequence[str]) -> tuple[str, ...]:
        return derive(self.tag_templates, value)

    def prepare(self, key: str, value: bytes) -> str:
        try:
            row = json.loads(value)
        except (ValueError, RecursionError) as err:  # also bad UTF-8, digit limits
            raise InvalidArgument(
                f"namespace {self.namespace!r} stores rows: the value must be a JSON object, "
                f"and it is not valid JSON ({err})"
            ) from None
        if not isinstance(row, dict):
            raise InvalidArgument(
                f"namespace {self.namespace!r} stores rows: the value must be a JSON object, "
                f"not {type(row).__name__}"
            )
        unknown = sorted(set(row) - self.writable_columns)
        if unknown:
            # Quote a few, shortened: the message travels in gRPC metadata (8 KB).
            named = ", ".join(repr(name[:64]) for name in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise InvalidArgument(
                f"unknown or read-only column(s) {named}{more} for namespace "
                f"{self.namespace!r}; writable columns: {', '.join(sorted(self.writable_columns))}"
            )
        given = row.get(self.key_column, key)
        if given is None or isinstance(given, bool) or str(given) != key:
            raise InvalidArgument(
                f"the value's {self.key_column!r} ({given!r}) differs from the key {key!r}; "
                "omit it or make them equal"
            )
        row[self.key_column] = int(key) if self.key_type in _INTEGER_TYPES else key
        return json.dumps(row)

    async def load(self, conn: AsyncConnection, keys: Sequence[str]) -> dict[str, Row]:
        query = sql.SQL(
            # A row written by another program and never through cachecoord
            # has the implicit version 1 (a first write through us makes it 2).
            """SELECT k.key, row_to_json(t)::text,
                      coalesce(v.version, CASE WHEN t.{key} IS NULL THEN 0 ELSE 1 END)
               FROM unnest(%(keys)s::text[]) AS k(key)
               LEFT JOIN {table} t ON t.{key} = k.key::{type}
               LEFT JOIN cachecoord.versions v ON v.namespace = %(ns)s AND v.key = k.key"""
        ).format(table=self.table, key=sql.Identifier(self.key_column), type=self._type())
        cur = await conn.execute(query, {"keys": list(keys), "ns": self.namespace})
        return {key: self._row(row, version) async for key, row, version in cur}

    def _row(self, row: str | None, version: int) -> Row:
        value = None if row is None else row.encode()
        return Row(value, version, derive(self.tag_templates, value))

    async def exists(self, conn: AsyncConnection, key: str, *, lock: bool = False) -> bool:
        query = sql.SQL("SELECT 1 FROM {table} WHERE {key} = %s::{type}{lock}").format(
            table=self.table,
            key=sql.Identifier(self.key_column),
            type=self._type(),
            lock=sql.SQL(" FOR UPDATE" if lock else ""),
        )
        cur = await conn.execute(query, (key,))
        return await cur.fetchone() is not None

    async def lock(self, conn: AsyncConnection, keys: Sequence[str]) -> None:
        if not keys:
            return
        query = sql.SQL(
            "SELECT 1 FROM {table} WHERE {key} = ANY(%s::text[]::{type}[])"
            " ORDER BY {key} FOR UPDATE"
        ).format(table=self.table, key=sql.Identifier(self.key_column), type=self._type())
        await conn.execute(query, (list(keys),))

    async def write(
        self, conn: AsyncConnection, key: str, prepared: str, tags: Sequence[str] = ()
    ) -> bytes:
        # Only the given columns are written (a partial update of an existing
        # row); PostgreSQL converts each JSON member to its column's type. An
        # UPDATE comes first: an INSERT ... ON CONFLICT would check NOT NULL
        # columns absent from a partial update before seeing the conflict.
        columns = sorted(json.loads(prepared))
        updated = [c for c in columns if c != self.key_column] or [self.key_column]
        names = sql.SQL(", ").join(map(sql.Identifier, columns))
        assignments = sql.SQL(", ").join(
            sql.SQL("{c} = r.{c}").format(c=sql.Identifier(c)) for c in updated
        )
        update = sql.SQL(
            "UPDATE {table} AS t SET {assignments} "
            "FROM jsonb_populate_record(NULL::{table}, %(row)s::jsonb) AS r "
            "WHERE t.{key} = r.{key} RETURNING row_to_json(t)::text"
        )
        insert = sql.SQL(
            "INSERT INTO {table} AS t ({names}) SELECT {names} "
            "FROM jsonb_populate_record(NULL::{table}, %(row)s::jsonb) AS r "
            "ON CONFLICT ({key}) DO UPDATE SET {excluded} RETURNING row_to_json(t)::text"
        )
        parts = {
            "table": self.table,
            "key": sql.Identifier(self.key_column),
            "names": names,
            "assignments": assignments,
            "excluded": sql.SQL(", ").join(
                sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in updated
            ),
        }
        for statement in (update, insert):
            cur = await conn.execute(statement.format(**parts), {"row": prepared})
            row = await cur.fetchone()
            if row is not None:
                return str(row[0]).encode()
        raise AssertionError("an upsert returns its row")

    async def delete(self, conn: AsyncConnection, key: str) -> bool:
        query = sql.SQL("DELETE FROM {table} WHERE {key} = %s::{type}").format(
            table=self.table, key=sql.Identifier(self.key_column), type=self._type()
        )
        cur = await conn.execute(query, (key,))
        return cur.rowcount > 0

    def _type(self) -> sql.Composable:
        # format_type() output comes from the catalog, not from a request.
        return sql.SQL(self.key_type)


async def _check_canonical_form(
    conn: AsyncConnection, where: str, column: str, key_type: str, canonical: Canonical
) -> None:
    """Refuse to start if PostgreSQL writes a sample key's value otherwise
    than key_forms.py says it does (a setting or version we do not know)."""
    query = sql.SQL("SELECT to_jsonb(%s::{type}) #>> '{{}}'").format(type=sql.SQL(key_type))
    for sample in SAMPLES:
        try:
            ours = canonical(sample)
        except ValueError:
            continue
        try:
            async with conn.transaction():
                cur = await conn.execute(query, (sample,))
                found = await cur.fetchone()
            theirs = None if found is None else found[0]
        except psycopg.DataError as err:
            theirs = f"an error: {err}"
        if theirs != ours:
            raise ConfigError(
                f"{where}.key_column: column {column!r} has type {key_type}, and PostgreSQL "
                f"writes the key {sample!r} as {theirs!r}, not {ours!r} as cachecoord expects; "
                "its keys cannot be checked for their canonical form"
            )


async def open_tables(
    pool: AsyncConnectionPool[AsyncConnection], namespaces: Mapping[str, NamespaceSettings]
) -> dict[str, Table]:
    """The table of each namespace: a mapped one introspected (ConfigError if
    it cannot serve), a managed one cachecoord's own."""
    tables: dict[str, Table] = {}
    async with pool.connection() as conn:
        for name, ns in namespaces.items():
            if ns.kind is Kind.MAPPED:
                tables[name] = await MappedTable.introspect(conn, ns)
            else:
                tables[name] = ManagedTable(name)
    return tables
