"""Python client for cachecoord, the gRPC cache-coordination service.

`AsyncClient` (``grpc.aio``) and `Client` (blocking) expose the same methods,
named after the RPCs of ``cachecoord.v1.CacheCoordService``. They return the
plain types of `cachecoord_client.types` and raise the errors of
`cachecoord_client.errors`. `LocalCache` keeps hot keys in this process's
memory, coherent through a Watch stream.
"""

from cachecoord_client.client import AsyncClient
from cachecoord_client.errors import (
    CacheCoordError,
    DeadlineExceeded,
    InvalidArgument,
    LockLost,
    LockNotAcquired,
    NamespaceNotFound,
    PermissionDenied,
    QueueFull,
    Unauthenticated,
    Unavailable,
    VersionConflict,
    from_rpc_error,
)
from cachecoord_client.local_cache import LocalCache
from cachecoord_client.sync import Client
from cachecoord_client.types import (
    Deleted,
    Entry,
    Layer,
    Lock,
    Value,
    WatchEvent,
    WatchEventKind,
)
from cachecoord_client.watch import AsyncWatchStream, WatchStream

__all__ = [
    "AsyncClient",
    "AsyncWatchStream",
    "CacheCoordError",
    "Client",
    "DeadlineExceeded",
    "Deleted",
    "Entry",
    "InvalidArgument",
    "Layer",
    "LocalCache",
    "Lock",
    "LockLost",
    "LockNotAcquired",
    "NamespaceNotFound",
    "PermissionDenied",
    "QueueFull",
    "Unauthenticated",
    "Unavailable",
    "Value",
    "VersionConflict",
    "WatchEvent",
    "WatchEventKind",
    "WatchStream",
    "from_rpc_error",
]
