"""A background loop is stopped even when it swallows a cancellation (as
``asyncio.wait_for`` can on Python 3.11)."""

from __future__ import annotations

import asyncio

import pytest

from cachecoord import background


async def test_a_loop_that_swallowed_a_cancellation_is_stopped_anyway(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(background, "_RECANCEL", 0.05)
    swallowed = 0

    async def loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # goes on, as after a lost cancellation

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.03)
    await asyncio.wait_for(background.stop(task), 5)
    assert task.cancelled()
    assert swallowed == 1


async def test_a_loop_that_ended_with_an_error_is_stopped_quietly() -> None:
    async def failing() -> None:
        raise RuntimeError("lost its connection")

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    await background.stop(task)
    assert isinstance(task.exception(), RuntimeError)
