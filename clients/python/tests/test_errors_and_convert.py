"""Unit tests of error mapping and request/response conversion (no server needed)."""

from __future__ import annotations

import dataclasses
import math
import pickle
from collections.abc import Iterator

import grpc
import grpc.aio
import pytest

from cachecoord_client import (
    CacheCoordError,
    DeadlineExceeded,
    Deleted,
    Entry,
    InvalidArgument,
    Layer,
    Lock,
    LockNotAcquired,
    NamespaceNotFound,
    PermissionDenied,
    QueueFull,
    Unauthenticated,
    Unavailable,
    Value,
    VersionConflict,
    WatchEvent,
    WatchEventKind,
    _convert,
    from_rpc_error,
)
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb

MAPPED: dict[grpc.StatusCode, type[CacheCoordError]] = {
    grpc.StatusCode.NOT_FOUND: NamespaceNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: VersionConflict,
    grpc.StatusCode.ABORTED: LockNotAcquired,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QueueFull,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


class _BlockingStyleError(grpc.RpcError):
    """Shaped like the error the blocking API raises (an RpcError that is a Call)."""

    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        super().__init__()
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


def _aio_error(code: grpc.StatusCode, details: str | None) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


# Errors.


@pytest.mark.parametrize(("code", "cls"), MAPPED.items(), ids=lambda v: getattr(v, "name", ""))
def test_mapped_codes_pick_their_subclass(
    code: grpc.StatusCode, cls: type[CacheCoordError]
) -> None:
    for err in (_aio_error(code, "why"), _BlockingStyleError(code, "why")):
        translated = from_rpc_error(err)
        assert type(translated) is cls
        assert isinstance(translated, CacheCoordError)
        assert translated.code is code
        assert translated.details == "why"
        assert str(translated) == f"{code.name}: why"


@pytest.mark.parametrize(
    "code", [c for c in grpc.StatusCode if c not in MAPPED], ids=lambda c: c.name
)
def test_other_codes_fall_back_to_the_base_class(code: grpc.StatusCode) -> None:
    translated = from_rpc_error(_aio_error(code, "boom"))
    assert type(translated) is CacheCoordError
    assert translated.code is code
    assert translated.details == "boom"


def test_missing_details_become_empty() -> None:
    translated = from_rpc_error(_BlockingStyleError(grpc.StatusCode.ABORTED, None))
    assert translated.details == ""
    assert str(translated) == "ABORTED"


def test_bare_rpc_error_is_unknown() -> None:
    translated = from_rpc_error(grpc.RpcError("no status"))
    assert type(translated) is CacheCoordError
    assert translated.code is grpc.StatusCode.UNKNOWN
    assert translated.details == "no status"


def test_subclasses_default_to_their_code() -> None:
    for code, cls in MAPPED.items():
        assert cls("x").code is code
        assert cls.default_code is code
    assert CacheCoordError().code is grpc.StatusCode.UNKNOWN


@pytest.mark.parametrize(
    "err",
    [VersionConflict("at version 3"), CacheCoordError("x", code=grpc.StatusCode.INTERNAL)],
    ids=["subclass", "base"],
)
def test_errors_pickle(err: CacheCoordError) -> None:
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err)
    assert (copy.code, copy.details) == (err.code, err.details)


# Call options.


def test_deadlines() -> None:
    assert _convert.deadline(None, 5.0) == 5.0
    assert _convert.deadline(0.25, 5.0) == 0.25
    assert _convert.lock_deadline(None, 5.0, 0) == 5.0
    assert _convert.lock_deadline(None, 5.0, 2500) == 7.5
    assert _convert.lock_deadline(1.0, 5.0, 2500) == 1.0


def test_settings() -> None:
    assert _convert.settings(2, None) == _convert.Settings(2.0, None)
    assert _convert.settings(5.0, "t").metadata == (("authorization", "Bearer t"),)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf])
def test_default_timeout_must_be_positive_and_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="default_timeout"):
        _convert.settings(bad, None)


def test_auth_metadata() -> None:
    assert _convert.auth_metadata(None) is None
    assert _convert.auth_metadata("abc.def") == (("authorization", "Bearer abc.def"),)
    for bad in ["", " abc", "abc\n", "ab\rc", "tökén"]:
        with pytest.raises(ValueError, match="token"):
            _convert.auth_metadata(bad)


# Requests.


def test_get_and_batch_get_requests() -> None:
    assert _convert.get_request("users", "1") == pb.GetRequest(namespace="users", key="1")

    def keys() -> Iterator[str]:
        yield from ("a", "b", "a")

    request = _convert.batch_get_request("users", keys())
    assert request.namespace == "users"
    assert list(request.keys) == ["a", "b", "a"]


@pytest.mark.parametrize("keys", ["abc", b"abc"])
def test_a_single_string_is_not_a_key_list(keys: str) -> None:
    with pytest.raises(TypeError, match="iterable of str"):
        _convert.batch_get_request("users", keys)
    with pytest.raises(TypeError, match="iterable of str"):
        _convert.invalidate_request("users", keys, False)
    with pytest.raises(TypeError, match="namespaces must be an iterable of str"):
        _convert.watch_request(keys, "")


def test_put_request_optional_fields() -> None:
    bare = _convert.put_request("users", "1", b"{}", None, None)
    assert (bare.namespace, bare.key, bare.value) == ("users", "1", b"{}")
    assert not bare.HasField("expected_version")
    assert not bare.HasField("ttl_ms")

    # 0 is meaningful ("the key must not exist") and must be sent, not dropped.
    zero = _convert.put_request("users", "1", b"{}", 0, 0)
    assert zero.HasField("expected_version")
    assert zero.expected_version == 0
    assert zero.HasField("ttl_ms")

    set_ = _convert.put_request("users", "1", b"{}", 7, 60_000)
    assert (set_.expected_version, set_.ttl_ms) == (7, 60_000)


def test_delete_request_optional_version() -> None:
    assert not _convert.delete_request("users", "1", None).HasField("expected_version")
    request = _convert.delete_request("users", "1", 0)
    assert request.HasField("expected_version")
    assert (request.namespace, request.key, request.expected_version) == ("users", "1", 0)


def test_invalidate_request() -> None:
    request = _convert.invalidate_request("users", ("1", "2"), False)
    assert (request.namespace, list(request.keys), request.all) == ("users", ["1", "2"], False)
    request = _convert.invalidate_request("users", (), True)
    assert (list(request.keys), request.all) == ([], True)


def test_lock_requests() -> None:
    assert _convert.acquire_lock_request("job", 30_000, 250) == pb.AcquireLockRequest(
        name="job", ttl_ms=30_000, wait_timeout_ms=250
    )
    assert _convert.release_lock_request("job", "t") == pb.ReleaseLockRequest(name="job", token="t")
    assert _convert.extend_lock_request("job", "t", 10) == pb.ExtendLockRequest(
        name="job", token="t", ttl_ms=10
    )


def test_watch_request() -> None:
    assert _convert.watch_request(iter(["users", "blobs"]), "user:") == pb.WatchRequest(
        namespaces=["users", "blobs"], key_prefix="user:"
    )
    assert _convert.watch_request(["users"], "") == pb.WatchRequest(namespaces=["users"])


# Responses.


@pytest.mark.parametrize(
    ("proto", "layer"),
    [
        (pb.LAYER_UNSPECIFIED, Layer.UNSPECIFIED),
        (pb.LAYER_NEAR, Layer.NEAR),
        (pb.LAYER_REDIS, Layer.REDIS),
        (pb.LAYER_DATABASE, Layer.DATABASE),
        (99, Layer.UNSPECIFIED),  # a layer added to the contract after this client
    ],
)
def test_layers(proto: int, layer: Layer) -> None:
    assert _convert.to_layer(proto) is layer


def test_layer_values() -> None:
    assert [str(layer) for layer in Layer] == ["unspecified", "near", "redis", "database"]
    assert Layer("redis") is Layer.REDIS


def test_to_value() -> None:
    response = pb.GetResponse(
        found=True, value=b'{"id":1}', version=4, layer=pb.LAYER_NEAR, stale=True, ttl_ms=900
    )
    assert _convert.to_value(response) == Value(
        found=True, value=b'{"id":1}', version=4, layer=Layer.NEAR, stale=True, ttl_ms=900
    )
    assert _convert.to_value(pb.GetResponse()) == Value(
        found=False, value=b"", version=0, layer=Layer.UNSPECIFIED, stale=False, ttl_ms=0
    )


def test_to_entries_keeps_order() -> None:
    response = pb.BatchGetResponse(
        entries=[
            pb.Entry(key="b", found=True, value=b"2", version=2, layer=pb.LAYER_DATABASE),
            pb.Entry(key="a", found=False),
        ]
    )
    assert _convert.to_entries(response) == [
        Entry("b", True, b"2", 2, Layer.DATABASE, False, 0),
        Entry("a", False, b"", 0, Layer.UNSPECIFIED, False, 0),
    ]


def test_scalar_responses() -> None:
    assert _convert.to_version(pb.PutResponse(version=12)) == 12
    assert _convert.to_deleted(pb.DeleteResponse(deleted=True, version=13)) == Deleted(True, 13)
    assert _convert.to_invalidated(pb.InvalidateResponse(invalidated=5)) == 5
    assert _convert.to_lock("job", pb.AcquireLockResponse(token="t", fencing_token=9)) == Lock(
        "job", "t", 9
    )


@pytest.mark.parametrize(
    ("response", "event"),
    [
        pytest.param(
            pb.WatchResponse(
                invalidation=pb.Invalidation(
                    namespace="users", key="1", version=7, reason="put", origin="host-1"
                )
            ),
            WatchEvent(WatchEventKind.INVALIDATION, "users", "1", False, 7, "put", "host-1"),
            id="invalidation",
        ),
        pytest.param(
            pb.WatchResponse(
                invalidation=pb.Invalidation(
                    namespace="users", all_keys=True, reason="invalidate", origin="host-2"
                )
            ),
            WatchEvent(WatchEventKind.INVALIDATION, "users", "", True, 0, "invalidate", "host-2"),
            id="all-keys",
        ),
        pytest.param(
            pb.WatchResponse(reset=pb.Reset(reason="overflow")),
            WatchEvent(WatchEventKind.RESET, reason="overflow"),
            id="reset",
        ),
        pytest.param(
            pb.WatchResponse(heartbeat=pb.Heartbeat()),
            WatchEvent(WatchEventKind.HEARTBEAT),
            id="heartbeat",
        ),
        pytest.param(
            pb.WatchResponse(resumed=pb.Resumed(replayed=3), resume_token="v1.t"),
            WatchEvent(WatchEventKind.RESUMED, replayed=3, resume_token="v1.t"),
            id="resumed",
        ),
        # An event kind added to the contract after this client: skipped.
        pytest.param(pb.WatchResponse(), None, id="unknown-kind"),
    ],
)
def test_to_watch_event(response: pb.WatchResponse, event: WatchEvent | None) -> None:
    assert _convert.to_watch_event(response) == event


def test_watch_event_kinds() -> None:
    assert [str(kind) for kind in WatchEventKind] == [
        "invalidation",
        "reset",
        "heartbeat",
        "resumed",
        "interrupted",
    ]
    assert WatchEvent(WatchEventKind.RESET, reason="subscribed") == WatchEvent(
        WatchEventKind.RESET, "", "", False, 0, "subscribed", ""
    )


def test_types_are_frozen_and_slotted() -> None:
    value = Value(True, b"", 1, Layer.REDIS, False, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        value.version = 2  # type: ignore[misc]
    entry = Entry("k", *dataclasses.astuple(value))
    event = WatchEvent(WatchEventKind.HEARTBEAT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.key = "k"  # type: ignore[misc]
    for obj in (value, entry, Deleted(True, 1), Lock("n", "t", 1), event):
        assert not hasattr(obj, "__dict__")
