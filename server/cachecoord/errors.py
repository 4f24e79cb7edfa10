"""Domain errors. The RPC layer maps each to one gRPC status (rpc/status.py);
the domain never imports grpc."""

from __future__ import annotations


class CacheCoordError(Exception):
    """Base of every error a client should see; the message says what to fix."""


class InvalidArgument(CacheCoordError):
    """The request is malformed (empty key, bad JSON, unknown column...)."""


class NamespaceNotFound(CacheCoordError):
    """No namespace of that name is configured."""

    def __init__(self, name: str, known: list[str]) -> None:
        shown = name if len(name) <= 200 else name[:200] + "..."
        super().__init__(
            f"namespace {shown!r} is not configured; configured namespaces: "
            + (", ".join(sorted(known)) or "(none)")
        )


class VersionConflict(CacheCoordError):
    """A compare-and-set found another version than the expected one."""

    def __init__(self, key: str, expected: int, current: int) -> None:
        super().__init__(
            f"key {key!r} is at version {current}, not the expected {expected}; "
            "read it again and retry"
        )
        self.current = current


class ConstraintViolation(CacheCoordError):
    """PostgreSQL refused the row (NOT NULL, CHECK, foreign key...)."""


class LockNotAcquired(CacheCoordError):
    """The lock is held by someone else (after waiting, if asked to)."""


class LockNotHeld(CacheCoordError):
    """Release or extend with a token that does not hold the lock."""


class QueueFullError(CacheCoordError):
    """The write-behind queue is at its bound."""


class Unavailable(CacheCoordError):
    """A backend is down and there is nothing to serve instead."""


class DeadlineExceeded(CacheCoordError):
    """The request's deadline passed while waiting on a backend."""


class Unauthenticated(CacheCoordError):
    """The call carried no bearer token, or one the server does not know."""


class PermissionDenied(CacheCoordError):
    """The caller's token does not grant that action on that namespace or lock."""
