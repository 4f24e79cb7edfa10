"""Background work: one protocol for the components that own it, and stopping
a background loop for good.

Every component that runs in the background (the pub/sub bus, the change
listener, the outbox drainer) is a :class:`Component`: ``open()`` starts its
work, ``close()`` stops it and lets go of its connections, both safe to call
twice, and ``async with`` does both. The owner (app.py) enters them in one
``contextlib.AsyncExitStack``, in dependency order, so they close in reverse.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self

_RECANCEL = 1.0


class Component(abc.ABC):
    """Something with background work: ``open()``, ``close()``, or ``async with``."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Start the background work (again a no-op while it runs)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop it and release what it holds (again a no-op once closed)."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class Loop:
    """One named background task running *run*: ``start()`` creates it (once),
    ``stop()`` cancels it and waits until it has ended."""

    def __init__(self, run: Callable[[], Coroutine[Any, Any, None]], *, name: str) -> None:
        self._run = run
        self._name = name
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        """Create the task, in the current context (so a ``quiet()`` around
        this call covers the whole loop); a no-op while it runs."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        """Stop the task (see :func:`stop`); a no-op when it is not running."""
        task, self._task = self._task, None
        if task is not None:
            await stop(task)


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
