"""Read-your-writes across services: ``min_version`` on Get, BatchGet and
LocalCache.

To make "a cached copy older than the version a write returned" certain
rather than a race with pub/sub, each test puts the pre-write copy back into
Redis after the write (as a lost invalidation would leave it): a plain read
then answers the old version, and a read with ``min_version`` must not.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from strategy_support import poll, serve_config, serving

from cachecoord.config import load
from cachecoord.storage.keys import KeySpace
from cachecoord_client import AsyncClient, CacheCoordError, Layer, LocalCache
from conftest import Backend

NAMESPACE = """
[namespaces.{ns}]
kind = "managed"
strategy = "{strategy}"
ttl = "5m"
near_cache_entries = 100
near_cache_ttl = "60s"
"""


@asynccontextmanager
async def two_instances(
    backend: Backend, tmp: Path, strategy: str = "cache-aside"
) -> AsyncIterator[tuple[str, AsyncClient, AsyncClient]]:
    """A namespace of its own served by a writer and a reader instance."""
    ns = f"ryw_{uuid.uuid4().hex[:10]}"
    settings = []
    for name in ("writer", "reader"):
        config = serve_config(
            tmp,
            listen="127.0.0.1:0",
            redis_url=backend.url,
            postgres_url=backend.dsn,
            instance_id=f"{ns}-{name}",
            namespaces=NAMESPACE.format(ns=ns, strategy=strategy),
        )
        settings.append(load(config, backend.env))
    async with serving(settings[0]) as (_, writer), serving(settings[1]) as (_, reader):
        yield ns, writer, reader


async def left_behind(backend: Backend, ns: str, key: str, writer: AsyncClient) -> tuple[int, int]:
    """Put v1, read it into Redis, put v2, then put v1's copy back into Redis;
    the two versions."""
    first = await writer.put(ns, key, b"one")
    await writer.get(ns, key)
    value_key = KeySpace(ns).value(key)
    async with backend.client() as redis:
        old, ttl = await redis.get(value_key), await redis.pttl(value_key)
        assert old is not None
        assert ttl > 0
        second = await writer.put(ns, key, b"two")
        await redis.set(value_key, old, px=ttl)
    return first, second


@pytest.mark.parametrize("strategy", ["cache-aside", "write-through"])
async def test_get_with_min_version_skips_an_older_cached_copy(
    own_backend: Backend, tmp_path: Path, strategy: str
) -> None:
    async with two_instances(own_backend, tmp_path, strategy) as (ns, writer, reader):
        first, second = await left_behind(own_backend, ns, "k", writer)
        stale = await poll(lambda: reader.get(ns, "k"), lambda v: v.layer is Layer.NEAR, within=5)
        assert (stale.value, stale.version) == (b"one", first)  # what min_version is for

        fresh = await reader.get(ns, "k", min_version=second)
        assert (fresh.value, fresh.version, fresh.reloaded) == (b"two", second, True)
        # The reload replaced the old copy: plain reads see the write now.
        again = await reader.get(ns, "k")
        assert (again.version, again.reloaded) == (second, False)


async def test_a_cached_copy_at_min_version_is_served_as_usual(
    own_backend: Backend, tmp_path: Path
) -> None:
    async with two_instances(own_backend, tmp_path) as (ns, writer, reader):
        version = await writer.put(ns, "k", b"v")
        await reader.get(ns, "k")
        hit = await reader.get(ns, "k", min_version=version)
        assert (hit.layer, hit.reloaded) == (Layer.NEAR, False)
        older = await reader.get(ns, "k", min_version=version - 1)
        assert older.layer is Layer.NEAR


async def test_batch_get_with_min_versions_skips_only_the_keys_it_names(
    own_backend: Backend, tmp_path: Path
) -> None:
    async with two_instances(own_backend, tmp_path) as (ns, writer, reader):
        _, second_a = await left_behind(own_backend, ns, "a", writer)
        first_b, _ = await left_behind(own_backend, ns, "b", writer)
        entries = await reader.batch_get(ns, ["a", "b"], min_versions={"a": second_a})
        a, b = entries
        assert (a.key, a.version, a.reloaded) == ("a", second_a, True)
        assert (b.key, b.version, b.reloaded) == ("b", first_b, False)  # not asked: as cached


async def test_local_cache_with_min_version_reads_through_its_memory(
    own_backend: Backend, tmp_path: Path
) -> None:
    async with (
        two_instances(own_backend, tmp_path) as (ns, writer, reader),
        LocalCache(reader, namespaces=[ns]) as local,
    ):
        first, second = await left_behind(own_backend, ns, "k", writer)
        held = await poll(
            lambda: local.get(ns, "k"),
            lambda v: v.version == first and len(local) == 1,
            within=5,
        )
        assert held.value == b"one"
        fresh = await local.get(ns, "k", min_version=second)
        assert (fresh.version, fresh.reloaded) == (second, True)
        assert (await local.get(ns, "k")).version == second  # kept in memory


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c, ns: c.get(ns, "k", min_version=-1), "min_version"),
        (lambda c, ns: c.batch_get(ns, ["a"], min_versions={"b": 1}), "min_versions"),
        (lambda c, ns: c.batch_get(ns, ["a"], min_versions={"a": -2}), "min_version"),
    ],
    ids=["negative", "key-not-asked-for", "negative-in-batch"],
)
async def test_bad_min_versions_are_invalid_arguments_naming_the_field(
    own_backend: Backend, tmp_path: Path, call: object, field: str
) -> None:
    async with two_instances(own_backend, tmp_path) as (ns, _, reader):
        with pytest.raises(CacheCoordError) as caught:
            await call(reader, ns)  # type: ignore[operator]
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert field in str(caught.value)


async def test_min_version_is_kept_while_another_reader_holds_the_lease(
    own_backend: Backend, tmp_path: Path
) -> None:
    """The reload cannot take the key's lease (another reader holds it), so it
    waits for that reader's fill, and Redis still has the old copy: the read
    must still not answer it (it reads PostgreSQL). Failed in the history
    checker before: the wait handed back the old copy."""
    async with two_instances(own_backend, tmp_path) as (ns, writer, reader):
        _, second = await left_behind(own_backend, ns, "k", writer)
        async with own_backend.client() as redis:
            await redis.set(KeySpace(ns).lease("k"), "another-reader", px=5_000)
            fresh = await reader.get(ns, "k", min_version=second)
            assert (fresh.value, fresh.version, fresh.reloaded) == (b"two", second, True)
            batch = await reader.batch_get(ns, ["k"], min_versions={"k": second})
            assert (batch[0].version, batch[0].reloaded) == (second, True)
