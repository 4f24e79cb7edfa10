"""Database-driven invalidation: triggers that record changes made by other
programs to a mapped table.

A row trigger writes each changed key into ``cachecoord.outbox`` (bumping its
version, so compare-and-set also sees outside changes) and calls
``pg_notify('cachecoord_outbox', ...)``; a TRUNCATE trigger records the whole
namespace. cachecoord's own writes mark their transaction
(``cachecoord.writer``) and are skipped: they invalidate by themselves. The
outbox keeps the backlog while no instance listens (NOTIFY alone would lose
it), and every instance drains it at start and after every reconnect.
"""

from __future__ import annotations

import psycopg
from psycopg import AsyncConnection, sql

from cachecoord.config import ConfigError, Kind, NamespaceSettings, Settings
from cachecoord.storage import postgres
from cachecoord.storage.tables import MappedTable

CHANNEL = "cachecoord_outbox"

FUNCTIONS = """
CREATE OR REPLACE FUNCTION cachecoord.capture_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed_namespace text := TG_ARGV[0];
    key_column text := TG_ARGV[1];
    changed text[] := '{}';
    changed_key text;
    new_version bigint;
BEGIN
    IF current_setting('cachecoord.writer', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        changed := changed || (to_jsonb(OLD) ->> key_column);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        changed := changed || (to_jsonb(NEW) ->> key_column);
    END IF;
    FOREACH changed_key IN ARRAY ARRAY(SELECT DISTINCT unnest(changed)) LOOP
        -- A row that existed had the implicit version 1.
        INSERT INTO cachecoord.versions AS v (namespace, key, version)
        VALUES (changed_namespace, changed_key, 2)
        ON CONFLICT ON CONSTRAINT versions_pkey DO UPDATE SET version = v.version + 1
        RETURNING v.version INTO new_version;
        INSERT INTO cachecoord.outbox (namespace, key, version, reason)
        VALUES (changed_namespace, changed_key, new_version, 'db_change');
    END LOOP;
    PERFORM pg_notify('cachecoord_outbox', changed_namespace);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION cachecoord.capture_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cachecoord.outbox (namespace, key, version, reason)
    VALUES (TG_ARGV[0], NULL, 0, 'db_change');
    PERFORM pg_notify('cachecoord_outbox', TG_ARGV[0]);
    RETURN NULL;
END $$;
"""


def _names(ns: NamespaceSettings) -> tuple[sql.Identifier, sql.Identifier]:
    return sql.Identifier(f"cachecoord_{ns.name}"), sql.Identifier(f"cachecoord_{ns.name}_truncate")


async def install(conn: AsyncConnection, ns: NamespaceSettings, table: sql.Composable) -> None:
    """(Re)create the triggers of mapped namespace *ns* on *table*."""
    row_trigger, truncate_trigger = _names(ns)
    async with conn.transaction():
        await conn.execute(FUNCTIONS)
        await uninstall(conn, ns, table)
        await conn.execute(
            sql.SQL(
                "CREATE TRIGGER {trigger} AFTER INSERT OR UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION cachecoord.capture_change({ns}, {column})"
            ).format(
                trigger=row_trigger,
                table=table,
                ns=sql.Literal(ns.name),
                column=sql.Literal(ns.key_column),
            )
        )
        await conn.execute(
            sql.SQL(
                "CREATE TRIGGER {trigger} AFTER TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION cachecoord.capture_truncate({ns})"
            ).format(trigger=truncate_trigger, table=table, ns=sql.Literal(ns.name))
        )


async def uninstall(conn: AsyncConnection, ns: NamespaceSettings, table: sql.Composable) -> None:
    """Drop the triggers of *ns* (if any)."""
    for trigger in _names(ns):
        await conn.execute(
            sql.SQL("DROP TRIGGER IF EXISTS {trigger} ON {table}").format(
                trigger=trigger, table=table
            )
        )


async def change_triggers(settings: Settings, namespace: str, action: str) -> str:
    """``cachecoord triggers install|uninstall``: install or uninstall the
    triggers of mapped *namespace*, on a connection of its own; returns what
    was done. ConfigError if the namespace is not mapped or PostgreSQL refuses."""
    ns = settings.namespaces.get(namespace)
    if ns is None or ns.kind is not Kind.MAPPED:
        mapped = [n for n, s in settings.namespaces.items() if s.kind is Kind.MAPPED]
        raise ConfigError(
            f"{namespace!r} is not a mapped namespace of this configuration; mapped namespaces: "
            + (", ".join(mapped) or "(none)")
        )
    try:
        async with await psycopg.AsyncConnection.connect(settings.postgres.url) as conn:
            await postgres.install_schema_on(conn)
            table = (await MappedTable.introspect(conn, ns)).table
            if action == "install":
                await install(conn, ns, table)
            else:
                await uninstall(conn, ns, table)
            await conn.commit()
    except psycopg.Error as err:
        raise ConfigError(
            f"cannot use PostgreSQL at {settings.postgres.redacted_url} (postgres.url): {err}"
        ) from None
    done = "installed on" if action == "install" else "removed from"
    return f"change triggers of namespace {namespace!r} {done} table {ns.table!r}"
