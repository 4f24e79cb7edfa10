"""LocalCache's bookkeeping, against a scripted client (no server needed).

The integration tests (tests/integration/test_local_cache.py) run it against
real servers; these pin down races that real servers cannot be made to play
on cue: which answer wins when two Gets of one key overlap, and how each kind
of event changes what is held.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any, Self, cast

import pytest

from cachecoord_client import AsyncClient, Layer, LocalCache, Value, WatchEvent, WatchEventKind

RESET = WatchEvent(WatchEventKind.RESET, reason="subscribed")


def value(version: int, payload: bytes = b"v", *, stale: bool = False) -> Value:
    return Value(True, payload, version, Layer.REDIS, stale, 60_000)


def invalidation(key: str, version: int = 0, namespace: str = "ns") -> WatchEvent:
    return WatchEvent(WatchEventKind.INVALIDATION, namespace, key, False, version, "put", "x")


class Stream:
    """A Watch stream whose events the test sends."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[WatchEvent] = asyncio.Queue()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        return self

    async def __anext__(self) -> WatchEvent:
        return await self.events.get()


class ScriptedClient:
    """Answers each Get with the next value scripted for its key, once the
    test releases it (``answers[key]`` holds futures, oldest first)."""

    default_timeout = 1.0

    def __init__(self) -> None:
        self.stream = Stream()
        self.answers: dict[str, list[asyncio.Future[Value]]] = {}
        self.gets = 0
        self.tokens: list[str] = []  # the resume_token of each watch

    def answer(self, key: str) -> asyncio.Future[Value]:
        future: asyncio.Future[Value] = asyncio.get_running_loop().create_future()
        self.answers.setdefault(key, []).append(future)
        return future

    def watch(self, namespaces: Iterable[str], *, resume_token: str = "") -> Stream:
        self.tokens.append(resume_token)
        return self.stream

    async def get(self, namespace: str, key: str, **options: Any) -> Value:
        self.gets += 1
        return await self.answers[key].pop(0)


async def opened(client: ScriptedClient, **options: Any) -> LocalCache:
    cache = LocalCache(cast(AsyncClient, client), ["ns", "other"], **options)
    client.stream.events.put_nowait(RESET)
    await cache.open(timeout=1)
    assert cache.watching
    return cache


async def settle() -> None:
    """Let the cache's watch task take the events sent so far."""
    for _ in range(5):
        await asyncio.sleep(0)


async def held(cache: LocalCache, client: ScriptedClient, key: str) -> Value | None:
    """What *cache* serves for *key* from memory, or None (it asked the client)."""
    before = client.gets
    future = client.answer(key)
    future.set_result(value(-1))
    got = await cache.get("ns", key)
    if client.gets > before:
        return None
    client.answers[key].remove(future)
    return got


@pytest.mark.asyncio
async def test_a_get_overtaken_by_a_newer_one_does_not_put_back_its_older_value() -> None:
    client = ScriptedClient()
    cache = await opened(client)
    slow_answer, fast_answer = client.answer("k"), client.answer("k")
    slow = asyncio.create_task(cache.get("ns", "k"))
    fast = asyncio.create_task(cache.get("ns", "k"))
    await settle()

    fast_answer.set_result(value(2, b"new"))
    assert (await fast).version == 2
    slow_answer.set_result(value(1, b"old"))
    assert (await slow).version == 1  # its caller gets what it asked for...

    assert await held(cache, client, "k") is None  # ...but memory does not go back to it
    await cache.close()


@pytest.mark.asyncio
async def test_an_event_for_a_version_already_held_keeps_the_entry() -> None:
    client = ScriptedClient()
    cache = await opened(client)
    client.answer("k").set_result(value(5))
    await cache.get("ns", "k")

    client.stream.events.put_nowait(invalidation("k", version=5))  # e.g. our own Put's echo
    await settle()
    assert await held(cache, client, "k") == value(5)

    client.stream.events.put_nowait(invalidation("k", version=0))  # a plain Invalidate
    await settle()
    assert await held(cache, client, "k") is None
    await cache.close()


@pytest.mark.asyncio
async def test_an_all_keys_invalidation_drops_only_its_namespace() -> None:
    client = ScriptedClient()
    cache = await opened(client)
    for key in ("a", "b"):
        client.answer(key).set_result(value(1))
        await cache.get("ns", key)
    client.answer("c").set_result(value(1))
    await cache.get("other", "c")

    client.stream.events.put_nowait(
        WatchEvent(WatchEventKind.INVALIDATION, "ns", "", True, 0, "invalidate", "x")
    )
    await settle()

    assert len(cache) == 1
    assert await held(cache, client, "a") is None
    await cache.close()


@pytest.mark.asyncio
async def test_a_stale_answer_is_not_kept() -> None:
    client = ScriptedClient()
    cache = await opened(client)
    client.answer("k").set_result(value(1, stale=True))
    await cache.get("ns", "k")
    assert len(cache) == 0
    await cache.close()


@pytest.mark.asyncio
async def test_a_silent_stream_counts_as_lost() -> None:
    client = ScriptedClient()
    cache = await opened(client, silence=0.1, max_backoff=0.1)
    client.answer("k").set_result(value(1))
    await cache.get("ns", "k")

    await asyncio.wait_for(_until(lambda: not cache.watching), 2)
    assert len(cache) == 0
    client.stream.events.put_nowait(RESET)  # the restarted stream
    await asyncio.wait_for(_until(lambda: cache.watching), 2)
    await cache.close()
    await cache.close()  # twice is fine
    assert not cache.watching


async def test_a_lost_stream_keeps_memory_unserved_until_the_resumed_stream_caught_up() -> None:
    client = ScriptedClient()
    cache = LocalCache(cast(AsyncClient, client), ["ns"], silence=0.1, max_backoff=0.01)
    client.stream.events.put_nowait(
        WatchEvent(WatchEventKind.RESET, reason="subscribed", resume_token="t1")
    )
    await cache.open(timeout=1)
    client.answer("k").set_result(value(1))
    client.answer("gone").set_result(value(1))
    await cache.get("ns", "k")
    await cache.get("ns", "gone")

    await asyncio.wait_for(_until(lambda: not cache.watching), 2)  # silent: lost
    assert len(cache) == 2, "kept"
    assert await held(cache, client, "k") is None, "but not served"
    await asyncio.wait_for(_until(lambda: len(client.tokens) >= 2), 2)
    assert client.tokens[-1] == "t1", "the new stream resumes from the last token"
    # The new stream replays what was missed, then says it caught up.
    client.stream.events.put_nowait(invalidation("gone", 2))
    client.stream.events.put_nowait(
        WatchEvent(WatchEventKind.RESUMED, replayed=1, resume_token="t3")
    )
    await asyncio.wait_for(_until(lambda: cache.watching), 2)

    assert await held(cache, client, "k") == value(1), "served from the kept memory"
    assert await held(cache, client, "gone") is None, "evicted by the replayed event"
    await cache.close()


async def test_a_reset_after_a_resume_drops_the_kept_memory() -> None:
    client = ScriptedClient()
    cache = LocalCache(cast(AsyncClient, client), ["ns"], silence=0.1, max_backoff=0.01)
    client.stream.events.put_nowait(
        WatchEvent(WatchEventKind.RESET, reason="subscribed", resume_token="t1")
    )
    await cache.open(timeout=1)
    client.answer("k").set_result(value(1))
    await cache.get("ns", "k")
    await asyncio.wait_for(_until(lambda: not cache.watching), 2)
    assert len(cache) == 1

    client.stream.events.put_nowait(
        WatchEvent(WatchEventKind.RESET, reason="too_old", resume_token="t9")
    )
    await asyncio.wait_for(_until(lambda: cache.watching), 2)

    assert len(cache) == 0
    await cache.close()


@pytest.mark.parametrize(
    "options",
    [{"max_entries": 0}, {"max_age": 0}, {"silence": -1}, {"max_backoff": 0}],
    ids=lambda o: next(iter(o)),
)
def test_options_must_be_positive(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="positive"):
        LocalCache(cast(AsyncClient, ScriptedClient()), ["ns"], **options)


@pytest.mark.parametrize("namespaces", ["ns", []])
def test_namespaces_must_be_a_non_empty_list(namespaces: Any) -> None:
    with pytest.raises(ValueError, match="namespaces"):
        LocalCache(cast(AsyncClient, ScriptedClient()), namespaces)


async def _until(condition: Callable[[], bool]) -> None:
    while True:
        if condition():
            return
        await asyncio.sleep(0.01)
