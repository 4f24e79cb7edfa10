"""A client-side cache kept coherent by Watch: hot keys read from this process's memory.

Entries are dropped by the Watch stream's invalidations, all of them on a
RESET (events may have been missed), and each also after ``max_age`` whatever
happens. While the stream is down the cache serves nothing and stores
nothing: every read goes to the server. It keeps what it holds, though: the
new stream resumes from the last event's resume token, the server replays
the events missed meanwhile from its invalidation log, and once they are
applied (the RESUMED event) memory is served again. Only when the log no
longer reaches back (a RESET, ``too_old``) is everything dropped.

A Get that was in flight while its key was invalidated (or a RESET came)
returns its answer to its caller but is not stored: it may have read the
value from before the change, whose event already went by. This is the near
cache's rule on the server (cachecoord.invalidation.near_cache), per key.
An entry's ``max_age`` counts from when the Get that read it began.

The rule this gives: a read that starts after the event of a write arrived
never returns the value from before that write. Memory cannot hold it (the
event evicted it, and no Get begun before the event stores its answer), and
the server sent the event only once it could no longer answer the older
version itself (its near cache evicted, no older load shared).

Keep one client per server instance (a channel connects to one instance by
default): an event says that *its* instance has applied the change, and a
read sent to another instance could still see the old value there.
"""

# ``timeout`` of get/put/delete is the gRPC deadline passed to the client (the
# client's API), and open()'s bounds a wait that must not fail: ASYNC109 does not apply.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterable
from types import TracebackType
from typing import Self

from cachecoord_client import _convert
from cachecoord_client.client import AsyncClient
from cachecoord_client.errors import CacheCoordError, InvalidArgument, NamespaceNotFound
from cachecoord_client.local_memory import LocalMemory
from cachecoord_client.types import Deleted, Value, WatchEvent, WatchEventKind

__all__ = ["LocalCache"]

log = logging.getLogger(__name__)

# A watch that fails like this will fail again: stop, and let open() raise it.
_PERMANENT = (NamespaceNotFound, InvalidArgument)


class LocalCache:
    """An in-process LRU of values of some namespaces, in front of an `AsyncClient`.

    Example:
        >>> async with LocalCache(client, namespaces=["users"]) as users:  # doctest: +SKIP
        ...     profile = await users.get("users", "1")  # from memory when it can be

    Args:
        client: The client to read, write and watch through (not closed by the cache).
        namespaces: Namespaces to cache; reads of others pass through.
        max_entries: Most entries held; the least recently used goes first.
        max_age: Seconds an entry is served at most, events or not.
        silence: Seconds without any event (heartbeats included) after which
            the stream counts as dead; keep it above the server's
            ``watch_heartbeat`` (10 s by default).
        max_backoff: Longest wait, in seconds, between attempts to restart the stream.
    """

    def __init__(
        self,
        client: AsyncClient,
        namespaces: Iterable[str],
        *,
        max_entries: int = 10_000,
        max_age: float = 60.0,
        silence: float = 30.0,
        max_backoff: float = 5.0,
    ) -> None:
        if max_entries < 1 or max_age <= 0 or silence <= 0 or max_backoff <= 0:
            raise ValueError("max_entries, max_age, silence and max_backoff must be positive")
        self._client = client
        self._namespaces = frozenset(namespaces)
        if not self._namespaces or isinstance(namespaces, str | bytes):
            raise ValueError("namespaces must be a non-empty iterable of namespace names")
        self._silence, self._max_backoff = silence, max_backoff
        self._memory = LocalMemory(max_entries, max_age)  # the rules of what it keeps
        self._live = asyncio.Event()
        self._token = ""  # the last event's resume token: where a new stream resumes
        self._task: asyncio.Task[None] | None = None

    @property
    def watching(self) -> bool:
        """Whether the Watch stream is up, so that reads can be served from memory."""
        return self._live.is_set()

    def __len__(self) -> int:
        """The number of entries held."""
        return len(self._memory)

    async def open(self, timeout: float | None = None) -> None:
        """Start watching, and wait up to *timeout* seconds (None: the client's
        ``default_timeout``) for the stream to start. If it has not started
        by then, reads pass through to the server until it does.

        Raises:
            NamespaceNotFound: A namespace is not configured on the server.
            InvalidArgument: The server refused the Watch request.
        """
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="cachecoord-local-cache-watch")
        live = asyncio.ensure_future(self._live.wait())
        wait = self._client.default_timeout if timeout is None else timeout
        await asyncio.wait({live, self._task}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        live.cancel()
        if self._task.done():
            task, self._task = self._task, None
            task.result()  # raises the permanent error that ended it

    async def close(self) -> None:
        """Stop watching and forget everything; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, *_PERMANENT):
                await task
        self._blind()

    async def __aenter__(self) -> Self:
        """Open the cache (see `open`)."""
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the cache."""
        await self.close()

    async def get(
        self, namespace: str, key: str, *, min_version: int = 0, timeout: float | None = None
    ) -> Value:
        """Read a key: from memory if held and fresh (and at least *min_version*,
        see `AsyncClient.get`), else from the server (then held)."""
        k = (namespace, key)
        held = self._memory.get(k) if self._live.is_set() else None
        if held is not None and held.version >= min_version:
            return held
        reading, value = self._memory.begin(k), None
        try:
            value = await self._client.get(namespace, key, min_version=min_version, timeout=timeout)
        finally:
            keep = self._live.is_set() and namespace in self._namespaces
            self._memory.finish(k, reading, value if keep else None)
        return value

    async def put(
        self,
        namespace: str,
        key: str,
        value: bytes,
        *,
        expected_version: int | None = None,
        ttl_ms: int | None = None,
        tags: Iterable[str] = (),
        timeout: float | None = None,
    ) -> int:
        """Write through the client (see `AsyncClient.put`); the key is dropped here at once."""
        try:
            return await self._client.put(
                namespace,
                key,
                value,
                expected_version=expected_version,
                ttl_ms=ttl_ms,
                tags=tags,
                timeout=timeout,
            )
        finally:
            self._memory.invalidate((namespace, key), 0)  # failed writes may have happened too

    async def invalidate_tags(
        self, namespace: str, tags: Iterable[str], *, timeout: float | None = None
    ) -> None:
        """Invalidate tags through the client (see `AsyncClient.invalidate_tags`);
        the values carrying them are dropped here at once."""
        tags = _convert.tag_list(tags)
        try:
            await self._client.invalidate_tags(namespace, tags, timeout=timeout)
        finally:
            for tag in tags:
                self._memory.drop_tag(namespace, tag)

    async def delete(
        self,
        namespace: str,
        key: str,
        *,
        expected_version: int | None = None,
        timeout: float | None = None,
    ) -> Deleted:
        """Delete through the client (see `AsyncClient.delete`); the key is dropped here at once."""
        try:
            return await self._client.delete(
                namespace, key, expected_version=expected_version, timeout=timeout
            )
        finally:
            self._memory.invalidate((namespace, key), 0)

    def _apply(self, event: WatchEvent) -> None:
        self._token = event.resume_token or self._token
        if event.kind is WatchEventKind.RESET:
            self._blind()  # the stream restarts: events may have been missed
            self._live.set()
        elif event.kind is WatchEventKind.RESUMED:
            self._live.set()  # every event missed while the stream was down is applied
        elif event.kind is WatchEventKind.INVALIDATION and event.tag:
            # Before all_keys, which a tag's event also sets for older clients.
            self._memory.drop_tag(event.namespace, event.tag)
        elif event.kind is WatchEventKind.INVALIDATION and event.all_keys:
            self._memory.drop_namespace(event.namespace)
        elif event.kind is WatchEventKind.INVALIDATION:
            self._memory.invalidate((event.namespace, event.key), event.version)

    def _blind(self) -> None:
        """Forget everything and serve nothing from memory: events may be missed."""
        self._live.clear()
        self._token = ""
        self._memory.forget_all()

    def _pause(self) -> None:
        """Serve nothing from memory until the events missed meanwhile are
        replayed (RESUMED); keep what is held. Without a resume token: `_blind`."""
        if not self._token:
            self._blind()
        self._live.clear()

    async def _watch(self) -> None:
        """Keep a Watch stream open, restarting it with backoff; stopped by cancellation."""
        backoff = 0.05
        while True:
            try:
                async with self._client.watch(
                    sorted(self._namespaces), resume_token=self._token
                ) as events:
                    while True:
                        async with asyncio.timeout(self._silence):
                            event = await anext(events)
                        self._apply(event)
                        backoff = 0.05
            except _PERMANENT:
                self._blind()
                raise
            except (CacheCoordError, StopAsyncIteration, TimeoutError) as err:
                log.warning("cachecoord watch stream lost (%r); reads bypass the local cache", err)
            except Exception:  # e.g. the client was closed first: keep trying, never die
                log.exception("cachecoord watch stream failed; reads bypass the local cache")
            self._pause()
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self._max_backoff)
