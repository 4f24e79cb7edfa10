"""deploy/healthcheck.py, the image's HEALTHCHECK (and docker-compose's), is a
grpc.health.v1 client: 0 for a SERVING server, 1 when nothing answers."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from cachecoord.app import App
from local_servers import free_port

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"


async def _healthcheck(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), *args, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_healthcheck_passes_on_a_serving_server(app: App) -> None:
    assert await _healthcheck(f"127.0.0.1:{app.port}") == (0, "")


async def test_healthcheck_fails_when_nothing_listens() -> None:
    code, err = await _healthcheck(f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert code == 1
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err, err
