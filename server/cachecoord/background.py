"""Stopping a background loop for good."""

from __future__ import annotations

import asyncio
from typing import Any

_RECANCEL = 1.0


async def stop(task: asyncio.Task[Any]) -> None:
    """Cancel *task* and wait until it has ended, cancelling it again every
    second while it runs. One cancellation is not always enough on Python
    3.11: ``asyncio.wait_for`` (which redis-py puts around socket writes)
    swallows a cancellation that arrives as the awaited write completes
    (CPython gh-86296, fixed in 3.12), and the loop then goes on, so a close
    that waited for it would wait forever."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_RECANCEL)
    await asyncio.gather(task, return_exceptions=True)
