"""redis-py connections that report a transport closed under them as a
connection error, on uvloop as on asyncio's own loop.

``cachecoord serve`` runs on uvloop. There, writing to a transport the peer
has already closed (Redis killed or restarted, the connection cut while it
was being opened) raises ``RuntimeError: ... the handler is closed``
(MagicStack/uvloop#506); asyncio's loop drops the write and the next read
fails instead. redis-py catches only ``OSError`` there. The RuntimeError
would reach the caller as an internal error, not as Redis being unreachable.
It would also escape every loop that retries on ``RedisError``, the
write-behind flusher's among them.

redis-py 8.2 checks ``transport.is_closing()`` before a write and raises its
own ConnectionError then, but a transport that closes while the write is
under way still raises the RuntimeError through ``writelines``/``drain``:
without this class, the test_cluster.py test
``test_primary_killed_under_write_behind_load_loses_no_acknowledged_write``
failed 4 of 7 runs (the instance stopped acknowledging Puts after the
failover), and passed 4 of 4 with it (2026-12-06, redis-py 8.2.0).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar, cast

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError


class _ReportsClosedTransport(AbstractConnection):
    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except RuntimeError as err:  # redis-py has already dropped the connection
            raise RedisConnectionError(f"Error while writing to socket: {err}") from err


C = TypeVar("C", bound=AbstractConnection)

_REPORTING: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def reporting_closed_transports(connection_class: type[C]) -> type[C]:
    """*connection_class* (TCP, TLS or Unix socket, as the URL chose) with the
    RuntimeError of a closed transport turned into redis-py's ConnectionError."""
    if issubclass(connection_class, _ReportsClosedTransport):
        return connection_class
    reporting = _REPORTING.get(connection_class)
    if reporting is None:
        reporting = type(connection_class.__name__, (_ReportsClosedTransport, connection_class), {})
        _REPORTING[connection_class] = reporting
    return cast(type[C], reporting)
