"""Client CPU per Redis read, for each way of reading Redis from the server's
event loop (issue 19 item 1): ``python -m bench.redis_clients [--cluster]``.

One process on uvloop, a private Redis (or, with ``--cluster``, a private
3-primary Redis Cluster), 32 reads in flight, 200-byte values; CPU is this
process's (``time.process_time``) per read, after a warm-up round:

* ``redis_asyncio_pool``: ``redis.asyncio`` with its default connection pool;
* ``redis_asyncio_blocking``: with a BlockingConnectionPool (what cachecoord
  used for every command before the hot path);
* ``coredis``, ``valkey_glide``: where installed (they are not dependencies);
* ``hot_path``: ``storage.hot_path.HotPath`` (pipelined connections);
* ``store_get_redis_py`` / ``store_get_hot``: ``EntryStore.get`` (circuit
  breaker included) over redis-py, and over the hot path: what a Get hit pays;
  ``..._1_in_flight``: the same one call at a time (each command its own
  write and read, as mostly in the server under ``bench get``);
* ``store_get_many_redis_py`` / ``store_get_many_hot``: ``EntryStore.get_many``
  of 100 keys, per key;
* ``protocol_floor``: the least a Python client can do, an asyncio.Protocol
  with a hiredis.Reader writing each GET at once (single Redis only).

Ends with ``RESULT <way>_cpu_us=...`` lines.

``python -m bench.redis_clients --pstats get-hit-reads.pstats`` reads the
cProfile statistics of ``python -m bench profile --keep`` instead: the
event-loop CPU per Get hit spent on its Redis command, under the Get load
(``EntryStore.get`` with all it calls, plus the pipelined connection's loop
callbacks: writing, and reading replies), as profiled (cProfile's own cost
included).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import pstats
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import hiredis
import redis.asyncio as aredis
import uvloop

import bench.stack  # noqa: F401  (puts scripts/ on sys.path for local_servers)
from cachecoord.config import RedisSettings
from cachecoord.storage.hot_path import HotPath
from cachecoord.storage.keys import KeySpace
from cachecoord.storage.redis_store import EntryStore, connect
from local_servers import RedisCluster, RedisServer

READS = 20_000
IN_FLIGHT = 32
VALUE = b"v" * 200
KEYS = 1_000


class _Floor(asyncio.Protocol):
    """The raw protocol: no timeouts, no errors, no reconnects."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            self.waiters.popleft().set_result(reply)

    def get(self, key: str) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        command: tuple[str | bytes, ...] = ("GET", key)
        self.transport.write(hiredis.pack_command(command))  # type: ignore[arg-type]
        self.waiters.append(future)
        return future


async def _measure(
    read: Callable[[int], Awaitable[Any]], reads: int, per_call: int = 1, in_flight: int = IN_FLIGHT
) -> float:
    """CPU µs per key read, *per_call* keys per call, *in_flight* calls at a time."""

    async def worker(first: int, calls: int) -> None:
        for i in range(calls):
            await read(first + i)

    calls = reads // per_call
    used = 0.0
    for _ in range(2):  # a warm-up round, then the measured one
        started = time.process_time()
        await asyncio.gather(*(worker(w * 7919, calls // in_flight) for w in range(in_flight)))
        used = time.process_time() - started
    return used / (calls // in_flight * in_flight * per_call) * 1e6


async def _run(url: str, cluster: bool, port: int) -> dict[str, float]:
    results: dict[str, float] = {}
    settings = RedisSettings(url=url, cluster=cluster)
    space = KeySpace("probe")
    names = [space.value(f"k{i}") for i in range(KEYS)]
    keys = [f"k{i}" for i in range(KEYS)]

    def name(i: int) -> str:
        return names[i % KEYS]

    fast = connect(settings)  # the hot path beside redis-py
    for n in names:
        await fast.set(n, VALUE)
    if not cluster:
        plain = aredis.Redis.from_url(url, protocol=2)
        results["redis_asyncio_pool"] = await _measure(lambda i: plain.get(name(i)), READS)
        await plain.aclose()
        blocking = aredis.Redis(
            connection_pool=aredis.BlockingConnectionPool.from_url(
                url, max_connections=64, protocol=2
            )
        )
        results["redis_asyncio_blocking"] = await _measure(lambda i: blocking.get(name(i)), READS)
        slow: Any = blocking
    else:
        plain_cluster = aredis.RedisCluster.from_url(url, protocol=2)
        results["redis_asyncio_cluster"] = await _measure(
            lambda i: plain_cluster.get(name(i)), READS
        )
        await plain_cluster.aclose()
        slow = aredis.RedisCluster.from_url(url, protocol=2)  # cachecoord's without its wait
    results.update(await _others(url, cluster, name))
    hot_path: HotPath = fast.hot_path  # type: ignore[union-attr]
    results["hot_path"] = await _measure(
        lambda i: hot_path.execute([name(i)], [("GET", name(i))]), READS
    )
    before = EntryStore(slow, space, generations=False)
    after = EntryStore(fast, space, generations=False)
    results["store_get_redis_py"] = await _measure(lambda i: before.get(keys[i % KEYS]), READS)
    results["store_get_hot"] = await _measure(lambda i: after.get(keys[i % KEYS]), READS)
    # One at a time, as a Get hit in the server mostly is (its event loop is
    # busy with gRPC; Redis answers before the next Get asks): no two
    # commands share a write.
    results["store_get_redis_py_1_in_flight"] = await _measure(
        lambda i: before.get(keys[i % KEYS]), READS // 2, in_flight=1
    )
    results["store_get_hot_1_in_flight"] = await _measure(
        lambda i: after.get(keys[i % KEYS]), READS // 2, in_flight=1
    )

    def batch(i: int) -> list[str]:
        return [keys[(i * 100 + j) % KEYS] for j in range(100)]

    results["store_get_many_redis_py"] = await _measure(
        lambda i: before.get_many(batch(i)), READS * 5, 100
    )
    results["store_get_many_hot"] = await _measure(
        lambda i: after.get_many(batch(i)), READS * 5, 100
    )
    await slow.aclose()
    await fast.aclose()
    if not cluster:
        loop = asyncio.get_running_loop()
        transport, floor = await loop.create_connection(_Floor, "127.0.0.1", port)
        results["protocol_floor"] = await _measure(lambda i: floor.get(name(i)), READS)
        transport.close()
    return results


async def _others(url: str, cluster: bool, name: Callable[[int], str]) -> dict[str, float]:
    results: dict[str, float] = {}
    if cluster:
        return results
    try:
        import coredis  # type: ignore[import-not-found]
    except ImportError:
        print("(coredis not installed: not measured)")
    else:
        client = coredis.Redis.from_url(url)
        async with client:
            results["coredis"] = await _measure(lambda i: client.get(name(i)), READS)
    try:
        import glide  # type: ignore[import-not-found]
    except ImportError:
        print("(valkey-glide not installed: not measured)")
    else:
        host, port = url.split("//")[1].split("/")[0].split(":")
        config = glide.GlideClientConfiguration([glide.NodeAddress(host, int(port))])
        client = await glide.GlideClient.create(config)
        results["valkey_glide"] = await _measure(lambda i: client.get(name(i)), READS)
        await client.close()
    return results


def storage_cost(dump: Path) -> dict[str, float]:
    """Profiled event-loop µs per Get hit in its Redis command (see above)."""
    stats: dict[tuple[str, int, str], tuple[float, ...]]
    stats = pstats.Stats(str(dump)).stats  # type: ignore[attr-defined]

    def inclusive(path: str, name: str, column: int = 3) -> float:
        return sum(v[column] for f, v in stats.items() if f[0].endswith(path) and f[2] == name)

    gets = inclusive("strategies/reads.py", "_hit", column=1)  # one per Get hit
    parts = {
        "store_get": inclusive("storage/redis_store.py", "get"),
        "connection_write": inclusive("storage/pipelined.py", "_write"),
        "connection_read": inclusive("storage/pipelined.py", "data_received"),
    }
    costs = {name: seconds / gets * 1e6 for name, seconds in parts.items()}
    costs["redis_command"] = sum(costs.values())
    return costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_clients", description=__doc__)
    parser.add_argument("--cluster", action="store_true", help="on a private Redis Cluster")
    parser.add_argument("--pstats", type=Path, help="a get-hit-reads.pstats of bench profile")
    args = parser.parse_args(argv)
    if args.pstats is not None:
        for name, us in storage_cost(args.pstats).items():
            print(f"RESULT profiled_{name}_us={us:.1f}")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-redis-clients-") as tmp:
        if args.cluster:
            with RedisCluster(Path(tmp)) as cluster:
                results = uvloop.run(_run(cluster.url, True, 0))
        else:
            with RedisServer(Path(tmp)) as server:
                results = uvloop.run(_run(server.url, False, server.port))
    where = "Redis Cluster (3 primaries)" if args.cluster else "one Redis"
    print(f"client CPU per read, uvloop, {IN_FLIGHT} in flight, {len(VALUE)}-byte values, {where}")
    for way, us in results.items():
        print(f"  {way:<32} {us:7.1f} us")
    suffix = "_cluster" if args.cluster else ""
    for way, us in results.items():
        print(f"RESULT {way}{suffix}_cpu_us={us:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
