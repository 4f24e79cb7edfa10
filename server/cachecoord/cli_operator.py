"""The operator commands of ``cachecoord``: the write-behind queues and their
dead letters (operations.py does the work; this module parses and prints).

    cachecoord queue status [NAMESPACE...] --config FILE [--json]
    cachecoord dead-letters list NAMESPACE [--limit N] --config FILE [--json]
    cachecoord dead-letters replay NAMESPACE (ID... | --all) --config FILE [--json]
    cachecoord dead-letters drop NAMESPACE (ID... | --all) --config FILE [--json]
    cachecoord consistency report [NAMESPACE...] [--minutes N] --config FILE [--json]

They need the server's configuration (``--config`` or ``$CACHECOORD_CONFIG``)
for the Redis and PostgreSQL URLs and the namespaces' settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg

from cachecoord import exit_codes, operations
from cachecoord.cli_output import value_fields
from cachecoord.config import ConfigError, NamespaceSettings, Settings, load
from cachecoord.consistency import nines
from cachecoord.storage.consistency_log import KEEP_MINUTES, ConsistencyLog
from cachecoord.storage.errors import RedisClusterException, RedisError
from cachecoord.storage.redis_store import connect

Action = Callable[
    [operations.RedisClient, Settings, argparse.Namespace], Awaitable[tuple[Any, str]]
]


def add_commands(commands: Any) -> None:
    """Add ``queue`` and ``dead-letters`` to the ``cachecoord`` subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=os.environ.get("CACHECOORD_CONFIG"))
    common.add_argument("--json", action="store_true", help="print JSON")

    queue = commands.add_parser("queue", help="the write-behind queues (operator)")
    queue_actions = queue.add_subparsers(required=True, metavar="ACTION")
    status = queue_actions.add_parser(
        "status",
        parents=[common],
        help="depth, oldest write's age, pending, consumers and dead letters per namespace",
    )
    status.add_argument("namespaces", nargs="*", metavar="namespace")
    status.set_defaults(run=_runner(_status))

    dead = commands.add_parser("dead-letters", help="writes PostgreSQL rejected (operator)")
    dead_actions = dead.add_subparsers(required=True, metavar="ACTION")
    listing = dead_actions.add_parser(
        "list", parents=[common], help="the dead letters, oldest first, with their errors"
    )
    listing.add_argument("namespace")
    listing.add_argument("--limit", type=int, default=1000)
    listing.set_defaults(run=_runner(_list))
    for name, run, text in (
        ("replay", _replay, "write them again, as new writes, unless the key was written since"),
        ("drop", _drop, "delete them for good"),
    ):
        action = dead_actions.add_parser(name, parents=[common], help=text)
        action.add_argument("namespace")
        action.add_argument("ids", nargs="*", metavar="id", help="dead-letter ids (from list)")
        action.add_argument("--all", action="store_true", help="every dead letter of the namespace")
        action.set_defaults(run=_runner(run))

    consistency = commands.add_parser(
        "consistency", help="what the consistency observer found (operator)"
    )
    consistency_actions = consistency.add_subparsers(required=True, metavar="ACTION")
    report = consistency_actions.add_parser(
        "report",
        parents=[common],
        help="checks, violations and nines within the bound over the last minutes, per namespace",
    )
    report.add_argument("namespaces", nargs="*", metavar="namespace")
    report.add_argument("--minutes", type=int, default=60, help="the window (default 60)")
    report.set_defaults(run=_runner(_report))


def _runner(action: Action) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            settings = load(args.config, os.environ)
            doc, text, code = asyncio.run(_connected(action, settings, args))
        except ConfigError as err:
            return _fail(args, "usage", str(err), exit_codes.USAGE)
        except (RedisError, RedisClusterException, OSError) as err:
            return _fail(args, "redis", f"Redis at redis.url: {err}", exit_codes.FAILURE)
        except psycopg.Error as err:
            return _fail(args, "postgres", f"PostgreSQL at postgres.url: {err}", exit_codes.FAILURE)
        except operations.QueueFull as err:
            return _fail(args, "queue_full", str(err), exit_codes.FAILURE)
        print(json.dumps(doc) if args.json else text)
        return code

    return run


async def _connected(
    action: Action, settings: Settings, args: argparse.Namespace
) -> tuple[Any, str, int]:
    client = connect(settings.redis)
    try:
        doc, text = await action(client, settings, args)
    finally:
        await client.aclose()
    code = exit_codes.FAILURE if isinstance(doc, dict) and doc.get("failed") else exit_codes.OK
    return doc, text, code


def _fail(args: argparse.Namespace, kind: str, message: str, code: int) -> int:
    if args.json:
        print(json.dumps({"error": kind, "message": message}), file=sys.stderr)
    else:
        print(f"cachecoord: {message}", file=sys.stderr)
    return code


def _namespace(settings: Settings, args: argparse.Namespace) -> NamespaceSettings:
    return operations.write_behind(settings, [args.namespace])[args.namespace]


def _ids(args: argparse.Namespace) -> list[str] | None:
    if args.all and args.ids:
        raise ConfigError("give dead-letter ids or --all, not both")
    if not args.all and not args.ids:
        raise ConfigError("give the dead-letter ids (see `dead-letters list`) or --all")
    return None if args.all else args.ids


async def _status(
    client: operations.RedisClient, settings: Settings, args: argparse.Namespace
) -> tuple[Any, str]:
    statuses = [
        await operations.queue_status(client, ns)
        for ns in operations.write_behind(settings, args.namespaces).values()
    ]
    docs = [
        {
            "namespace": s.namespace,
            "depth": s.depth,
            "pending": s.pending,
            "oldest_age_s": None if s.oldest_age_s is None else round(s.oldest_age_s, 3),
            "dead_letters": s.dead_letters,
            "max_queue": s.max_queue,
            "partitions": s.partitions,
            "consumers": [
                {"name": c.name, "pending": c.pending, "idle_ms": c.idle_ms} for c in s.consumers
            ],
        }
        for s in statuses
    ]
    lines = ["namespace\tdepth\tpending\toldest\tdead letters\tconsumers"]
    for s in statuses:
        oldest = "-" if s.oldest_age_s is None else f"{s.oldest_age_s:.1f}s"
        readers = ", ".join(f"{c.name} ({c.pending} pending)" for c in s.consumers) or "none"
        lines.append(
            f"{s.namespace}\t{s.depth}/{s.max_queue}\t{s.pending}\t{oldest}\t{s.dead_letters}"
            f"\t{readers}"
        )
    return {"namespaces": docs}, "\n".join(lines)


async def _list(
    client: operations.RedisClient, settings: Settings, args: argparse.Namespace
) -> tuple[Any, str]:
    ns = _namespace(settings, args)
    letters = await operations.dead_letters(client, ns, limit=args.limit)
    docs = [
        {
            "id": d.id,
            "key": d.key,
            "version": d.version,
            "kind": d.kind,
            "error": d.error,
            "dead_at": d.dead_at,
            "reverted_to": d.reverted_to,
            **value_fields(d.payload),
        }
        for d in letters
    ]
    lines = [
        f"{d.id}\t{d.key}\tversion {d.version}\t{d.kind}\t"
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(d.dead_at))}\t{d.error}"
        for d in letters
    ]
    return {"namespace": ns.name, "dead_letters": docs}, "\n".join(lines) or "(no dead letters)"


async def _replay(
    client: operations.RedisClient, settings: Settings, args: argparse.Namespace
) -> tuple[Any, str]:
    ns = _namespace(settings, args)
    ids = _ids(args)
    if ids is None:  # --all: every one, not a first page
        ids = [d.id for d in await operations.dead_letters(client, ns, limit=None)]
    results = await operations.replay(
        client, settings.postgres.url, ns, ids, sharded=settings.redis.sharded
    )
    docs = [{"id": r.id, "key": r.key, "outcome": r.outcome, "version": r.version} for r in results]
    lines = [
        f"{r.id}\t{r.key}\t{r.outcome}" + (f"\tversion {r.version}" if r.version else "")
        for r in results
    ]
    failed = any(r.outcome != "replayed" for r in results)
    return {"namespace": ns.name, "results": docs, "failed": failed}, "\n".join(lines) or (
        "(no dead letters)"
    )


async def _drop(
    client: operations.RedisClient, settings: Settings, args: argparse.Namespace
) -> tuple[Any, str]:
    ns = _namespace(settings, args)
    ids = _ids(args)
    if ids is None:  # --all: every one, not a first page
        ids = [d.id for d in await operations.dead_letters(client, ns, limit=None)]
    dropped = await operations.drop(client, ns, ids)
    return {"namespace": ns.name, "dropped": dropped}, f"{dropped} dead letter(s) dropped"


async def _report(
    client: operations.RedisClient, settings: Settings, args: argparse.Namespace
) -> tuple[Any, str]:
    if not 1 <= args.minutes <= KEEP_MINUTES:
        raise ConfigError(f"--minutes must be between 1 and {KEEP_MINUTES}")
    names = args.namespaces or sorted(settings.namespaces)
    unknown = [name for name in names if name not in settings.namespaces]
    if unknown:
        raise ConfigError(f"no such namespace: {', '.join(unknown)}")
    log = ConsistencyLog(client)
    docs, lines = [], [f"last {args.minutes} min\tchecks\tviolations\tconsistent\tnines"]
    for name in names:
        counts = await log.counts(name, args.minutes)
        rate = counts.violations / counts.checks if counts.checks else 0.0
        found = nines(counts.checks, counts.violations)
        docs.append(
            {
                "namespace": name,
                "checks": counts.checks,
                "violations": counts.violations,
                "consistent": None if not counts.checks else 1 - rate,
                "nines": None if not counts.checks else round(found, 2),
                "nines_lower_bound": counts.checks > 0 and counts.violations == 0,
            }
        )
        if not counts.checks:
            lines.append(f"{name}\t0\t0\t-\t-")
        else:
            at_least = ">=" if not counts.violations else ""
            lines.append(
                f"{name}\t{counts.checks}\t{counts.violations}\t{(1 - rate) * 100:.6g}%"
                f"\t{at_least}{found:.2f}"
            )
    return {"minutes": args.minutes, "namespaces": docs}, "\n".join(lines)
