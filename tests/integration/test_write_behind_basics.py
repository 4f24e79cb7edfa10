import asyncio
import json
from collections.abc import Callable

import psycopg

from cachecoord_client import AsyncClient, Layer
from local_servers import PostgresServer


async def row_of(dsn: str, key: str) -> tuple[bytes, int] | None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT e.value, v.version FROM cachecoord.entries e JOIN cachecoord.versions v "
            "USING (namespace, key) WHERE namespace = 'queued' AND key = %s",
            (key,),
        )
        row = await cur.fetchone()
        return None if row is None else (bytes(row[0]), int(row[1]))


async def test_write_behind_put_is_cached_at_once_then_flushed(
    client: AsyncClient, key: str, postgres_server: PostgresServer
) -> None:
    version = await client.put("queued", key, b"v1")
    got = await client.get("queued", key)
    assert (got.value, got.version, got.layer) == (b"v1", version, Layer.REDIS)
    for _ in range(50):
        if await row_of(postgres_server.dsn, key) == (b"v1", version):
            break
        await asyncio.sleep(0.05)
    assert await row_of(postgres_server.dsn, key) == (b"v1", version)


async def test_write_behind_partial_row_put_merges_into_the_current_row(
    client: AsyncClient, new_user_id: Callable[[], str]
) -> None:
    user = new_user_id()
    await client.put("profiles", user, json.dumps({"name": "A", "score": 1}).encode())
    await client.put("profiles", user, json.dumps({"score": 2}).encode())
    got = json.loads((await client.get("profiles", user)).value)
    assert got == {"id": int(user), "name": "A", "score": 2}
