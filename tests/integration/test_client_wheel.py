"""The released client wheel on its own: `make dist` builds dist/*.whl and
puts the wheels of grpcio and protobuf in build/wheelhouse/, both the versions
the repository locks and the oldest the client declares; this test installs
only the client wheel with one of those sets (offline) into a fresh venv and
talks to the session server from it (Get, Put, compare-and-set, a Watch event,
a lock), so a wheel that lacks a module, a stub or a dependency, or stubs that
do not import under the oldest declared grpcio and protobuf, fail here rather
than for its users."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import tomllib
import uuid
from importlib.metadata import version as installed_version
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
import google.protobuf
import grpc
from cachecoord_client import Client, VersionConflict, WatchEventKind

target, key = sys.argv[1], sys.argv[2]
print("module", cachecoord_client.__file__)
print("runtime", grpc.__version__, google.protobuf.__version__)
with Client(target) as client, client.watch(["blobs"], key_prefix=key, timeout=20) as events:
    user = client.get("users", "1")
    assert user.found and b"Ada Lovelace" in user.value, user
    first = next(events)
    assert first.kind is WatchEventKind.RESET, first
    version = client.put("blobs", key, b"from the wheel", expected_version=0)
    got = client.get("blobs", key)
    assert got.value == b"from the wheel" and got.version == version, got
    try:
        client.put("blobs", key, b"again", expected_version=0)
    except VersionConflict:
        pass
    else:
        raise SystemExit("a stale expected_version was accepted")
    for event in events:
        if event.kind is WatchEventKind.INVALIDATION and event.key == key:
            assert event.version == version, event
            break
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


def _runtimes(which: str) -> dict[str, str]:
    """grpcio's and protobuf's versions: the lower bounds the client declares
    ("oldest", as make dist reads them), or those of this venv ("locked")."""
    pyproject = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())
    pins = {}
    for requirement in pyproject["project"]["dependencies"]:
        match = re.fullmatch(r"([\w-]+)>=([\w.]+)(,<[\w.]+)?", requirement)
        assert match, f"{requirement!r}: no lower bound (make dist fetches the lower bounds)"
        name, lowest = match.group(1, 2)
        pins[name] = lowest if which == "oldest" else installed_version(name)
    assert set(pins) == {"grpcio", "protobuf"}, pins
    return pins


@pytest.mark.parametrize("runtimes", ["oldest", "locked"])
@pytest.mark.timeout(4 * STEP_S)
async def test_client_wheel_alone_talks_to_the_server(
    app: App, tmp_path: Path, runtimes: str
) -> None:
    version = _client_version()
    pins = _runtimes(runtimes)
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
        *(f"{name}=={pinned}" for name, pinned in pins.items()),
        cwd=tmp_path,
    )
    listed = json.loads(await _run(*pip, "list", "--format=json", cwd=tmp_path))
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in listed}
    assert installed["cachecoord-client"] == version
    assert set(installed) <= ALLOWED, installed
    assert {name: installed[name] for name in pins} == pins

    script = tmp_path / "talk.py"
    script.write_text(SCRIPT)
    key = f"wheel-{uuid.uuid4().hex[:12]}"
    # -I: only the venv's site-packages, never the repository's sources.
    output = await _run(python, "-I", script, f"127.0.0.1:{app.port}", key, cwd=tmp_path)
    module = Path(output.split("module ", 1)[1].split()[0])
    assert module.is_relative_to(venv), f"imported {module}, not the wheel's copy in {venv}"
    assert f"runtime {pins['grpcio']} {pins['protobuf']}\n" in output, output
    assert "\nok " in output, output
