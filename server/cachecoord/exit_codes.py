"""The exit codes of the ``cachecoord`` command, one per outcome a script may
want to tell apart.

A failed RPC exits with 64 + its gRPC status code, as grpcurl does: NOT_FOUND
(5) exits 69, UNAVAILABLE (14) exits 78. The offset keeps them apart from the
shell's own codes (1 for a failure, 2 for a usage error, 126/127 for a command
that cannot run, 128 + N for a signal).
"""

from __future__ import annotations

import grpc

OK = 0
FAILURE = 1
"""Failed for a reason that is not an RPC status (Redis unreachable for an
operator command, a health check that is not SERVING, a dead letter refused)."""
USAGE = 2
"""Invalid options or arguments, or an invalid configuration file."""
STATUS_OFFSET = 64
"""A failed RPC exits with STATUS_OFFSET + its gRPC status code (grpcurl's convention)."""


def for_status(code: grpc.StatusCode) -> int:
    """The exit code of an RPC that failed with *code*."""
    number: int = code.value[0]
    return STATUS_OFFSET + number


def epilog() -> str:
    """The exit-code table printed at the end of ``cachecoord --help``."""
    rows = [
        f"  {OK:<4}success (for `lock`: the command's own exit code)",
        f"  {FAILURE:<4}failure outside gRPC: an operator command cannot reach Redis or\n"
        "      PostgreSQL; health not SERVING; a dead letter not replayed",
        f"  {USAGE:<4}usage error: invalid option or argument; invalid configuration;\n"
        "      `serve` cannot start",
        "  127 `lock`: the command could not be run",
    ]
    rows += [
        f"  {for_status(code):<4}{code.name}"
        for code in grpc.StatusCode
        if code is not grpc.StatusCode.OK
    ]
    return "exit codes (a failed RPC exits with 64 + its gRPC status code, as grpcurl):\n" + (
        "\n".join(rows)
    )
