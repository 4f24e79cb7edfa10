"""Serialized CacheCoordService requests, and checks of sampled replies.

The load generator sends bytes (see loadgen.py), so scenarios build every
request up front here, with the generated protobuf classes of the client
package: the contract, not the server's internals.
"""

from __future__ import annotations

from collections.abc import Iterable

from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb


def value(payload: int, tag: int = 0) -> bytes:
    """A value of *payload* bytes that starts with *tag*, so writes are distinguishable."""
    head = f"{tag:012d}:".encode()
    return (head + b"x" * payload)[:payload] if payload >= len(head) else b"x" * payload


def put(namespace: str, key: str, data: bytes) -> bytes:
    return pb.PutRequest(namespace=namespace, key=key, value=data).SerializeToString()


def get(namespace: str, key: str) -> bytes:
    return pb.GetRequest(namespace=namespace, key=key).SerializeToString()


def batch_get(namespace: str, keys: Iterable[str]) -> bytes:
    return pb.BatchGetRequest(namespace=namespace, keys=list(keys)).SerializeToString()


def check_get(replies: Iterable[bytes], layer: pb.Layer.ValueType, *, allowed: float = 0.01) -> int:
    """Raise unless every sampled Get reply found its key, and all but a fraction
    *allowed* of them in *layer*; return how many came from another layer. A
    benchmark of Get hits that quietly measured misses would be worse than none;
    but on an overloaded machine a Redis call can time out (cachecoord then
    answers from PostgreSQL), and that rare, real answer should not void a run."""
    replies = list(replies)
    wrong: list[str] = []
    for raw in replies:
        reply = pb.GetResponse.FromString(raw)
        if not reply.found:
            raise RuntimeError(f"expected a found value from {pb.Layer.Name(layer)}, got none")
        if reply.layer != layer:
            wrong.append(pb.Layer.Name(reply.layer))
    if len(wrong) > allowed * len(replies):
        raise RuntimeError(
            f"expected found values from {pb.Layer.Name(layer)}; {len(wrong)} of "
            f"{len(replies)} sampled replies were not: {sorted(set(wrong))}"
        )
    if wrong:
        print(
            f"  ({len(wrong)} of {len(replies)} sampled replies came from {sorted(set(wrong))}, "
            f"not {pb.Layer.Name(layer)})",
            flush=True,
        )
    return len(wrong)


def check_batch_get(replies: Iterable[bytes], keys: int, layer: pb.Layer.ValueType) -> None:
    """Raise unless every sampled BatchGet reply has *keys* found entries from *layer*."""
    for raw in replies:
        entries = pb.BatchGetResponse.FromString(raw).entries
        wrong = [e.key for e in entries if not e.found or e.layer != layer]
        if len(entries) != keys or wrong:
            raise RuntimeError(
                f"expected {keys} found entries from {pb.Layer.Name(layer)}, got "
                f"{len(entries)} entries, not so: {wrong[:5]}"
            )


def check_put(replies: Iterable[bytes]) -> None:
    for raw in replies:
        if pb.PutResponse.FromString(raw).version <= 0:
            raise RuntimeError("a Put answered version 0")
