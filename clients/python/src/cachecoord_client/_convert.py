"""Request building, response conversion and call options shared by both clients.

`cachecoord_client.client.AsyncClient` and `cachecoord_client.sync.Client`
differ only in how they invoke an RPC; everything else lives here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from cachecoord_client.errors import CacheCoordError, LockLost, from_rpc_error
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb
from cachecoord_client.types import (
    Deleted,
    Entry,
    Layer,
    Lock,
    Value,
    WatchEvent,
    WatchEventKind,
)

Metadata = tuple[tuple[str, str], ...]

_LAYERS: dict[int, Layer] = {
    pb.LAYER_UNSPECIFIED: Layer.UNSPECIFIED,
    pb.LAYER_NEAR: Layer.NEAR,
    pb.LAYER_REDIS: Layer.REDIS,
    pb.LAYER_DATABASE: Layer.DATABASE,
}

# Call options.


@dataclass(frozen=True, slots=True)
class Settings:
    """Validated per-client call settings."""

    default_timeout: float
    metadata: Metadata | None


# Calls that are safe to repeat are retried on UNAVAILABLE (a server
# restarting, a connection reset) with exponential backoff, by gRPC itself.
# Put and Delete are not: a retried write could apply twice (use
# expected_version to make one idempotent and retry it yourself).
_RETRIED = ("Get", "BatchGet", "Invalidate", "ExtendLock", "ReleaseLock")
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "cachecoord.v1.CacheCoordService", "method": method}
                    for method in _RETRIED
                ],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


# Resuming a stream (a held lock after a hand-off, a Watch after a break).

RESUME_RETRY_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
"""A resume that fails with these is tried again while the lock's TTL allows."""

RESUME_RETRY_FIRST = 0.02
"""Seconds before the first retry of a resume; each retry doubles it."""

RESUME_RETRY_MAX = 0.5
"""The longest wait between two retries of a held lock's resume."""


def channel_options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The caller's channel options, plus the retry policy unless given."""
    given = list(options)
    if not any(name == "grpc.service_config" for name, _ in given):
        given.append(("grpc.service_config", SERVICE_CONFIG))
    return given


def settings(default_timeout: float, token: str | None) -> Settings:
    """Validate a client's ``default_timeout`` (seconds) and bearer ``token``."""
    if not (default_timeout > 0 and math.isfinite(default_timeout)):
        raise ValueError(
            f"default_timeout must be a positive number of seconds: {default_timeout!r}"
        )
    return Settings(float(default_timeout), auth_metadata(token))


def auth_metadata(token: str | None) -> Metadata | None:
    """Return the call metadata carrying ``token`` as a bearer token, if any."""
    if token is None:
        return None
    if not (token and token.isascii() and token.isprintable() and token == token.strip()):
        raise ValueError("token must be non-empty printable ASCII without surrounding spaces")
    return (("authorization", f"Bearer {token}"),)


def deadline(timeout: float | None, default_timeout: float) -> float:
    """Return the deadline (seconds from now) of a call."""
    return default_timeout if timeout is None else timeout


def lock_deadline(timeout: float | None, default_timeout: float, wait_timeout_ms: int) -> float:
    """Return the deadline of an AcquireLock call: by default the wait plus ``default_timeout``."""
    return default_timeout + max(wait_timeout_ms, 0) / 1000 if timeout is None else timeout


# Requests.


def _keys(keys: Iterable[str], what: str = "keys") -> list[str]:
    # A str is an Iterable[str] too: "abc" would silently become ["a", "b", "c"].
    if isinstance(keys, str | bytes):
        raise TypeError(f"{what} must be an iterable of str, not a single {type(keys).__name__}")
    return list(keys)


def get_request(namespace: str, key: str, min_version: int = 0) -> pb.GetRequest:
    """Build a GetRequest."""
    return pb.GetRequest(namespace=namespace, key=key, min_version=min_version)


def batch_get_request(
    namespace: str, keys: Iterable[str], min_versions: Mapping[str, int] | None = None
) -> pb.BatchGetRequest:
    """Build a BatchGetRequest."""
    return pb.BatchGetRequest(
        namespace=namespace, keys=_keys(keys), min_versions=dict(min_versions or {})
    )


def put_request(
    namespace: str,
    key: str,
    value: bytes,
    expected_version: int | None,
    ttl_ms: int | None,
    tags: Iterable[str] = (),
) -> pb.PutRequest:
    """Build a PutRequest; None leaves an optional field unset (0 is sent as 0)."""
    request = pb.PutRequest(namespace=namespace, key=key, value=value, tags=tag_list(tags))
    if expected_version is not None:
        request.expected_version = expected_version
    if ttl_ms is not None:
        request.ttl_ms = ttl_ms
    return request


def delete_request(namespace: str, key: str, expected_version: int | None) -> pb.DeleteRequest:
    """Build a DeleteRequest; None leaves ``expected_version`` unset."""
    request = pb.DeleteRequest(namespace=namespace, key=key)
    if expected_version is not None:
        request.expected_version = expected_version
    return request


def invalidate_request(namespace: str, keys: Iterable[str], all: bool) -> pb.InvalidateRequest:
    """Build an InvalidateRequest."""
    return pb.InvalidateRequest(namespace=namespace, keys=_keys(keys), all=all)


def invalidate_tags_request(namespace: str, tags: Iterable[str]) -> pb.InvalidateTagsRequest:
    """Build an InvalidateTagsRequest."""
    return pb.InvalidateTagsRequest(namespace=namespace, tags=tag_list(tags))


def tag_list(tags: Iterable[str]) -> list[str]:
    """*tags* as a list; TypeError for a single str or bytes."""
    if isinstance(tags, str | bytes):
        raise TypeError("tags must be an iterable of str, not a single str or bytes")
    return list(tags)


def acquire_lock_request(name: str, ttl_ms: int, wait_timeout_ms: int) -> pb.AcquireLockRequest:
    """Build an AcquireLockRequest."""
    return pb.AcquireLockRequest(name=name, ttl_ms=ttl_ms, wait_timeout_ms=wait_timeout_ms)


def release_lock_request(name: str, token: str) -> pb.ReleaseLockRequest:
    """Build a ReleaseLockRequest."""
    return pb.ReleaseLockRequest(name=name, token=token)


def extend_lock_request(name: str, token: str, ttl_ms: int) -> pb.ExtendLockRequest:
    """Build an ExtendLockRequest."""
    return pb.ExtendLockRequest(name=name, token=token, ttl_ms=ttl_ms)


def hold_lock_acquire(name: str, ttl_ms: int, wait_timeout_ms: int) -> pb.HoldLockRequest:
    """Build the first message of a HoldLock stream."""
    acquire = pb.HoldLockRequest.Acquire(name=name, ttl_ms=ttl_ms, wait_timeout_ms=wait_timeout_ms)
    return pb.HoldLockRequest(acquire=acquire)


def watch_request(
    namespaces: Iterable[str], key_prefix: str, resume_token: str = ""
) -> pb.WatchRequest:
    """Build a WatchRequest."""
    return pb.WatchRequest(
        namespaces=_keys(namespaces, "namespaces"),
        key_prefix=key_prefix,
        resume_token=resume_token,
    )


# Responses.


def to_layer(value: int) -> Layer:
    """Convert a proto Layer; a value unknown to this client maps to UNSPECIFIED."""
    return _LAYERS.get(value, Layer.UNSPECIFIED)


def to_value(response: pb.GetResponse) -> Value:
    """Convert a GetResponse."""
    return Value(
        found=response.found,
        value=response.value,
        version=response.version,
        layer=to_layer(response.layer),
        stale=response.stale,
        ttl_ms=response.ttl_ms,
        reloaded=response.reloaded,
        tags=tuple(response.tags),
    )


def to_entry(message: pb.Entry) -> Entry:
    """Convert one BatchGet entry."""
    return Entry(
        key=message.key,
        found=message.found,
        value=message.value,
        version=message.version,
        layer=to_layer(message.layer),
        stale=message.stale,
        ttl_ms=message.ttl_ms,
        reloaded=message.reloaded,
        tags=tuple(message.tags),
    )


def to_entries(response: pb.BatchGetResponse) -> list[Entry]:
    """Convert a BatchGetResponse, keeping the server's order."""
    return [to_entry(e) for e in response.entries]


def to_version(response: pb.PutResponse) -> int:
    """Convert a PutResponse to the version it created."""
    return response.version


def to_deleted(response: pb.DeleteResponse) -> Deleted:
    """Convert a DeleteResponse."""
    return Deleted(deleted=response.deleted, version=response.version)


def to_invalidated(response: pb.InvalidateResponse) -> int:
    """Convert an InvalidateResponse to the number of entries dropped."""
    return response.invalidated


def to_lock(name: str, response: pb.AcquireLockResponse) -> Lock:
    """Convert an AcquireLockResponse for lock ``name``."""
    return Lock(name=name, token=response.token, fencing_token=response.fencing_token)


def to_held_lock(name: str, response: pb.HoldLockResponse) -> Lock:
    """Convert the first event of a HoldLock stream, which must be ``acquired``."""
    if response.WhichOneof("kind") != "acquired":
        raise CacheCoordError(
            f"HoldLock for {name!r}: the server sent {response.WhichOneof('kind')!r} "
            "instead of `acquired`",
            code=grpc.StatusCode.INTERNAL,
        )
    acquired = response.acquired
    return Lock(name=name, token=acquired.token, fencing_token=acquired.fencing_token)


def is_lost(response: pb.HoldLockResponse) -> bool:
    """Whether a HoldLock event says the lock was lost."""
    return response.WhichOneof("kind") == "lost"


def hold_error(name: str, err: grpc.RpcError, lost: bool) -> CacheCoordError:
    """Translate the error that ended a HoldLock stream after the lock was acquired.

    ABORTED there can only mean that the lock was lost (the server sends
    ``lost`` first, unless the client stopped reading).
    """
    error = from_rpc_error(err)
    if lost or error.code is grpc.StatusCode.ABORTED:
        return LockLost(error.details or f"lock {name!r} was lost while held")
    return error


def to_watch_event(response: pb.WatchResponse) -> WatchEvent | None:
    """Convert one Watch event; None for an event kind newer than this client.

    Skipping unknown kinds is safe: the contract makes RESET the only event
    that asks a client to drop more than the keys an invalidation names.
    """
    kind, token = response.WhichOneof("event"), response.resume_token
    if kind == "invalidation":
        inv = response.invalidation
        return WatchEvent(
            kind=WatchEventKind.INVALIDATION,
            namespace=inv.namespace,
            key=inv.key,
            all_keys=inv.all_keys,
            version=inv.version,
            reason=inv.reason,
            origin=inv.origin,
            tag=inv.tag,
            resume_token=token,
        )
    if kind == "reset":
        return WatchEvent(
            kind=WatchEventKind.RESET, reason=response.reset.reason, resume_token=token
        )
    if kind == "heartbeat":
        return WatchEvent(kind=WatchEventKind.HEARTBEAT, resume_token=token)
    if kind == "resumed":
        return WatchEvent(
            kind=WatchEventKind.RESUMED, replayed=response.resumed.replayed, resume_token=token
        )
    return None
