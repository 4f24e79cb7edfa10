"""The ``cachecoord`` console script's client commands, against the session's
instance (run as asyncio subprocesses: tests/cli_support.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from pathlib import Path

import grpc
import pytest
from cli_support import CLI, Result, cachecoord, cli_env

from cachecoord import exit_codes
from cachecoord.app import App
from cachecoord_client import AsyncClient, CacheCoordError, Layer


@pytest.fixture
def name() -> str:
    """A lock name no other test uses."""
    return f"lock-{uuid.uuid4().hex[:12]}"


async def test_get_prints_value_version_and_layer(app: App) -> None:
    result = await cachecoord(app, "get", "users", "1")

    assert result.code == 0, result.stderr
    assert "Ada Lovelace" in result.stdout
    assert "version" in result.stdout


async def test_get_json_has_found_version_and_layer(app: App) -> None:
    result = await cachecoord(app, "get", "--json", "users", "1")

    assert result.code == 0, result.stderr
    doc = result.json()
    assert doc["found"] is True
    assert isinstance(doc["version"], int)
    assert doc["layer"] in ("near", "redis", "database")
    assert doc["encoding"] == "json"  # a mapped row: the value is the JSON object itself
    assert doc["value"]["name"] == "Ada Lovelace"


async def test_get_missing_key_says_not_found(app: App, key: str) -> None:
    human = await cachecoord(app, "get", "blobs", key)
    as_json = await cachecoord(app, "get", "--json", "blobs", key)

    assert (human.code, human.stdout.strip()) == (0, "(not found)")
    assert (as_json.code, as_json.json()) == (0, {"found": False})


async def test_put_then_get_returns_the_value_and_version(app: App, key: str) -> None:
    put = await cachecoord(app, "put", "--json", "blobs", key, "hello world")
    assert put.code == 0, put.stderr
    version = put.json()["version"]

    got = await cachecoord(app, "get", "--json", "blobs", key)

    assert got.code == 0, got.stderr
    assert (got.json()["encoding"], got.json()["value"]) == ("text", "hello world")
    assert got.json()["version"] == version


async def test_get_json_gives_bytes_that_are_not_text_as_base64(app: App, key: str) -> None:
    await cachecoord(app, "put", "blobs", key, "-", stdin=b"\xff\x00binary")

    got = await cachecoord(app, "get", "--json", "blobs", key)

    assert got.code == 0, got.stderr
    assert got.json()["encoding"] == "base64"
    assert base64.b64decode(got.json()["value"]) == b"\xff\x00binary"


async def test_batch_get_prints_every_key_in_request_order(app: App, key: str) -> None:
    await cachecoord(app, "put", "blobs", key, "one")

    result = await cachecoord(app, "batch-get", "--json", "blobs", key, f"{key}-missing")
    human = await cachecoord(app, "batch-get", "blobs", key, f"{key}-missing")

    assert result.code == 0, result.stderr
    first, second = result.json()["entries"]
    assert (first["key"], first["found"], first["value"]) == (key, True, "one")
    assert second == {"key": f"{key}-missing", "found": False}
    assert human.code == 0, human.stderr
    assert human.stdout.splitlines()[1] == f"{key}-missing\t(not found)"


async def test_watch_prints_invalidations_as_json_lines(app: App, key: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        CLI,
        "watch",
        "--target",
        f"127.0.0.1:{app.port}",
        "--json",
        "--count",
        "1",
        "blobs",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    assert proc.stdout is not None
    try:
        reset = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        put = await cachecoord(app, "put", "--json", "blobs", key, "watched")
        event = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
        code = await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert (reset["kind"], reset["reason"]) == ("reset", "subscribed")
    assert (event["kind"], event["namespace"], event["key"]) == ("invalidation", "blobs", key)
    assert (event["version"], event["reason"]) == (put.json()["version"], "put")
    assert code == 0


async def test_health_says_serving_and_exits_0(app: App) -> None:
    human = await cachecoord(app, "health")
    as_json = await cachecoord(app, "health", "--json")

    assert (human.code, human.stdout.strip()) == (0, "SERVING")
    assert (as_json.code, as_json.json()) == (0, {"status": "SERVING"})


async def test_health_of_an_unknown_service_exits_64_plus_not_found(app: App) -> None:
    result = await cachecoord(app, "health", "no.such.Service")

    assert result.code == 64 + grpc.StatusCode.NOT_FOUND.value[0]
    assert "NOT_FOUND" in result.stderr


async def test_put_reads_the_value_from_stdin_with_dash(app: App, key: str) -> None:
    put = await cachecoord(app, "put", "blobs", key, "-", stdin=b"from stdin")
    assert put.code == 0, put.stderr
    assert put.stdout.startswith("version ")

    got = await cachecoord(app, "get", "--json", "blobs", key)

    assert got.json()["value"] == "from stdin"


async def test_delete_removes_the_key(app: App, key: str) -> None:
    await cachecoord(app, "put", "blobs", key, "doomed")

    deleted = await cachecoord(app, "delete", "blobs", key)
    again = await cachecoord(app, "delete", "--json", "blobs", key)
    got = await cachecoord(app, "get", "blobs", key)

    assert (deleted.code, deleted.stdout.strip()) == (0, "deleted")
    assert again.code == 0, again.stderr
    assert again.json()["deleted"] is False
    assert got.stdout.strip() == "(not found)"


async def test_invalidate_drops_the_cached_copy(app: App, client: AsyncClient, key: str) -> None:
    await client.put("blobs", key, b"cached")
    await client.get("blobs", key)  # loads it into Redis

    invalidated = await cachecoord(app, "invalidate", "blobs", key)
    again = await cachecoord(app, "invalidate", "--json", "blobs", key)

    assert (invalidated.code, invalidated.stdout.strip()) == (0, "1 cached entry dropped")
    assert again.json() == {"invalidated": 0}
    assert (await client.get("blobs", key)).value == b"cached"


async def test_invalidate_tags_hides_the_values_put_with_the_tag(
    app: App, client: AsyncClient, key: str
) -> None:
    put = await cachecoord(app, "put", "blobs", key, "tagged", "--tag", f"t-{key}", "--tag", "x")
    await client.get("blobs", key)
    await client.get("blobs", key)  # cached in Redis
    invalidated = await cachecoord(app, "invalidate-tags", "blobs", f"t-{key}")

    assert put.code == 0, put.stderr
    assert (invalidated.code, invalidated.stdout.strip()) == (0, "1 tag(s) invalidated")
    got = await client.get("blobs", key)
    assert (got.value, got.layer) == (b"tagged", Layer.DATABASE)


async def test_unknown_namespace_exits_64_plus_not_found_on_stderr(app: App) -> None:
    result = await cachecoord(app, "get", "no-such-namespace", "1")

    assert result.code == exit_codes.for_status(grpc.StatusCode.NOT_FOUND) == 69
    assert result.stdout == ""
    assert "NOT_FOUND" in result.stderr
    assert "no-such-namespace" in result.stderr


async def test_unknown_namespace_in_json_mode_prints_the_error_as_json_on_stderr(
    app: App,
) -> None:
    result = await cachecoord(app, "get", "--json", "no-such-namespace", "1")

    assert result.code == 69
    assert result.stdout == ""
    error = json.loads(result.stderr)
    assert (error["error"], error["code"]) == ("NOT_FOUND", 5)


async def test_each_failure_has_its_own_exit_code(app: App, key: str) -> None:
    put = await cachecoord(app, "put", "--json", "blobs", key, "v1")
    stale = str(put.json()["version"] + 1000)
    conflict = await cachecoord(app, "put", "blobs", key, "v2", "--expected-version", stale)
    invalid = await cachecoord(app, "get", "blobs", "")
    unreachable = await cachecoord(
        app, "get", "blobs", key, "--timeout", "1", env={}, target="127.0.0.1:1"
    )

    assert put.code == 0, put.stderr
    assert conflict.code == 64 + grpc.StatusCode.FAILED_PRECONDITION.value[0], conflict.stderr
    assert invalid.code == 64 + grpc.StatusCode.INVALID_ARGUMENT.value[0], invalid.stderr
    assert unreachable.code == 64 + grpc.StatusCode.UNAVAILABLE.value[0], unreachable.stderr
    assert "UNAVAILABLE" in unreachable.stderr


async def test_help_lists_the_exit_codes() -> None:
    proc = await asyncio.create_subprocess_exec(
        CLI, "--help", stdout=asyncio.subprocess.PIPE, env=cli_env()
    )
    out, _ = await proc.communicate()

    assert proc.returncode == 0
    for code in grpc.StatusCode:
        if code is not grpc.StatusCode.OK:
            assert f"{exit_codes.for_status(code):<4}{code.name}" in out.decode()


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--log-level", "bogus"],
        ["serve", "--log-format", "xml"],
        ["get", "blobs"],
        ["get", "--no-such-option", "blobs", "1"],
        ["put", "blobs", "k", "v", "--expected-version", "x"],
        ["no-such-command"],
        ["get", "--tls-cert", "/dev/null", "blobs", "1"],
    ],
)
async def test_invalid_options_are_one_line_usage_errors(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        CLI,
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)

    assert proc.returncode == exit_codes.USAGE
    assert out == b""
    assert len(err.decode().strip().splitlines()) == 1, err.decode()
    assert b"Traceback" not in err


async def test_log_level_from_the_environment_is_checked_too() -> None:
    proc = await asyncio.create_subprocess_exec(
        CLI,
        "serve",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env({"CACHECOORD_LOG_LEVEL": "loud"}),
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)

    assert proc.returncode == exit_codes.USAGE
    assert len(err.decode().strip().splitlines()) == 1, err.decode()


async def test_lock_runs_command_with_fencing_token_and_releases(
    app: App, client: AsyncClient, name: str
) -> None:
    result = await cachecoord(app, "lock", name, "--", "sh", "-c", "echo $CACHECOORD_FENCING_TOKEN")

    assert result.code == 0, result.stderr
    printed = result.stdout.strip()
    assert printed.isdigit(), result.stdout
    after = await client.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=0)
    assert after.fencing_token > int(printed)
    await client.release_lock(name, after.token)


async def test_lock_exits_with_the_commands_exit_code_and_releases(
    app: App, client: AsyncClient, name: str
) -> None:
    result = await cachecoord(app, "lock", name, "--", "sh", "-c", "exit 3")

    assert result.code == 3
    after = await client.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=0)
    await client.release_lock(name, after.token)


async def test_lock_without_a_command_is_a_usage_error(app: App, name: str) -> None:
    result = await cachecoord(app, "lock", name)

    assert result.code == 2
    assert "needs a command" in result.stderr


class HeldLock:
    """``cachecoord lock ... -- sh -c 'echo held; read _'``: holds the lock
    until :meth:`finish` closes the command's standard input."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, app: App, name: str, *options: str) -> HeldLock:
        proc = await asyncio.create_subprocess_exec(
            CLI,
            "lock",
            "--target",
            f"127.0.0.1:{app.port}",
            *options,
            name,
            "--",
            "sh",
            "-c",
            "echo held; read _",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env(),
        )
        held = cls(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line != b"held\n":
            await held.kill()
            raise AssertionError(f"cachecoord lock did not run its command: {line!r}")
        return held

    async def finish(self) -> Result:
        out, err = await asyncio.wait_for(self.proc.communicate(b"\n"), 30)
        assert self.proc.returncode is not None
        return Result(self.proc.returncode, out.decode(), err.decode())

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def test_lock_is_held_while_the_command_runs(
    app: App, client: AsyncClient, name: str
) -> None:
    held = await HeldLock.start(app, name)
    try:
        with pytest.raises(CacheCoordError) as refused:
            await client.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=0)
        assert refused.value.code is grpc.StatusCode.ABORTED

        result = await held.finish()
    finally:
        await held.kill()

    assert result.code == 0, result.stderr
    after = await client.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=0)
    await client.release_lock(name, after.token)


async def test_lock_is_renewed_past_its_ttl_while_the_command_runs(
    app: App, client: AsyncClient, name: str
) -> None:
    held = await HeldLock.start(app, name, "--ttl-ms", "300")
    try:
        # Twice the TTL: only the CLI's renewals keep the lock from expiring.
        with pytest.raises(CacheCoordError) as refused:
            await client.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=600)
        assert refused.value.code is grpc.StatusCode.ABORTED

        result = await held.finish()
    finally:
        await held.kill()

    assert result.code == 0, result.stderr
    assert "could not extend" not in result.stderr


async def test_lock_passes_the_command_line_through_verbatim(
    app: App, client: AsyncClient, name: str
) -> None:
    # The command's own arguments may hold "--" and options of the CLI's own.
    argv = ["a", "--", "--json", "b"]
    script = 'printf "%s\\n" "$@"'

    result = await cachecoord(app, "lock", name, "--", "sh", "-c", script, "sh", *argv)

    assert result.code == 0, result.stderr
    assert result.stdout.splitlines() == argv


async def test_lock_accepts_options_after_the_name_as_documented(
    app: App, client: AsyncClient, name: str
) -> None:
    result = await cachecoord(
        app, "lock", name, "--wait-ms", "0", "--", "sh", "-c", "echo $CACHECOORD_FENCING_TOKEN"
    )

    assert result.code == 0, result.stderr
    assert result.stdout.strip().isdigit(), result.stdout


async def test_lock_with_a_missing_command_reports_it_and_releases(
    app: App, client: AsyncClient, name: str
) -> None:
    result = await cachecoord(app, "lock", name, "--", "/nonexistent/command")

    assert result.code == 127
    assert "Traceback" not in result.stderr, result.stderr
    assert "/nonexistent/command" in result.stderr
    after = await client.acquire_lock(name, ttl_ms=10_000, wait_timeout_ms=0)
    await client.release_lock(name, after.token)


async def test_lock_held_by_another_exits_64_plus_aborted_without_running_the_command(
    app: App, client: AsyncClient, name: str, tmp_path: Path
) -> None:
    other = await client.acquire_lock(name, ttl_ms=10_000)
    marker = tmp_path / "ran"
    try:
        result = await cachecoord(app, "lock", name, "--wait-ms", "0", "--", "touch", str(marker))
    finally:
        await client.release_lock(name, other.token)
    assert result.code == 64 + grpc.StatusCode.ABORTED.value[0], result.stderr
    assert not marker.exists()
