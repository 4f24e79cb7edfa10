"""The operator commands (``cachecoord queue``, ``cachecoord dead-letters``)
against real Redis and PostgreSQL, beside an instance that flushes.

Each test serves a write-behind namespace of its own on a table of its own
(``score`` has CHECK (score >= 0): a negative score is valid JSON for the Put
but PostgreSQL rejects it at flush time, so the entry is dead-lettered).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest_asyncio
from cli_support import Result, operator
from strategy_support import named, poll, serve_config, serving

from cachecoord import exit_codes
from cachecoord.app import App
from cachecoord.config import load
from cachecoord_client import AsyncClient
from conftest import Backend
from local_servers import PostgresServer, RedisServer


@dataclass
class Scores:
    """An instance serving namespace ``ns``, mapped on table ``ns``."""

    ns: str
    config: Path
    app: App
    client: AsyncClient
    dsn: str

    async def cli(self, command: str, *args: str) -> Result:
        return await operator(command, *args, config=self.config)

    async def dead_letters(self) -> list[dict[str, Any]]:
        result = await self.cli("dead-letters list", self.ns, "--json")
        assert result.code == 0, result.stderr
        letters: list[dict[str, Any]] = result.json()["dead_letters"]
        return letters

    async def dead_lettered(self, key: str) -> dict[str, Any]:
        letters = await poll(
            self.dead_letters, lambda found: any(d["key"] == key for d in found), within=10
        )
        (letter,) = [d for d in letters if d["key"] == key]
        return letter

    async def row(self, key: str) -> tuple[str, int] | None:
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            query = f"SELECT name, score FROM {self.ns} WHERE id = %s"
            cur = await conn.execute(query, (int(key),))
            found = await cur.fetchone()
        return None if found is None else (found[0], found[1])

    async def allow_negative_scores(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(f"ALTER TABLE {self.ns} DROP CONSTRAINT {self.ns}_score_check")


@asynccontextmanager
async def serving_scores(
    redis_url: str, dsn: str, tmp_path: Path, *, cluster: bool = False
) -> AsyncIterator[Scores]:
    ns = f"scores_{uuid.uuid4().hex[:10]}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            f"CREATE TABLE {ns} (id bigint PRIMARY KEY, name text NOT NULL,"
            " score integer NOT NULL DEFAULT 0 CHECK (score >= 0))"
        )
    config = serve_config(
        tmp_path,
        listen="127.0.0.1:0",
        redis_url=redis_url,
        postgres_url=dsn,
        instance_id=ns,
        namespaces=f"""
[namespaces.{ns}]
kind = "mapped"
table = "{ns}"
key_column = "id"
strategy = "write-behind"
flush_interval = "50ms"
retry_after = "100ms"
claim_idle = "1s"
max_attempts = 2
partitions = 2
""",
    )
    if cluster:  # in the file: the operator commands read it too
        text = config.read_text()
        config.write_text(
            text.replace(f'url = "{redis_url}"', f'url = "{redis_url}"\ncluster = true')
        )
    settings = named(load(config, {}), ns)
    async with serving(settings) as (app, client):
        yield Scores(ns, config, app, client, dsn)


@pytest_asyncio.fixture(loop_scope="session")
async def scores(
    redis_server: RedisServer, postgres_server: PostgresServer, tmp_path: Path
) -> AsyncIterator[Scores]:
    async with serving_scores(redis_server.url, postgres_server.dsn, tmp_path) as instance:
        yield instance


async def test_queue_status_shows_depth_oldest_age_and_consumers(scores: Scores) -> None:
    await scores.client.put(scores.ns, "1", b'{"name": "flushed", "score": 1}')
    await poll(lambda: scores.row("1"), lambda row: row is not None, within=5)
    for flusher in scores.app.flushers:  # writes now wait in the queues
        await flusher.close(0)
    for key in ("2", "3", "4"):
        await scores.client.put(scores.ns, key, b'{"name": "queued", "score": 2}')
    await asyncio.sleep(0.05)  # the oldest write ages a little

    as_json = await scores.cli("queue status", scores.ns, "--json")
    human = await scores.cli("queue status", scores.ns)

    assert as_json.code == 0, as_json.stderr
    (status,) = as_json.json()["namespaces"]
    assert status["namespace"] == scores.ns
    assert status["depth"] == 3
    assert status["pending"] == 0
    assert status["oldest_age_s"] >= 0.05
    assert status["dead_letters"] == 0
    assert [c["name"] for c in status["consumers"]] == [scores.ns]
    assert human.code == 0, human.stderr
    assert scores.ns in human.stdout
    assert "3/" in human.stdout


async def test_dead_letter_is_listed_with_its_error_and_replay_reaches_postgres(
    scores: Scores,
) -> None:
    version = await scores.client.put(scores.ns, "7", b'{"name": "poison", "score": -1}')
    letter = await scores.dead_lettered("7")
    human = await scores.cli("dead-letters list", scores.ns)

    assert (letter["version"], letter["kind"]) == (version, "value")
    assert f"{scores.ns}_score_check" in letter["error"]
    assert letter["encoding"] == "json"
    assert letter["value"] == {"id": 7, "name": "poison", "score": -1}
    assert letter["reverted_to"] > version
    assert human.code == 0, human.stderr
    assert letter["id"] in human.stdout
    assert "score_check" in human.stdout

    await scores.allow_negative_scores()  # the operator fixed the cause
    replayed = await scores.cli("dead-letters", "replay", scores.ns, letter["id"], "--json")

    assert replayed.code == 0, replayed.stderr
    (result,) = replayed.json()["results"]
    assert (result["key"], result["outcome"]) == ("7", "replayed")
    assert result["version"] > letter["reverted_to"]
    row = await poll(lambda: scores.row("7"), lambda row: row == ("poison", -1), within=5)
    assert row == ("poison", -1)
    got = await scores.client.get(scores.ns, "7")
    assert (json.loads(got.value)["score"], got.version) == (-1, result["version"])
    assert await scores.dead_letters() == []


async def test_replay_leaves_a_key_written_since_alone(scores: Scores) -> None:
    await scores.client.put(scores.ns, "8", b'{"name": "poison", "score": -1}')
    letter = await scores.dead_lettered("8")
    newer = await scores.client.put(scores.ns, "8", b'{"name": "newer", "score": 3}')
    await poll(lambda: scores.row("8"), lambda row: row == ("newer", 3), within=5)
    await scores.allow_negative_scores()

    replayed = await scores.cli("dead-letters", "replay", scores.ns, "--all", "--json")

    assert replayed.code == exit_codes.FAILURE
    (result,) = replayed.json()["results"]
    assert (result["outcome"], result["version"]) == ("superseded", newer)
    assert await scores.row("8") == ("newer", 3)
    assert (await scores.client.get(scores.ns, "8")).version == newer
    assert [d["id"] for d in await scores.dead_letters()] == [letter["id"]]


async def test_drop_deletes_dead_letters(scores: Scores) -> None:
    await scores.client.put(scores.ns, "9", b'{"name": "poison", "score": -1}')
    letter = await scores.dead_lettered("9")

    dropped = await scores.cli("dead-letters", "drop", scores.ns, letter["id"], "--json")
    again = await scores.cli("dead-letters", "drop", scores.ns, letter["id"])

    assert (dropped.code, dropped.json()) == (0, {"namespace": scores.ns, "dropped": 1})
    assert (again.code, again.stdout.strip()) == (0, "0 dead letter(s) dropped")
    assert await scores.dead_letters() == []


async def test_operator_usage_errors_exit_2_with_one_line(scores: Scores) -> None:
    no_ids = await scores.cli("dead-letters", "replay", scores.ns)
    not_write_behind = await scores.cli("queue status", "no_such_namespace")
    bad_action = await scores.cli("dead-letters", "purge", scores.ns)

    for result in (no_ids, not_write_behind, bad_action):
        assert result.code == exit_codes.USAGE, result
        assert result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


async def test_operator_command_without_redis_fails_with_1_on_stderr(tmp_path: Path) -> None:
    config = serve_config(
        tmp_path,
        listen="127.0.0.1:0",
        redis_url="redis://127.0.0.1:1/0",
        postgres_url="postgresql://127.0.0.1:1/postgres",
        instance_id="nowhere",
        namespaces='[namespaces.wb]\nkind = "managed"\nstrategy = "write-behind"\n',
    )

    result = await operator("queue status", "--json", config=config)

    assert result.code == exit_codes.FAILURE
    assert result.stdout == ""
    assert json.loads(result.stderr)["error"] == "redis"


async def test_replay_on_redis_cluster_reaches_postgres(
    cluster_backend: Backend, tmp_path: Path
) -> None:
    """The same on a Redis Cluster: the queues, the dead-letter stream and the
    replayed value's keys live on different shards."""
    async with serving_scores(
        cluster_backend.url, cluster_backend.dsn, tmp_path, cluster=True
    ) as scores:
        await scores.client.put(scores.ns, "5", b'{"name": "poison", "score": -1}')
        letter = await scores.dead_lettered("5")
        status = await scores.cli("queue status", "--json")
        await scores.allow_negative_scores()
        replayed = await scores.cli("dead-letters", "replay", scores.ns, "--all", "--json")
        row = await poll(lambda: scores.row("5"), lambda row: row == ("poison", -1), within=5)

    assert f"{scores.ns}_score_check" in letter["error"]
    assert status.code == 0, status.stderr
    assert status.json()["namespaces"][0]["dead_letters"] == 1
    assert replayed.code == 0, replayed.stderr
    assert [r["outcome"] for r in replayed.json()["results"]] == ["replayed"]
    assert row == ("poison", -1)
