"""A lock held by a program of another language on a server that recycles its
connections every half second (1 s grace), while a Python client keeps trying
to take it: the Node.js and Go clients' hold helpers are checked with it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from cachecoord.app import App
from cachecoord.config import Duration
from cachecoord_client import AsyncClient, LockNotAcquired
from conftest import settings_for
from local_servers import PostgresServer, RedisServer

RUN_S = 30  # bound on the program's start and on its end


async def held_across_recycling(
    program: Sequence[str | Path],
    postgres_server: PostgresServer,
    tmp_path: Path,
    *,
    held: bytes,
    released: bytes,
) -> None:
    """Run ``PROGRAM TARGET NAME 4`` (it holds NAME for 4 s, printing a line
    starting with *held*, then one with *released*); a Python client must be
    refused the lock throughout the first 3 s."""
    with RedisServer(tmp_path / "redis") as redis_server:
        settings = settings_for(tmp_path, redis_server.url, postgres_server.dsn)
        server = replace(
            settings.server,
            max_connection_age=Duration(500),
            max_connection_age_grace=Duration(1000),
        )
        app = App(replace(settings, server=server))
        await app.start()
        try:
            target, name = f"127.0.0.1:{app.port}", f"hold-{uuid.uuid4().hex[:12]}"
            proc = await asyncio.create_subprocess_exec(
                *map(str, program), target, name, "4",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            assert proc.stdout is not None
            first = await asyncio.wait_for(proc.stdout.readline(), RUN_S)
            assert first.startswith(held), first
            refused = 0
            async with AsyncClient(target) as competitor:
                until = time.monotonic() + 3.0  # within the program's 4 s hold
                while time.monotonic() < until:
                    with pytest.raises(LockNotAcquired):
                        await competitor.acquire_lock(name, ttl_ms=1_000, timeout=1.0)
                    refused += 1
                    await asyncio.sleep(0.05)
            rest, _ = await asyncio.wait_for(proc.communicate(), RUN_S)
            assert proc.returncode == 0, first + rest
            assert released in rest, rest
            assert refused > 10
        finally:
            await app.stop()
