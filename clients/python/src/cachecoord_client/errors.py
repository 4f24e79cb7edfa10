"""Exceptions raised by the cachecoord clients.

Every failed RPC is raised as a `CacheCoordError` (or one of its subclasses,
chosen by gRPC status code), chained to the original `grpc.RpcError`.
"""

# The names mirror the server's domain errors and gRPC status names; an "Error"
# suffix would only add noise (``except VersionConflict:``).

from __future__ import annotations

from typing import ClassVar

import grpc

__all__ = [
    "CacheCoordError",
    "DeadlineExceeded",
    "InvalidArgument",
    "LockLost",
    "LockNotAcquired",
    "NamespaceNotFound",
    "PermissionDenied",
    "QueueFull",
    "Unauthenticated",
    "Unavailable",
    "VersionConflict",
    "from_rpc_error",
]


class CacheCoordError(Exception):
    """A cachecoord RPC failed.

    Attributes:
        code: The gRPC status code of the failure.
        details: The server's (or gRPC's) description of the failure.
    """

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = "", *, code: grpc.StatusCode | None = None) -> None:
        """Create an error.

        Args:
            details: Description of the failure.
            code: gRPC status code; defaults to the class's ``default_code``.
        """
        super().__init__(details)
        self.code: grpc.StatusCode = self.default_code if code is None else code
        self.details: str = details

    def __str__(self) -> str:
        """Return ``"<CODE>: <details>"``."""
        return f"{self.code.name}: {self.details}" if self.details else self.code.name


class NamespaceNotFound(CacheCoordError):
    """The namespace is not configured on the server (NOT_FOUND)."""

    default_code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(CacheCoordError):
    """The request was rejected as malformed (INVALID_ARGUMENT)."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class VersionConflict(CacheCoordError):
    """``expected_version`` did not match the key's current version (FAILED_PRECONDITION)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class LockNotAcquired(CacheCoordError):
    """The lock is held by someone else, or the token no longer holds it (ABORTED)."""

    default_code = grpc.StatusCode.ABORTED


class LockLost(LockNotAcquired):
    """A lock held with ``hold_lock`` was lost while held (ABORTED).

    Its renewal failed (Redis lost it, or was unreachable for a whole TTL),
    so another client may have held it meanwhile: the work done under it was
    not exclusive. The fencing token is what protects the resource then.
    """


class QueueFull(CacheCoordError):
    """The server is overloaded and shed the request (RESOURCE_EXHAUSTED)."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(CacheCoordError):
    """The server or one of its backends cannot be reached (UNAVAILABLE)."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CacheCoordError):
    """The call's deadline passed before it completed (DEADLINE_EXCEEDED)."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(CacheCoordError):
    """The bearer token is missing or invalid (UNAUTHENTICATED)."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(CacheCoordError):
    """The caller may not perform this operation (PERMISSION_DENIED)."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


_BY_CODE: dict[grpc.StatusCode, type[CacheCoordError]] = {
    cls.default_code: cls
    for cls in (
        NamespaceNotFound,
        InvalidArgument,
        VersionConflict,
        LockNotAcquired,
        QueueFull,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
    )
}


def from_rpc_error(err: grpc.RpcError) -> CacheCoordError:
    """Translate a gRPC error into the matching `CacheCoordError` subclass.

    Codes without a dedicated subclass (INTERNAL, CANCELLED, ...) give a plain
    `CacheCoordError` carrying the code. The caller is expected to chain it:
    ``raise from_rpc_error(err) from err``.

    Args:
        err: The error raised by a gRPC call (blocking or ``grpc.aio``).

    Returns:
        The translated error; it is returned, not raised.
    """
    # A bare grpc.RpcError has no code(); the ones raised by calls also are grpc.Call.
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = details_fn() if callable(details_fn) else str(err)
    if not isinstance(details, str):
        details = ""
    return _BY_CODE.get(code, CacheCoordError)(details, code=code)
