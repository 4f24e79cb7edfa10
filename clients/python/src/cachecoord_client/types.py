"""Plain value types returned by the cachecoord clients.

They carry no gRPC or protobuf types, so code using the clients does not
need to import the generated stubs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum

from cachecoord_client.errors import LockLost

__all__ = [
    "Deleted",
    "Entry",
    "HeldLock",
    "Layer",
    "Lock",
    "Value",
    "WatchEvent",
    "WatchEventKind",
]


class Layer(StrEnum):
    """The layer a value was served from."""

    UNSPECIFIED = "unspecified"
    """Not set: the key was not found (or the server sent a layer this client does not know)."""
    NEAR = "near"
    """The server instance's in-process near cache."""
    REDIS = "redis"
    """Redis."""
    DATABASE = "database"
    """PostgreSQL, the source of truth (a cache miss)."""


@dataclass(frozen=True, slots=True)
class Value:
    """The answer of ``get`` for one key.

    Attributes:
        found: True when the key exists; when False the other fields hold their
            zero values.
        value: The value: opaque bytes for managed namespaces, a UTF-8 JSON
            object for mapped namespaces.
        version: Version of the value; versions of one key strictly increase.
        layer: Where the value was served from.
        stale: True when the value was served past its freshness time (while
            being revalidated, or because PostgreSQL is unreachable).
        ttl_ms: Milliseconds until the cached copy expires; 0 when served from
            PostgreSQL without caching.
        reloaded: True when a cached copy older than the read's ``min_version``
            was skipped and the key read again.
        tags: The value's tags (given by its Put, or derived from a mapped
            row's columns), for ``invalidate_tags``.
    """

    found: bool
    value: bytes
    version: int
    layer: Layer
    stale: bool
    ttl_ms: int
    reloaded: bool = False
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Entry:
    """The answer of ``batch_get`` for one key.

    Attributes:
        key: The key this entry answers.
        found: True when the key exists; when False the other fields hold their
            zero values.
        value: The value, as in `Value.value`.
        version: Version of the value.
        layer: Where the value was served from.
        stale: True when the value was served stale (see `Value.stale`).
        ttl_ms: Milliseconds until the cached copy expires (see `Value.ttl_ms`).
        reloaded: True when a cached copy older than the key's min_version was
            skipped (see `Value.reloaded`).
        tags: The value's tags (see `Value.tags`).
    """

    key: str
    found: bool
    value: bytes
    version: int
    layer: Layer
    stale: bool
    ttl_ms: int
    reloaded: bool = False
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Deleted:
    """The answer of ``delete``.

    Attributes:
        deleted: True when a row existed and was deleted.
        version: The version recorded for the deletion; a later put gets a
            higher one.
    """

    deleted: bool
    version: int


@dataclass(frozen=True, slots=True)
class Lock:
    """A held distributed lock, as returned by ``acquire_lock``.

    Attributes:
        name: The lock name.
        token: Opaque proof of ownership; pass it to ``release_lock`` and
            ``extend_lock``.
        fencing_token: Strictly increasing number per lock name; pass it to the
            protected resource so that it can reject stale holders.
    """

    name: str
    token: str
    fencing_token: int


class _Loss:
    """Whether, and why, a held lock was lost; shared by a `HeldLock` and its stream."""

    __slots__ = ("error", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: LockLost | None = None


@dataclass(frozen=True, slots=True)
class HeldLock(Lock):
    """A lock held by ``hold_lock`` for the duration of its block.

    Besides the `Lock` fields it tells, at once, when the lock was lost while
    the block runs (the server found another holder or no lock, could not
    renew it within its TTL, or the stream broke): `lost` turns True,
    `check` raises, `wait_lost` returns. The asyncio client also cancels the
    block's task then, and ``hold_lock`` raises `LockLost` in its place.
    """

    _loss: _Loss = field(default_factory=_Loss, repr=False, compare=False)

    @property
    def lost(self) -> bool:
        """True once the lock was lost; the work done since may not be exclusive."""
        return self._loss.event.is_set()

    def check(self) -> None:
        """Raise `LockLost` if the lock was lost; call it before each step of the work."""
        if self._loss.error is not None:
            raise self._loss.error

    def wait_lost(self, timeout: float | None = None) -> bool:
        """Block until the lock is lost (True) or *timeout* seconds pass (False).

        Blocking: from the asyncio client, call it in a thread.
        """
        return self._loss.event.wait(timeout)

    def _mark_lost(self, error: LockLost) -> bool:
        """Record the loss; False if it was recorded already."""
        if self._loss.event.is_set():
            return False
        self._loss.error = error
        self._loss.event.set()
        return True


class WatchEventKind(StrEnum):
    """What a `WatchEvent` says."""

    INVALIDATION = "invalidation"
    """A key (or, with ``all_keys``, a whole namespace) changed or was invalidated."""
    RESET = "reset"
    """Events may have been missed: drop everything cached from the watched namespaces."""
    HEARTBEAT = "heartbeat"
    """Nothing happened for a while; the stream is alive."""
    RESUMED = "resumed"
    """The stream continued from a resume token: every event since that token
    came before this one (``replayed`` of them); the stream is live again."""
    INTERRUPTED = "interrupted"
    """``watch(resume=True, replay=True)`` only: the stream broke and is being
    opened again from the last resume token. Events are late until RESUMED (or
    a RESET, if the server's log no longer reaches back): don't serve from
    what you cached until then, but keep it."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One event of a ``watch`` stream.

    Only an INVALIDATION fills ``namespace`` to ``tag``; a RESET carries
    ``reason``, a RESUMED ``replayed``. Every event from the server carries
    ``resume_token``. Unused fields hold their zero values.

    Attributes:
        kind: What the event says.
        namespace: Namespace of the changed key.
        key: The changed key; empty when ``all_keys`` is True or ``tag`` is set.
        all_keys: True when every key of the namespace was invalidated, and
            for a tag invalidation (so that a client that does not know tags
            drops the whole namespace).
        version: The version the change created; 0 when unknown (a plain
            invalidate), so a cached copy of any version is invalid.
        reason: INVALIDATION: ``put``, ``delete``, ``invalidate``,
            ``db_change`` or ``rejected`` (PostgreSQL refused an acknowledged
            write-behind write; the key moved to a higher version holding
            PostgreSQL's row). RESET: ``subscribed`` (the first event of every
            stream), ``resubscribed`` (the server lost its own subscription),
            ``overflow`` (this client read too slowly), ``too_old`` (the
            resume token is older than the server's invalidation log reaches
            back) or, with ``watch(resume=True)``, ``reconnecting`` (the
            stream broke and is being opened again).
        origin: The cachecoord instance that made the change.
        tag: Set when every value carrying this tag was invalidated
            (``invalidate_tags``, reason ``tags``); ``key`` is then empty and
            ``all_keys`` True: a client that keeps the values' tags
            (`Value.tags`) may drop only those carrying it.
        replayed: RESUMED: how many events were replayed from the log.
        resume_token: The stream's position after this event: pass it to
            ``watch(resume_token=...)`` to continue from here. Opaque.
    """

    kind: WatchEventKind
    namespace: str = ""
    key: str = ""
    all_keys: bool = False
    version: int = 0
    reason: str = ""
    origin: str = ""
    tag: str = ""
    replayed: int = 0
    resume_token: str = ""
