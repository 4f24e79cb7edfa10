"""The Node.js stubs (clients/node, ts-proto for @grpc/grpc-js) against a real
server: clients/node/e2e/e2e.ts runs every kind of RPC and checks the answers;
this test runs its compiled form (make test builds it) and reads back what it
wrote through the Python client. clients/node/e2e/hold.ts holds a lock with
the client's holdLock() across connection recycling."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from pathlib import Path

import pytest
from recycling_support import held_across_recycling

from cachecoord.app import App
from cachecoord_client import AsyncClient
from local_servers import PostgresServer

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"
E2E = NODE_DIR / "dist" / "e2e" / "e2e.js"
HOLD = NODE_DIR / "dist" / "e2e" / "hold.js"
CHECKS = (
    "get",
    "batch_get",
    "watch_reset",
    "put_get",
    "compare_and_set",
    "watch_event",
    "invalidate",
    "lock",
    "hold_lock",
)
RUN_S = 30  # bound on the whole node run (it takes about a second)


def _built_e2e() -> Path:
    """The compiled program, failing the test if it is missing or older than
    its TypeScript sources (make node-client builds it)."""
    node = shutil.which("node")
    assert node, "node is not installed (apt-get install nodejs npm)"
    assert E2E.exists(), f"{E2E} is missing: run `make node-client`"
    sources = [*NODE_DIR.glob("src/**/*.ts"), *NODE_DIR.glob("e2e/*.ts")]
    newest = max(p.stat().st_mtime for p in sources)
    assert E2E.stat().st_mtime >= newest, f"{E2E} is older than its sources: run `make node-client`"
    return Path(node)


@pytest.mark.timeout(RUN_S + 30)
async def test_node_client_runs_every_rpc_kind(app: App, client: AsyncClient) -> None:
    node = _built_e2e()
    prefix = f"node-{uuid.uuid4().hex[:12]}-"
    proc = await asyncio.create_subprocess_exec(
        str(node),
        str(E2E),
        f"127.0.0.1:{app.port}",
        prefix,
        cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        raw, _ = await asyncio.wait_for(proc.communicate(), RUN_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    output = raw.decode()
    print(output)  # the node program's checks, shown with -s or on failure
    assert proc.returncode == 0, output
    lines = output.splitlines()
    for name in CHECKS:
        assert any(line.startswith(f"ok {name}: ") for line in lines), f"no check {name}: {output}"
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[7:])

    # What node wrote is what Python reads, at the version node was told.
    assert result["key"] == f"{prefix}a"
    got = await client.get("blobs", result["key"])
    assert got.found
    assert got.value == b"hello again"
    assert got.version == int(result["version"])
    version, trace_id, parent_id, flags = result["traceparent"].split("-")
    assert (version, len(trace_id), len(parent_id), flags) == ("00", 32, 16, "01")


@pytest.mark.timeout(60)
async def test_node_hold_lock_is_never_granted_to_another_across_connection_recycling(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    # The server closes every connection after 0.5 s (1 s grace), so the
    # holdLock() helper is handed off and resumes several times while a
    # Python client keeps trying to take the same lock.
    node = _built_e2e()
    await held_across_recycling(
        [node, HOLD], postgres_server, tmp_path, held=b"held", released=b"released"
    )
