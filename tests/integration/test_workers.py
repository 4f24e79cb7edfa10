"""`cachecoord serve --workers N`: spawned processes sharing one port."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import grpc
import pytest
import redis

from cachecoord_client import AsyncClient
from local_servers import RedisServer, free_port


def write_config(path: Path, port: int, redis_url: str, database: str) -> Path:
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "1s"
[redis]
url = "{redis_url}"
[postgres]
url = "{database}"
[namespaces.blobs]
kind = "managed"
"""
    )
    return path


async def test_workers_share_the_port_and_stop_together(
    tmp_path: Path, redis_server: RedisServer, own_database: str
) -> None:
    port = free_port()
    config = write_config(tmp_path / "w.toml", port, redis_server.url, own_database)
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cachecoord", "serve", "--config", str(config), "--workers", "2"
    )
    listener = redis.asyncio.Redis.from_url(redis_server.url)
    pubsub = listener.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("cc:inv:blobs")
    origins: set[str] = set()
    try:
        for _ in range(200):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    await asyncio.wait_for(channel.channel_ready(), 0.5)
                    break
                except TimeoutError:
                    continue
        # New connections land on either worker: each names itself as origin.
        for attempt in range(60):
            async with AsyncClient(f"127.0.0.1:{port}") as client:
                await client.put("blobs", f"w-{attempt}", b"v")
            while (message := await pubsub.get_message(timeout=0.2)) is not None:
                origins.add(json.loads(message["data"])["origin"])
            if len(origins) == 2:
                break
        assert len(origins) == 2
    finally:
        parent.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(parent.wait(), 20)
        await pubsub.aclose()
        await listener.aclose()
    assert code == 0


async def test_workers_need_a_fixed_port(tmp_path: Path, redis_server: RedisServer) -> None:
    config = write_config(tmp_path / "w.toml", 0, redis_server.url, "postgresql://x@127.0.0.1/x")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cachecoord",
        "serve",
        "--config",
        str(config),
        "--workers",
        "2",
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert b"fixed port" in stderr


@pytest.mark.parametrize("workers", ["0", "1000"])
async def test_worker_count_is_checked(
    tmp_path: Path, redis_server: RedisServer, workers: str
) -> None:
    config = write_config(tmp_path / "w.toml", 5, redis_server.url, "postgresql://x@127.0.0.1/x")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cachecoord",
        "serve",
        "--config",
        str(config),
        "--workers",
        workers,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert b"--workers" in stderr
