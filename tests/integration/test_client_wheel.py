"""The released client wheel on its own: `make dist` builds dist/*.whl and
puts the wheels of grpcio and protobuf in build/wheelhouse/; this test
installs only the client wheel (and those, offline) into a fresh venv and
talks to the session server from it, so a wheel that lacks a module, a stub
or a dependency fails here rather than for its users."""

from __future__ import annotations

import asyncio
import json
import sys
import tomllib
import uuid
from pathlib import Path

import pytest

from cachecoord.app import App

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "dist"
WHEELHOUSE = ROOT / "build" / "wheelhouse"
STEP_S = 60  # bound on each subprocess (a venv, an install, the script)
# grpcio needs typing-extensions; nothing else may come along.
ALLOWED = {"cachecoord-client", "grpcio", "protobuf", "typing-extensions"}

SCRIPT = """
import sys

import cachecoord_client
from cachecoord_client import Client, VersionConflict

target, key = sys.argv[1], sys.argv[2]
print("module", cachecoord_client.__file__)
with Client(target) as client:
    user = client.get("users", "1")
    assert user.found and b"Ada Lovelace" in user.value, user
    version = client.put("blobs", key, b"from the wheel", expected_version=0)
    got = client.get("blobs", key)
    assert got.value == b"from the wheel" and got.version == version, got
    try:
        client.put("blobs", key, b"again", expected_version=0)
    except VersionConflict:
        pass
    else:
        raise SystemExit("a stale expected_version was accepted")
    lock = client.acquire_lock(key + "-lock", ttl_ms=5_000)
    client.release_lock(lock.name, lock.token)
print("ok", version)
"""


async def _run(*argv: str | Path, cwd: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        raw, _ = await asyncio.wait_for(proc.communicate(), STEP_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    output = raw.decode()
    assert proc.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{output}"
    return output


def _client_version() -> str:
    """The client's version, failing the test if make dist has not built its wheel."""
    pyproject = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())
    version: str = pyproject["project"]["version"]
    wheel = DIST / f"cachecoord_client-{version}-py3-none-any.whl"
    assert wheel.exists(), f"{wheel} is missing: run `make dist`"
    assert WHEELHOUSE.is_dir(), f"{WHEELHOUSE} is missing: run `make dist`"
    return version


@pytest.mark.timeout(4 * STEP_S)
async def test_client_wheel_alone_talks_to_the_server(app: App, tmp_path: Path) -> None:
    version = _client_version()
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    # No pip in the venv: the suite's pip installs into it (pip --python).
    await _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    pip = (sys.executable, "-m", "pip", "--python", python, "--disable-pip-version-check")
    await _run(
        *pip,
        "install",
        "--quiet",
        "--no-index",
        "--find-links",
        DIST,
        "--find-links",
        WHEELHOUSE,
        f"cachecoord-client=={version}",
        cwd=tmp_path,
    )
    listed = json.loads(await _run(*pip, "list", "--format=json", cwd=tmp_path))
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in listed}
    assert installed["cachecoord-client"] == version
    assert set(installed) <= ALLOWED, installed

    script = tmp_path / "talk.py"
    script.write_text(SCRIPT)
    key = f"wheel-{uuid.uuid4().hex[:12]}"
    # -I: only the venv's site-packages, never the repository's sources.
    output = await _run(python, "-I", script, f"127.0.0.1:{app.port}", key, cwd=tmp_path)
    module = Path(output.split("module ", 1)[1].split()[0])
    assert module.is_relative_to(venv), f"imported {module}, not the wheel's copy in {venv}"
    assert "\nok " in output, output
