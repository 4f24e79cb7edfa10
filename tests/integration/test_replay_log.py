"""The invalidation log: Watch streams that resume from a resume_token, the
log's bounds (length, age) and what happens past them, and tokens that are
not tokens. Every test runs on a single Redis and on the Redis Cluster
(``own_backend``), each in a namespace of its own.

These tests use the generated stubs, to see the wire (the Python client's
own resuming is tested in test_watch_replay_client.py and test_local_cache.py)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from strategy_support import unique_namespace
from watch_support import instance

from cachecoord.app import App
from cachecoord.storage.keys import KeySpace
from cachecoord_client import AsyncClient
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2 as pb
from cachecoord_client.proto.cachecoord.v1 import cachecoord_pb2_grpc as pb_grpc
from conftest import Backend

WATCH_WITHIN = 30.0


class Stream:
    """A raw Watch stream of one instance."""

    def __init__(self, app: App, namespaces: list[str], resume_token: str = "") -> None:
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        stub = pb_grpc.CacheCoordServiceStub(self._channel)
        self._call = stub.Watch(pb.WatchRequest(namespaces=namespaces, resume_token=resume_token))
        self._responses: AsyncIterator[pb.WatchResponse] = self._call.__aiter__()

    async def next(self) -> pb.WatchResponse:
        """The next response that is not a heartbeat."""
        async with asyncio.timeout(WATCH_WITHIN):
            while True:
                response = await anext(self._responses)
                if response.WhichOneof("event") != "heartbeat":
                    return response

    async def close(self) -> None:
        self._call.cancel()
        await self._channel.close(None)


async def watch_from(app: App, ns: str, token: str = "") -> Stream:
    return Stream(app, [ns], token)


async def caught_up(app: App, ns: str) -> None:
    """Until *app* has applied every change its log holds."""
    feed = app.feeds[ns]
    async with asyncio.timeout(WATCH_WITHIN):
        while list(feed.positions) != await feed.log.positions():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def managed(ns: str, extra: str = "", strategy: str = "cache-aside") -> str:
    return f'[namespaces.{ns}]\nkind = "managed"\nstrategy = "{strategy}"\n{extra}'


async def put_versions(
    client: AsyncClient, ns: str, keys: list[str], rounds: int
) -> dict[str, list[int]]:
    """Put every key *rounds* times (keys concurrently, each key in order);
    the versions acknowledged, per key."""
    acknowledged: dict[str, list[int]] = defaultdict(list)
    gate = asyncio.Semaphore(64)

    async def put_key(key: str) -> None:
        async with gate:
            for n in range(rounds):
                acknowledged[key].append(await client.put(ns, key, b"%d" % n))

    await asyncio.gather(*(put_key(key) for key in keys))
    return acknowledged


async def test_a_watch_resumed_after_ten_thousand_changes_elsewhere_gets_all_then_resumed(
    own_backend: Backend, tmp_path: Path
) -> None:
    ns = unique_namespace("resumed")
    config = managed(ns, strategy="write-behind")
    url, dsn, cluster = own_backend.url, own_backend.dsn, own_backend.cluster
    async with (
        instance(tmp_path, url, dsn, "watched", cluster=cluster, namespaces=config) as (app, _),
        instance(tmp_path, url, dsn, "writer-1", cluster=cluster, namespaces=config) as (_, one),
        instance(tmp_path, url, dsn, "writer-2", cluster=cluster, namespaces=config) as (_, two),
    ):
        stream = await watch_from(app, ns)
        first = await stream.next()
        assert first.WhichOneof("event") == "reset"
        assert first.reset.reason == "subscribed"
        token = first.resume_token
        await stream.close()

        # Away: 10,000 changes, made on two other instances: 2,000 Puts (100
        # keys, 20 versions each, in order) and 8,000 invalidations (2,000
        # keys, 4 times each, 1,000 keys a call).
        acknowledged = await put_versions(one, ns, [f"put-{n}" for n in range(100)], 20)
        invalidated = [f"inv-{n}" for n in range(2000)]
        for _ in range(4):
            await two.invalidate(ns, invalidated[:1000])
            await two.invalidate(ns, invalidated[1000:])
        await caught_up(app, ns)

        stream = await watch_from(app, ns, token)
        received: dict[str, list[int]] = defaultdict(list)
        while (response := await stream.next()).WhichOneof("event") == "invalidation":
            received[response.invalidation.key].append(response.invalidation.version)
            assert response.resume_token
        assert response.WhichOneof("event") == "resumed"
        assert response.resumed.replayed == 10_000
        # All of them, once each, in order per key.
        assert {key: received[key] for key in acknowledged} == acknowledged
        assert {key: received[key] for key in invalidated} == {key: [0] * 4 for key in invalidated}
        assert len(received) == len(acknowledged) + len(invalidated)

        version = await one.put(ns, "live", b"after")
        live = await stream.next()
        assert (live.invalidation.key, live.invalidation.version) == ("live", version)
        # The token after the live event resumes with nothing to replay.
        token = live.resume_token
        await stream.close()
        stream = await watch_from(app, ns, token)
        again = await stream.next()
        assert again.WhichOneof("event") == "resumed"
        assert again.resumed.replayed == 0
        await stream.close()


async def test_a_resumed_watch_gets_the_tag_and_namespace_invalidations_made_while_away(
    own_backend: Backend, tmp_path: Path
) -> None:
    ns = unique_namespace("tagged")
    url, dsn, cluster = own_backend.url, own_backend.dsn, own_backend.cluster
    async with (
        instance(tmp_path, url, dsn, "watched", cluster=cluster, namespaces=managed(ns)) as (
            app,
            _,
        ),
        instance(tmp_path, url, dsn, "writer", cluster=cluster, namespaces=managed(ns)) as (
            _,
            writer,
        ),
    ):
        stream = await watch_from(app, ns)
        token = (await stream.next()).resume_token
        await stream.close()

        await writer.invalidate_tags(ns, ["tenant:1", "tenant:2"])
        await writer.invalidate(ns, all=True)
        await caught_up(app, ns)

        stream = await watch_from(app, ns, token)
        replayed = []
        while (response := await stream.next()).WhichOneof("event") == "invalidation":
            replayed.append(response.invalidation)
        await stream.close()

    assert response.WhichOneof("event") == "resumed"
    tags = sorted(inv.tag for inv in replayed if inv.tag)
    namespace_wide = [inv for inv in replayed if not inv.tag]
    assert tags == ["tenant:1", "tenant:2"], "each tag once"
    assert all(inv.all_keys and inv.key == "" for inv in replayed)
    # A whole-namespace invalidation is in every partition's log.
    assert len(namespace_wide) == 8  # log_partitions, by default


async def test_a_token_older_than_the_log_reaches_gets_reset_too_old_then_live_events(
    own_backend: Backend, tmp_path: Path
) -> None:
    ns = unique_namespace("old")
    # One partition keeping about 1 entry: trimmed a node (100 entries) at a time.
    config = managed(ns, "log_partitions = 1\nlog_max_entries = 1\n")
    url, dsn, cluster = own_backend.url, own_backend.dsn, own_backend.cluster
    async with (
        instance(tmp_path, url, dsn, "watched", cluster=cluster, namespaces=config) as (app, _),
        instance(tmp_path, url, dsn, "writer", cluster=cluster, namespaces=config) as (_, writer),
    ):
        stream = await watch_from(app, ns)
        token = (await stream.next()).resume_token
        await stream.close()
        for batch in range(3):
            await writer.invalidate(ns, [f"k-{batch}-{n}" for n in range(200)])
        await caught_up(app, ns)

        stream = await watch_from(app, ns, token)
        reset = await stream.next()
        assert reset.WhichOneof("event") == "reset"
        assert reset.reset.reason == "too_old"
        assert reset.resume_token != token
        version = await writer.put(ns, "live", b"v")
        live = await stream.next()
        assert (live.invalidation.key, live.invalidation.version) == ("live", version)
        await stream.close()
        # The fresh token works.
        stream = await watch_from(app, ns, live.resume_token)
        assert (await stream.next()).WhichOneof("event") == "resumed"
        await stream.close()


async def test_the_log_is_trimmed_by_length_and_by_age(
    own_backend: Backend, tmp_path: Path
) -> None:
    by_length, by_age = unique_namespace("length"), unique_namespace("age")
    config = managed(by_length, "log_partitions = 1\nlog_max_entries = 10\n") + managed(
        by_age, 'log_partitions = 1\nlog_max_age = "300ms"\n'
    )
    async with (
        instance(
            tmp_path,
            own_backend.url,
            own_backend.dsn,
            "trimmed",
            cluster=own_backend.cluster,
            namespaces=config,
        ) as (_, client),
        own_backend.client() as redis,
    ):
        await client.invalidate(by_length, [f"k-{n}" for n in range(1000)])
        # MAXLEN ~ trims whole stream nodes (100 entries): at least 10 kept, far from 1000.
        assert 10 <= await redis.xlen(KeySpace(by_length, 1).log_of(0)) <= 200

        await client.invalidate(by_age, [f"k-{n}" for n in range(50)])
        assert await redis.xlen(KeySpace(by_age, 1).log_of(0)) >= 50
        await asyncio.sleep(0.35)
        await client.invalidate(by_age, ["last"])
        assert await redis.xlen(KeySpace(by_age, 1).log_of(0)) == 1


@pytest.mark.parametrize(
    "token",
    [
        "not a token",
        "v1.%%%",
        "v1.bm90IGpzb24",  # base64 of "not json"
        "v1.eyJvdGhlciI6W119",  # {"other": []}: another namespace
        "v1.e30",  # {}: no namespace
    ],
    ids=["garbage", "bad-base64", "not-json", "other-namespace", "no-namespace"],
)
async def test_a_malformed_token_is_invalid_argument(
    own_backend: Backend, tmp_path: Path, token: str
) -> None:
    ns = unique_namespace("tokens")
    async with instance(
        tmp_path,
        own_backend.url,
        own_backend.dsn,
        "tokens",
        cluster=own_backend.cluster,
        namespaces=managed(ns),
    ) as (app, _):
        stream = await watch_from(app, ns, token)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stream.next()
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        await stream.close()


async def test_a_token_for_other_partitions_is_invalid_argument(
    own_backend: Backend, tmp_path: Path
) -> None:
    ns = unique_namespace("parts")
    url, dsn, cluster = own_backend.url, own_backend.dsn, own_backend.cluster
    async with instance(tmp_path, url, dsn, "eight", cluster=cluster, namespaces=managed(ns)) as (
        app,
        _,
    ):
        stream = await watch_from(app, ns)
        token = (await stream.next()).resume_token
        await stream.close()
    async with instance(
        tmp_path, url, dsn, "two", cluster=cluster, namespaces=managed(ns, "log_partitions = 2\n")
    ) as (app, _):
        stream = await watch_from(app, ns, token)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stream.next()
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        await stream.close()
