"""The server commands of ``cachecoord`` (cli.py has the client commands):

    cachecoord serve --config FILE [--workers N] [--log-level L] [--log-format F]
    cachecoord triggers install|uninstall NAMESPACE --config FILE

The server modules are imported only when one of these runs, so that the
client commands start fast.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cachecoord import exit_codes
from cachecoord.config import ConfigError, Settings, load

log = logging.getLogger(__name__)

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def add_serve(commands: Any) -> None:
    """Add ``serve`` to the ``cachecoord`` subcommands."""
    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--config", type=Path, default=os.environ.get("CACHECOORD_CONFIG"))
    serve.add_argument(
        "--log-level",
        type=_one_of("log level", _LOG_LEVELS, str.upper),
        default=os.environ.get("CACHECOORD_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO (default), WARNING, ERROR or CRITICAL",
    )
    serve.add_argument(
        "--log-format",
        type=_one_of("log format", ("text", "json"), str.lower),
        default=os.environ.get("CACHECOORD_LOG_FORMAT", "text"),
        help="text (default), or json: one JSON object per line, with trace and span ids",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (SO_REUSEPORT); about one per core",
    )
    serve.set_defaults(run=_serve)


def add_triggers(commands: Any) -> None:
    """Add ``triggers`` to the ``cachecoord`` subcommands."""
    triggers = commands.add_parser(
        "triggers", help="install or remove the change triggers of a mapped namespace"
    )
    triggers.add_argument("action", choices=["install", "uninstall"])
    triggers.add_argument("namespace")
    triggers.add_argument("--config", type=Path, default=os.environ.get("CACHECOORD_CONFIG"))
    triggers.set_defaults(run=_triggers)


def _one_of(what: str, choices: Sequence[str], normal: Any) -> Any:
    """An argparse type: *normal*(value) if among *choices*, else a usage error.
    (A type, not ``choices``, so that a default from the environment is checked too.)"""

    def check(value: str) -> str:
        normalized: str = normal(value)
        if normalized not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid {what} {value!r}: choose from {', '.join(choices)}"
            )
        return normalized

    check.__name__ = what
    return check


def _serve(args: argparse.Namespace) -> int:
    from cachecoord import telemetry
    from cachecoord.app import StartupError

    telemetry.configure_logging(args.log_level, json_lines=args.log_format == "json")
    try:
        settings = load(args.config, os.environ)
    except ConfigError as err:
        print(f"cachecoord: configuration error: {err}", file=sys.stderr)
        return 2
    try:
        telemetry.check()
    except telemetry.TelemetryError as err:
        print(f"cachecoord: cannot start: {err}", file=sys.stderr)
        return exit_codes.USAGE
    if args.workers != 1:
        return _serve_workers(args, settings.server.listen)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    configured = telemetry.configure()
    try:
        runner(serve(settings))
    except (ConfigError, StartupError) as err:
        print(f"cachecoord: cannot start: {err}", file=sys.stderr)
        return 2
    finally:
        configured.shutdown()
    return 0


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    from cachecoord.app import App

    app = App(settings)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await app.stop()


def _serve_workers(args: argparse.Namespace, listen: str) -> int:
    from cachecoord.workers import supervise

    if not 1 < args.workers <= 256:
        print("cachecoord: --workers must be between 1 and 256", file=sys.stderr)
        return 2
    if listen.endswith(":0"):
        print("cachecoord: --workers needs a fixed port in server.listen (not :0)", file=sys.stderr)
        return 2
    serve_args = ["--log-level", args.log_level, "--log-format", args.log_format]
    if args.config is not None:
        serve_args += ["--config", str(args.config)]
    return supervise(serve_args, args.workers)


def _triggers(args: argparse.Namespace) -> int:
    from cachecoord.invalidation.triggers import change_triggers

    try:
        settings = load(args.config, os.environ)
        message = asyncio.run(change_triggers(settings, args.namespace, args.action))
    except ConfigError as err:
        print(f"cachecoord: {err}", file=sys.stderr)
        return 2
    print(message)
    return 0
