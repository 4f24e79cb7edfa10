"""The echo floor: what one unary RPC costs when the handler does nothing.

The same server as ``../shared/probes/grpc_echo_floor.py``: a grpc.aio server with
one generic handler that returns the request bytes (no protobuf, no I/O), in its
own process, on the same event loop cachecoord uses (uvloop when importable).
Measured in the same run, with the same clients, concurrency and payload as each
cachecoord phase, so "cachecoord CPU per call / floor CPU per call" isolates what
the cache logic adds to the cost of gRPC in Python on this machine, whatever the
machine and however busy it is at the moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from multiprocessing.connection import Connection
from typing import Any

import grpc

from bench.loadgen import use_uvloop

METHOD = "/floor.Echo/Echo"
_START_TIMEOUT = 30.0


class EchoServer:
    """The echo server process; its port and pid are known once constructed."""

    def __init__(self, context: multiprocessing.context.SpawnContext) -> None:
        parent, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child,), name="bench-echo-floor", daemon=True
        )
        self._process.start()
        child.close()
        try:
            if not parent.poll(_START_TIMEOUT):
                raise RuntimeError(f"the echo floor server did not start in {_START_TIMEOUT:.0f} s")
            self.port: int = parent.recv()
            self.uvloop: bool = parent.recv()
        except EOFError:
            self.close()
            raise RuntimeError(
                f"the echo floor server exited at start (code {self._process.exitcode})"
            ) from None
        except BaseException:
            self.close()
            raise
        finally:
            parent.close()

    @property
    def pid(self) -> int:
        pid = self._process.pid
        assert pid is not None, "started in __init__"
        return pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)


def _serve(conn: Connection) -> None:
    """Process entry point: serve until terminated; send the port, then the loop kind."""
    uvloop = use_uvloop()
    asyncio.run(_main(conn, uvloop))


async def _main(conn: Connection, uvloop: bool) -> None:
    async def echo(request: bytes, context: Any) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "floor.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    # As cachecoord's server: no SO_REUSEPORT, so a stray server cannot share the port.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn.send(port)
    conn.send(uvloop)
    conn.close()
    with contextlib.suppress(asyncio.CancelledError):
        await server.wait_for_termination()
