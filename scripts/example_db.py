"""Prepare the example database for `make run`.

Given the URL of a reachable PostgreSQL server, create the database
``cachecoord`` on it if missing, apply examples/schema.sql, and print the
database's URL. Usage: python scripts/example_db.py SERVER_URL
"""

from __future__ import annotations

import sys
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

DATABASE = "cachecoord"
SCHEMA = Path(__file__).resolve().parent.parent / "examples" / "schema.sql"


def main(server_url: str) -> str:
    with psycopg.connect(server_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
        if exists.fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    params = conninfo_to_dict(server_url)
    params["dbname"] = DATABASE
    url = make_conninfo("", **params)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA.read_text().encode())
    return url


if __name__ == "__main__":
    print(main(sys.argv[1]))
