"""CacheCoordService: protobuf in, domain call, protobuf out. Nothing else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from cachecoord.cache import Cache
from cachecoord.coordination.hold import Handoffs, LockLost
from cachecoord.coordination.locks import Locks
from cachecoord.errors import InvalidArgument, Unavailable
from cachecoord.invalidation.watch import EventKind, WatchEvent
from cachecoord.model import Entry, Layer
from cachecoord.rpc.auth import Authorizer
from cachecoord.rpc.status import rpc, server_stream_rpc, stream_rpc
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]

_LAYERS = {
    Layer.NEAR: pb.LAYER_NEAR,
    Layer.REDIS: pb.LAYER_REDIS,
    Layer.DATABASE: pb.LAYER_DATABASE,
}


def _timeout(servicer: CacheCoordServicer) -> float:
    return servicer.default_timeout


class CacheCoordServicer(pb_grpc.CacheCoordServiceServicer):
    def __init__(
        self,
        cache: Cache,
        locks: Locks,
        *,
        default_timeout: float,
        watch_heartbeat: float,
        authorizer: Authorizer | None = None,
    ) -> None:
        self.cache = cache
        self.locks = locks
        self.default_timeout = default_timeout
        self.watch_heartbeat = watch_heartbeat
        # Read by the decorators of rpc/status.py before each handler; None: auth off.
        self.authorizer = authorizer
        # HoldLock streams: how long the first message may take, and when
        # holds are handed off (rpc/server.py sets both from the settings).
        self.hold_first_message_timeout = 10.0
        self.handoffs = Handoffs(every=15.0)

    @rpc(_timeout)
    async def Get(self, request: pb.GetRequest, context: Context) -> pb.GetResponse:
        entry = await self.cache.get(
            request.namespace, request.key, min_version=request.min_version
        )
        if entry.value is None:
            return pb.GetResponse(found=False, reloaded=entry.reloaded)
        return pb.GetResponse(
            found=True,
            value=entry.value,
            version=entry.version,
            layer=_LAYERS[entry.layer],
            stale=entry.stale,
            ttl_ms=entry.ttl_ms,
            reloaded=entry.reloaded,
            tags=entry.tags,
        )

    @rpc(_timeout)
    async def BatchGet(self, request: pb.BatchGetRequest, context: Context) -> pb.BatchGetResponse:
        entries = await self.cache.batch_get(
            request.namespace, list(request.keys), min_versions=dict(request.min_versions)
        )
        return pb.BatchGetResponse(entries=[_entry(e) for e in entries])

    @rpc(_timeout)
    async def Put(self, request: pb.PutRequest, context: Context) -> pb.PutResponse:
        version = await self.cache.put(
            request.namespace,
            request.key,
            request.value,
            expected_version=(
                request.expected_version if request.HasField("expected_version") else None
            ),
            ttl_ms=request.ttl_ms if request.HasField("ttl_ms") else None,
            tags=list(request.tags),
        )
        return pb.PutResponse(version=version)

    @rpc(_timeout)
    async def Delete(self, request: pb.DeleteRequest, context: Context) -> pb.DeleteResponse:
        deleted = await self.cache.delete(
            request.namespace,
            request.key,
            expected_version=(
                request.expected_version if request.HasField("expected_version") else None
            ),
        )
        return pb.DeleteResponse(deleted=deleted.deleted, version=deleted.version)

    @rpc(_timeout)
    async def Invalidate(
        self, request: pb.InvalidateRequest, context: Context
    ) -> pb.InvalidateResponse:
        count = await self.cache.invalidate(
            request.namespace, list(request.keys), everything=request.all
        )
        return pb.InvalidateResponse(invalidated=count)

    @rpc(_timeout)
    async def InvalidateTags(
        self, request: pb.InvalidateTagsRequest, context: Context
    ) -> pb.InvalidateTagsResponse:
        await self.cache.invalidate_tags(request.namespace, list(request.tags))
        return pb.InvalidateTagsResponse()

    @rpc(_timeout)
    async def AcquireLock(
        self, request: pb.AcquireLockRequest, context: Context
    ) -> pb.AcquireLockResponse:
        remaining = context.time_remaining()
        grant = await self.locks.acquire(
            request.name,
            request.ttl_ms,
            request.wait_timeout_ms,
            caller_deadline=(
                time.monotonic() + remaining
                if remaining is not None and remaining < 86400
                else None
            ),
            token=request.token,
        )
        return pb.AcquireLockResponse(token=grant.token, fencing_token=grant.fencing_token)

    @rpc(_timeout)
    async def ReleaseLock(
        self, request: pb.ReleaseLockRequest, context: Context
    ) -> pb.ReleaseLockResponse:
        await self.locks.release(request.name, request.token)
        return pb.ReleaseLockResponse()

    @rpc(_timeout)
    async def ExtendLock(
        self, request: pb.ExtendLockRequest, context: Context
    ) -> pb.ExtendLockResponse:
        await self.locks.extend(request.name, request.token, request.ttl_ms)
        return pb.ExtendLockResponse()

    # grpc.aio also accepts a coroutine that uses context.write() for a
    # streaming method, which the generated signature does not describe. It
    # keeps every await of the stream inside this coroutine, so that a lost
    # lock can interrupt whichever it is waiting on.
    @server_stream_rpc
    async def Watch(self, request: pb.WatchRequest, context: Context) -> None:  # type: ignore[override]
        async with self.cache.watch(
            list(request.namespaces), request.key_prefix, request.resume_token
        ) as watcher:
            while True:
                event = await watcher.next(self.watch_heartbeat)
                await context.write(_watch_response(event, watcher.resume_token))

    @stream_rpc
    async def HoldLock(  # type: ignore[override]
        self, requests: AsyncIterator[pb.HoldLockRequest], context: Context
    ) -> None:
        opened_at = asyncio.get_running_loop().time()
        first = await _first_message(requests, self.hold_first_message_timeout)
        if self.handoffs.draining:
            raise Unavailable("this instance is shutting down; hold the lock through another")
        if first.WhichOneof("kind") == "resume":
            resume = first.resume
            hold = self.locks.hold(resume.name, resume.ttl_ms, 0, resume_token=resume.token)
            resumable = True
        else:
            acquire = first.acquire
            hold = self.locks.hold(acquire.name, acquire.ttl_ms, acquire.wait_timeout_ms)
            resumable = acquire.resumable
        try:
            async with hold as grant:
                acquired = pb.HoldLockResponse.Acquired(
                    token=grant.token, fencing_token=grant.fencing_token
                )
                await context.write(pb.HoldLockResponse(acquired=acquired))
                if not resumable:  # a client that would not resume: held as long as the stream
                    await _until_released(requests)
                    return
                try:
                    async with self.handoffs.window(opened_at):
                        await _until_released(requests)
                except TimeoutError:
                    # The connection may be closed soon (rpc/server.py): keep
                    # the lock for the client to resume on a new stream.
                    hold.hand_off()
            if hold.handed_off:
                valid_for_ms = int(hold.handed_off_for * 1000)
                handoff = pb.HoldLockResponse.Handoff(valid_for_ms=valid_for_ms)
                await context.write(pb.HoldLockResponse(handoff=handoff))
        except LockLost:
            await context.write(pb.HoldLockResponse(lost=pb.HoldLockResponse.Lost()))
            raise


def _watch_response(event: WatchEvent, resume_token: str) -> pb.WatchResponse:
    change = event.change
    if event.kind is EventKind.INVALIDATED and change is not None:
        return pb.WatchResponse(
            invalidation=pb.Invalidation(
                namespace=change.namespace,
                key=change.key or "",
                # A tag's event too (the contract): a client that does not
                # know tags then drops the whole namespace, not nothing.
                all_keys=change.key is None,
                version=change.version,
                reason=change.reason,
                origin=change.origin,
                tag=change.tag or "",
            ),
            resume_token=resume_token,
        )
    if event.kind is EventKind.RESET:
        return pb.WatchResponse(reset=pb.Reset(reason=event.reason), resume_token=resume_token)
    if event.kind is EventKind.RESUMED:
        return pb.WatchResponse(
            resumed=pb.Resumed(replayed=event.replayed), resume_token=resume_token
        )
    return pb.WatchResponse(heartbeat=pb.Heartbeat(), resume_token=resume_token)


def _entry(entry: Entry) -> pb.Entry:
    if entry.value is None:
        return pb.Entry(key=entry.key, found=False, reloaded=entry.reloaded)
    return pb.Entry(
        key=entry.key,
        found=True,
        value=entry.value,
        version=entry.version,
        layer=_LAYERS[entry.layer],
        stale=entry.stale,
        ttl_ms=entry.ttl_ms,
        reloaded=entry.reloaded,
        tags=entry.tags,
    )


async def _first_message(
    requests: AsyncIterator[pb.HoldLockRequest], within: float
) -> pb.HoldLockRequest:
    """The stream's `acquire` or `resume`, which must come within *within* seconds."""
    try:
        async with asyncio.timeout(within):
            first = await anext(requests, None)
    except TimeoutError:
        raise InvalidArgument(
            f"no HoldLock message came within {within:.3f} s of the stream's start "
            "(server.lock_first_message_timeout); the first must be `acquire` or `resume`"
        ) from None
    if first is None or first.WhichOneof("kind") not in ("acquire", "resume"):
        raise InvalidArgument(
            "the first HoldLock message must be `acquire` (name, ttl_ms, wait_timeout_ms) "
            "or `resume` (name, token, ttl_ms)"
        )
    return first


async def _until_released(requests: AsyncIterator[pb.HoldLockRequest]) -> None:
    """Return when the client sends `release` or half-closes; keep-alives change nothing."""
    async for request in requests:
        kind = request.WhichOneof("kind")
        if kind == "release":
            return
        if kind in ("acquire", "resume"):
            raise InvalidArgument(f"HoldLock: `{kind}` may only be the first message of the stream")
