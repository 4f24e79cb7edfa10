"""The ``cachecoord`` command: run the server, or talk to one.

    cachecoord serve --config FILE
    cachecoord get NAMESPACE KEY
    cachecoord batch-get NAMESPACE KEY...
    cachecoord put NAMESPACE KEY VALUE [--expected-version N] [--ttl-ms N] [--tag T...]
    cachecoord delete NAMESPACE KEY
    cachecoord invalidate NAMESPACE [KEY...] [--all]
    cachecoord invalidate-tags NAMESPACE TAG...
    cachecoord watch NAMESPACE... [--key-prefix P] [--count N]
    cachecoord health [SERVICE]
    cachecoord lock NAME [--ttl-ms N] [--wait-ms N] -- COMMAND...
    cachecoord queue status [NAMESPACE...] --config FILE
    cachecoord dead-letters list|replay|drop NAMESPACE [ID...] --config FILE

Client commands reach ``--target`` (default ``$CACHECOORD_TARGET`` or
127.0.0.1:50051), over TLS with ``--tls`` or ``--tls-ca FILE`` (mutual TLS
with ``--tls-cert``/``--tls-key``), with the bearer token of
``$CACHECOORD_TOKEN`` or ``--token-file FILE`` (never an argument: the process
list would show it); they print human-readable text, or JSON with ``--json``.
Operator commands (``queue``, ``dead-letters``) read Redis and PostgreSQL
directly, at the URLs of the server's ``--config``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc

from cachecoord import cli_operator, cli_server, exit_codes
from cachecoord.cli_output import value_fields
from cachecoord_client import CacheCoordError, Client, LockLost, WatchEventKind
from cachecoord_client.errors import from_rpc_error
from cachecoord_client.types import HeldLock


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(exit_codes.USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


class UsageError(Exception):
    """Options that cannot go together, or a file an option names that cannot be read."""


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is a command for `lock`, verbatim
    # (argparse would drop later "--" and cannot take options before it).
    command: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1 :]
    args = _parser().parse_args(argv)
    args.command = command
    try:
        code = args.run(args)
    except UsageError as err:
        print(f"cachecoord: {err}", file=sys.stderr)
        code = exit_codes.USAGE
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _version() -> str:
    from importlib.metadata import version

    return version("cachecoord")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cachecoord",
        description=__doc__.split("\n")[0],
        epilog=exit_codes.epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cachecoord {_version()}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    cli_server.add_serve(commands)

    client = _Parser(add_help=False)
    client.add_argument("--target", default=os.environ.get("CACHECOORD_TARGET", "127.0.0.1:50051"))
    client.add_argument(
        "--json", action="store_true", help="print JSON (errors too, on stderr); see README CLI"
    )
    client.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds")
    client.add_argument("--tls", action="store_true", help="TLS, trusting the system's CAs")
    client.add_argument("--tls-ca", type=Path, help="TLS, trusting this CA certificate (PEM)")
    client.add_argument("--tls-cert", type=Path, help="client certificate (PEM), mutual TLS")
    client.add_argument("--tls-key", type=Path, help="private key (PEM) of --tls-cert")
    client.add_argument(
        "--token-file", type=Path, help="file holding the bearer token (else $CACHECOORD_TOKEN)"
    )

    get = commands.add_parser("get", parents=[client], help="read a key")
    get.add_argument("namespace")
    get.add_argument("key")
    get.set_defaults(run=_get)

    batch_get = commands.add_parser("batch-get", parents=[client], help="read many keys")
    batch_get.add_argument("namespace")
    batch_get.add_argument("keys", nargs="+", metavar="key")
    batch_get.set_defaults(run=_batch_get)

    put = commands.add_parser("put", parents=[client], help="write a key")
    put.add_argument("namespace")
    put.add_argument("key")
    put.add_argument("value", help="the value ('-' reads it from standard input)")
    put.add_argument("--expected-version", type=int)
    put.add_argument("--ttl-ms", type=int)
    put.add_argument(
        "--tag", action="append", default=[], dest="tags", help="a tag of the value (repeatable)"
    )
    put.set_defaults(run=_put)

    delete = commands.add_parser("delete", parents=[client], help="delete a key")
    delete.add_argument("namespace")
    delete.add_argument("key")
    delete.add_argument("--expected-version", type=int)
    delete.set_defaults(run=_delete)

    invalidate = commands.add_parser("invalidate", parents=[client], help="drop cached copies")
    invalidate.add_argument("namespace")
    invalidate.add_argument("keys", nargs="*")
    invalidate.add_argument("--all", action="store_true", help="every key of the namespace")
    invalidate.set_defaults(run=_invalidate)

    invalidate_tags = commands.add_parser(
        "invalidate-tags", parents=[client], help="hide every cached value carrying a tag"
    )
    invalidate_tags.add_argument("namespace")
    invalidate_tags.add_argument("tags", nargs="+", metavar="tag")
    invalidate_tags.set_defaults(run=_invalidate_tags)

    watch = commands.add_parser(
        "watch", parents=[client], help="print the invalidation events of namespaces"
    )
    watch.add_argument("namespaces", nargs="+", metavar="namespace")
    watch.add_argument("--key-prefix", default="", help="only keys starting with this")
    watch.add_argument("--count", type=int, help="stop after this many events")
    watch.set_defaults(run=_watch)

    health = commands.add_parser(
        "health", parents=[client], help="ask the grpc.health.v1 service; exit 0 when SERVING"
    )
    health.add_argument("service", nargs="?", default="", help="service name ('' the server)")
    health.set_defaults(run=_health)

    cli_operator.add_commands(commands)

    cli_server.add_triggers(commands)

    lock = commands.add_parser("lock", parents=[client], help="run a command while holding a lock")
    lock.add_argument("name")
    lock.add_argument("--ttl-ms", type=int, default=30_000, help="lock TTL, renewed while held")
    lock.add_argument("--wait-ms", type=int, default=10_000, help="how long to wait for it")
    lock.set_defaults(run=_lock)
    return parser


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(args.tls_ca, "--tls-ca"),
        private_key=_read(args.tls_key, "--tls-key"),
        certificate_chain=_read(args.tls_cert, "--tls-cert"),
    )


def _client(args: argparse.Namespace) -> Client:
    credentials = _credentials(args)
    token = os.environ.get("CACHECOORD_TOKEN")
    if args.token_file is not None:
        token = (_read(args.token_file, "--token-file") or b"").decode().strip()
    try:
        return Client(
            args.target, default_timeout=args.timeout, credentials=credentials, token=token or None
        )
    except ValueError as err:
        raise UsageError(str(err)) from None


def _read(path: Path | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise UsageError(f"{option}: cannot read {path}: {err.strerror}") from None


def failed(args: argparse.Namespace, err: CacheCoordError) -> int:
    """Report a failed RPC on stderr (as JSON with ``--json``); its exit code."""
    code = exit_codes.for_status(err.code)
    if getattr(args, "json", False):
        doc = {"error": err.code.name, "code": err.code.value[0], "message": err.details}
        print(json.dumps(doc), file=sys.stderr)
    else:
        print(f"cachecoord: {err.code.name}: {err.details}", file=sys.stderr)
    return code


def _call(args: argparse.Namespace, action: Any) -> int:
    try:
        with _client(args) as client:
            result = action(client)
    except CacheCoordError as err:
        return failed(args, err)
    if args.json:
        print(json.dumps(result[0]))
    else:
        print(result[1])
    return 0


def _show(value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(value).decode()


def _entry(found: bool, value: bytes, version: int, layer: str, stale: bool, ttl_ms: int) -> Any:
    if not found:
        return {"found": False}
    fields = {"version": version, "layer": layer, "stale": stale, "ttl_ms": ttl_ms}
    return {"found": True, **value_fields(value), **fields}


def _get(args: argparse.Namespace) -> int:
    def action(client: Client) -> tuple[Any, str]:
        got = client.get(args.namespace, args.key)
        doc = _entry(got.found, got.value, got.version, got.layer.value, got.stale, got.ttl_ms)
        if not got.found:
            return doc, "(not found)"
        stale = ", stale" if got.stale else ""
        return doc, f"{_show(got.value)}\n(version {got.version}, from {got.layer.value}{stale})"

    return _call(args, action)


def _batch_get(args: argparse.Namespace) -> int:
    def action(client: Client) -> tuple[Any, str]:
        entries = client.batch_get(args.namespace, args.keys)
        docs = [
            {"key": e.key, **_entry(e.found, e.value, e.version, e.layer.value, e.stale, e.ttl_ms)}
            for e in entries
        ]
        lines = [
            f"{e.key}\t{_show(e.value)}\t(version {e.version}, from {e.layer.value})"
            if e.found
            else f"{e.key}\t(not found)"
            for e in entries
        ]
        return {"entries": docs}, "\n".join(lines)

    return _call(args, action)


def _put(args: argparse.Namespace) -> int:
    value = sys.stdin.buffer.read() if args.value == "-" else args.value.encode()

    def action(client: Client) -> tuple[Any, str]:
        version = client.put(
            args.namespace,
            args.key,
            value,
            expected_version=args.expected_version,
            ttl_ms=args.ttl_ms,
            tags=args.tags,
        )
        return {"version": version}, f"version {version}"

    return _call(args, action)


def _delete(args: argparse.Namespace) -> int:
    def action(client: Client) -> tuple[Any, str]:
        result = client.delete(args.namespace, args.key, expected_version=args.expected_version)
        text = "deleted" if result.deleted else "no such key"
        return {"deleted": result.deleted, "version": result.version}, text

    return _call(args, action)


def _invalidate(args: argparse.Namespace) -> int:
    def action(client: Client) -> tuple[Any, str]:
        count = client.invalidate(args.namespace, args.keys, all=args.all)
        return {"invalidated": count}, f"{count} cached entr{'y' if count == 1 else 'ies'} dropped"

    return _call(args, action)


def _invalidate_tags(args: argparse.Namespace) -> int:
    def action(client: Client) -> tuple[Any, str]:
        client.invalidate_tags(args.namespace, args.tags)
        return {"invalidated_tags": args.tags}, f"{len(args.tags)} tag(s) invalidated"

    return _call(args, action)


def _watch(args: argparse.Namespace) -> int:
    """Print events as they come, one a line, until ``--count`` invalidations
    (or Ctrl-C); no deadline (``--timeout`` does not apply to the stream)."""
    seen = 0
    try:
        with (
            _client(args) as client,
            client.watch(args.namespaces, key_prefix=args.key_prefix) as events,
        ):
            for event in events:
                if args.json:
                    doc: dict[str, Any] = {"kind": event.kind.value, "reason": event.reason}
                    if event.kind is WatchEventKind.INVALIDATION:
                        doc.update(
                            namespace=event.namespace,
                            key=event.key,
                            all_keys=event.all_keys,
                            version=event.version,
                            origin=event.origin,
                        )
                        if event.tag:
                            doc["tag"] = event.tag
                    print(json.dumps(doc), flush=True)
                elif event.kind is WatchEventKind.INVALIDATION:
                    key = "(all keys)" if event.all_keys else event.key
                    if event.tag:
                        key = f"(tag {event.tag})"
                    print(
                        f"{event.namespace}\t{key}\tversion {event.version}\t{event.reason}"
                        f"\tfrom {event.origin}",
                        flush=True,
                    )
                elif event.kind is WatchEventKind.RESET:
                    print(f"(reset: {event.reason})", flush=True)
                if event.kind is WatchEventKind.INVALIDATION:
                    seen += 1
                    if args.count is not None and seen >= args.count:
                        break
    except CacheCoordError as err:
        return failed(args, err)
    return exit_codes.OK


def _health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    credentials = _credentials(args)
    channel = (
        grpc.insecure_channel(args.target)
        if credentials is None
        else grpc.secure_channel(args.target, credentials)
    )
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as err:
        return failed(args, from_rpc_error(err))
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(json.dumps({"status": status}) if args.json else status)
    return exit_codes.OK if status == "SERVING" else exit_codes.FAILURE


def _lock(args: argparse.Namespace) -> int:
    """Run the command while a HoldLock stream holds the lock; if the lock is
    lost meanwhile, SIGTERM the command at once and exit 64 + ABORTED."""
    command = args.command
    if not command:
        print("cachecoord: lock needs a command: cachecoord lock NAME -- COMMAND", file=sys.stderr)
        return 2
    try:
        with (
            _client(args) as client,
            client.hold_lock(
                args.name,
                ttl_ms=args.ttl_ms,
                wait_timeout_ms=args.wait_ms,
                timeout=args.wait_ms / 1000 + args.timeout,
            ) as lock,
        ):
            env = {**os.environ, "CACHECOORD_FENCING_TOKEN": str(lock.fencing_token)}
            try:
                proc = subprocess.Popen(command, env=env)
            except OSError as err:
                print(f"cachecoord: cannot run {command[0]!r}: {err.strerror}", file=sys.stderr)
                return 127
            done = threading.Event()
            guard = threading.Thread(
                target=_terminate_on_loss, args=(lock, proc, done), daemon=True
            )
            guard.start()
            try:
                code = proc.wait()
            finally:
                done.set()
                guard.join()
            lock.check()  # lost: LockLost, below
    except LockLost as err:
        print(
            f"cachecoord: lock {args.name!r} was lost while the command ran "
            f"(it was sent SIGTERM): {err.details}",
            file=sys.stderr,
        )
        return exit_codes.for_status(err.code)
    except CacheCoordError as err:  # not taken (held, unreachable), or not released
        return failed(args, err)
    return code


def _terminate_on_loss(
    lock: HeldLock, proc: subprocess.Popen[bytes], done: threading.Event
) -> None:
    """SIGTERM the command the moment its lock is lost (until *done*)."""
    while not done.is_set():
        if lock.wait_lost(0.05):
            if proc.poll() is None:
                proc.terminate()
            return
