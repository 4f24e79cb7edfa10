"""A resuming Watch (``watch(..., resume=True)``) stops for good once it is cancelled.

The calls are stand-ins that always fail with UNAVAILABLE, as a Watch does
while its server is down; what is checked is the stream's own bookkeeping.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from cachecoord_client import WatchEventKind
from cachecoord_client.client import _ResumingWatchStream


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the server is down"


class _BrokenCall:
    """A Watch call whose server is unreachable."""

    def __init__(self) -> None:
        self.cancelled = False

    async def read(self) -> Any:
        raise _Unavailable()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def test_a_resuming_watch_cancelled_while_it_waits_to_reconnect_stops() -> None:
    opened: list[_BrokenCall] = []

    def open_call(token: str) -> Any:
        opened.append(_BrokenCall())
        return opened[-1]

    stream = _ResumingWatchStream(open_call, replay=False, token="")
    first = await anext(stream)  # the break is told at once, and a new call opened
    assert first.kind is WatchEventKind.RESET
    assert len(opened) == 2
    waiting = asyncio.ensure_future(anext(stream))  # broken again: waits, then reopens
    await asyncio.sleep(0.005)  # within the first retry delay (20 ms)
    stream.cancel()
    with pytest.raises(StopAsyncIteration):
        await waiting
    assert len(opened) == 2  # no call was opened after the cancellation
    assert all(call.cancelled for call in opened)
