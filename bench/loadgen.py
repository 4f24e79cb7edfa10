"""The load generator: client processes that each keep CONC unary calls in flight.

Clients run in their own processes (multiprocessing *spawn*, as in the echo floor
probe) so that they never share a core's event loop with the server they measure.
They send pre-serialized requests through a generic bytes-in, bytes-out
multicallable: the client's cost per call is then the same for the echo floor and
for every cachecoord RPC, so what differs between two phases is the server's work.

A worker process lives for the whole benchmark and runs one job after another
(spawning a Python with grpc takes about a second, too much to pay per phase).
Each job is: warm-up calls, then "warm" to the parent, wait for "go", then the
measured calls and a report. The parent starts its CPU meters between "warm" and
"go", so warm-up, process start and channel set-up are never measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

import grpc

# Generous: a slow call shows up as a low rate, not as an error; a stuck server
# still ends the run.
CALL_TIMEOUT = 30.0
# How long the parent waits for a worker's next message before giving up.
REPLY_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class Job:
    """One phase for one worker process: the requests it sends, in order."""

    target: str
    method: str
    warmup: Sequence[bytes]
    measured: Sequence[bytes]
    concurrency: int
    sample_every: int = 0
    """Return every n-th measured reply (0: none), so the caller can check them."""
    channels: int = 1
    """Channels (so TCP connections) the calls are spread over, round-robin by
    caller; more than one lets SO_REUSEPORT spread a client over server workers."""


@dataclass(frozen=True, slots=True)
class ClientReport:
    """What one worker saw during the measured calls of a job."""

    calls: int
    errors: int
    first_error: str
    cpu: float
    """The worker's own CPU seconds (user + system) over the measured calls."""
    samples: list[bytes] = field(default_factory=list)
    latencies: array[float] = field(default_factory=lambda: array("d"))
    """Seconds from the start of each measured call to its reply (failed calls too)."""

    def with_cpu(self, cpu: float) -> ClientReport:
        return replace(self, cpu=cpu)


def use_uvloop() -> bool:
    """Install uvloop's event loop policy if it is importable; `cachecoord serve` uses
    uvloop whenever it can, so the floor and the clients do the same."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


class Worker:
    """A client process, driven from the parent through a pipe."""

    def __init__(self, context: multiprocessing.context.SpawnContext, index: int) -> None:
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_worker_main, args=(child,), name=f"bench-client-{index}", daemon=True
        )
        self._process.start()
        child.close()

    @property
    def pid(self) -> int:
        pid = self._process.pid
        assert pid is not None, "started in __init__"
        return pid

    def submit(self, job: Job) -> None:
        self._conn.send(job)

    def wait_warm(self) -> None:
        message = self._receive()
        if message != "warm":
            raise RuntimeError(f"client process: expected 'warm', got {message!r}")

    def go(self) -> None:
        self._conn.send("go")

    def wait_report(self) -> ClientReport:
        message = self._receive()
        if not isinstance(message, ClientReport):
            raise RuntimeError(f"client process: expected a report, got {message!r}")
        return message

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._conn.close()

    def _receive(self) -> object:
        if not self._conn.poll(REPLY_TIMEOUT):
            raise RuntimeError(f"client process {self.pid} sent nothing for {REPLY_TIMEOUT:.0f} s")
        try:
            message: object = self._conn.recv()
        except EOFError:
            raise RuntimeError(
                f"client process {self.pid} exited (code {self._process.exitcode})"
            ) from None
        if isinstance(message, BaseException):
            raise RuntimeError(f"client process {self.pid} failed: {message!r}") from message
        return message


def split(requests: Sequence[bytes], parts: int) -> list[list[bytes]]:
    """Deal *requests* round-robin to *parts* workers (so each gets a similar mix)."""
    return [list(requests[i::parts]) for i in range(parts)]


def _worker_main(conn: Connection) -> None:
    """Entry point of a client process: run jobs until the parent sends None."""
    use_uvloop()
    try:
        asyncio.run(_serve_jobs(conn))
    except BaseException as err:  # report, so the parent fails with the reason
        with contextlib.suppress(OSError):
            conn.send(RuntimeError(f"{type(err).__name__}: {err}"))
        raise


async def _serve_jobs(conn: Connection) -> None:
    channels: dict[tuple[str, int], grpc.aio.Channel] = {}
    loop = asyncio.get_running_loop()
    try:
        while True:
            job = await loop.run_in_executor(None, conn.recv)
            if job is None:
                return
            assert isinstance(job, Job)
            calls = []
            for number in range(job.channels):
                if (job.target, number) not in channels:
                    # A local subchannel pool: otherwise channels to one target share
                    # their connection.
                    options = [("grpc.use_local_subchannel_pool", 1)] if job.channels > 1 else []
                    channels[job.target, number] = grpc.aio.insecure_channel(job.target, options)
                # bytes in, bytes out
                calls.append(channels[job.target, number].unary_unary(job.method, None, None))
            await _pump(calls, job.warmup, job.concurrency, 0)
            conn.send("warm")
            go = await loop.run_in_executor(None, conn.recv)
            if go != "go":
                return
            started = time.process_time()
            report = await _pump(calls, job.measured, job.concurrency, job.sample_every)
            conn.send(report.with_cpu(time.process_time() - started))
    finally:
        for channel in channels.values():
            await channel.close(None)


async def _pump(
    calls: Sequence[Callable[..., Any]],
    requests: Sequence[bytes],
    concurrency: int,
    sample_every: int,
) -> ClientReport:
    """Send every request once, *concurrency* at a time, caller i on channel i mod
    len(calls); count errors, keep samples, time every call."""
    todo: Iterator[tuple[int, bytes]] = iter(enumerate(requests))
    errors = 0
    first_error = ""
    samples: list[bytes] = []
    latencies = array("d")
    clock = time.perf_counter

    async def caller(call: Callable[..., Any]) -> None:
        nonlocal errors, first_error
        for index, request in todo:  # shared iterator: each call takes the next request
            started = clock()
            try:
                reply = await call(request, timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as err:
                latencies.append(clock() - started)
                errors += 1
                first_error = first_error or f"{err.code().name}: {err.details()}"
                continue
            latencies.append(clock() - started)
            if sample_every and index % sample_every == 0:
                samples.append(reply)

    callers = min(concurrency, len(requests))
    await asyncio.gather(*(caller(calls[i % len(calls)]) for i in range(callers)))
    return ClientReport(len(requests), errors, first_error, 0.0, samples, latencies)
