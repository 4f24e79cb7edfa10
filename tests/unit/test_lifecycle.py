"""background.Component and background.Loop: one named task per component,
open and close safe to call twice, ``async with`` and an AsyncExitStack
closing components in reverse order of opening."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

from cachecoord import background


class Ticker(background.Component):
    """A component whose loop counts ticks, recording when it opens and closes."""

    def __init__(self, name: str, journal: list[str]) -> None:
        self.name = name
        self.journal = journal
        self.ticks = 0
        self._loop = background.Loop(self._run, name=f"ticker-{name}")

    async def open(self) -> None:
        if not self._loop.running:
            self.journal.append(f"open {self.name}")
        self._loop.start()

    async def close(self) -> None:
        if self._loop.running:
            self.journal.append(f"close {self.name}")
        await self._loop.stop()

    async def _run(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(0.001)


def tasks_named(name: str) -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == name and not t.done()]


async def test_opening_twice_starts_one_named_task_and_closing_twice_is_harmless() -> None:
    ticker = Ticker("a", [])
    await ticker.open()
    await ticker.open()
    assert len(tasks_named("ticker-a")) == 1
    await ticker.close()
    await ticker.close()
    assert tasks_named("ticker-a") == []


async def test_async_with_runs_the_loop_inside_the_block_only() -> None:
    async with Ticker("b", []) as ticker:
        await asyncio.sleep(0.01)
        assert ticker.ticks > 0
    stopped_at = ticker.ticks
    await asyncio.sleep(0.01)
    assert ticker.ticks == stopped_at


async def test_an_exit_stack_closes_components_in_reverse_order_of_opening() -> None:
    journal: list[str] = []
    async with AsyncExitStack() as stack:
        for name in ("pool", "outbox", "bus"):
            await stack.enter_async_context(Ticker(name, journal))
    assert journal == [
        "open pool",
        "open outbox",
        "open bus",
        "close bus",
        "close outbox",
        "close pool",
    ]
