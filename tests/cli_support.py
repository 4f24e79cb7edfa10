"""Running the ``cachecoord`` console script's client commands from tests.

The instance under test serves from the test's event loop, so the CLI always
runs as an asyncio subprocess: a blocking ``subprocess.run`` would freeze the
server it talks to.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachecoord.app import App

CLI = str(Path(sys.executable).with_name("cachecoord"))


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without CACHECOORD_* variables (the target is passed
    explicitly), plus *extra*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHECOORD_")}
    return {**env, **(extra or {})}


async def cachecoord(
    app: App,
    command: str,
    *args: str,
    stdin: bytes = b"",
    env: Mapping[str, str] | None = None,
    target: str | None = None,
) -> Result:
    """Run ``cachecoord COMMAND --target <app> ARGS...`` to completion, with the
    CACHECOORD_* variables of *env* only (*target* instead of the app's)."""
    proc = await asyncio.create_subprocess_exec(
        CLI,
        command,
        "--target",
        target or f"127.0.0.1:{app.port}",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(env),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def operator(command: str, *args: str, config: Path) -> Result:
    """Run an operator command, ``cachecoord COMMAND ARGS... --config CONFIG``
    (they read Redis and PostgreSQL directly: no --target)."""
    proc = await asyncio.create_subprocess_exec(
        CLI,
        *command.split(),
        *args,
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())
