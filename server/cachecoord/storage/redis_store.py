"""Redis access for one namespace's cache entries: reads, leased fills,
invalidation and version-guarded stores, as Lua scripts.

Each script touches the keys of a single entry and its partition's
invalidation log (one hash tag, see keys.py), so all of them stay valid on
Redis Cluster. Every script that makes a change appends it to the log and
publishes it (ANNOUNCE, invalidation_log.py). Scripts are registered once;
redis-py sends them by SHA and reloads them on NOSCRIPT. With
``invalidation = "version"`` the entry lives under its key's current
generation, and invalidating bumps the generation instead of deleting: old
entries become unreachable at once and are left to expire.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, cast

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, PipelineCommand
from redis.exceptions import AskError, MovedError
from redis.exceptions import ConnectionError as RedisConnectionError

from cachecoord.config import RedisSettings
from cachecoord.storage.breaker import CircuitBreaker
from cachecoord.storage.breaker import guarded as _guarded
from cachecoord.storage.hot_path import REROUTE, HotPath, PipelinedRedis
from cachecoord.storage.invalidation_log import InvalidationLog, LogBounds
from cachecoord.storage.keys import TAG_CLOCK, KeySpace
from cachecoord.storage.pipelined import Command
from cachecoord.storage.scripts import (
    DROP_IF_CLEAN,
    FILL,
    FILL_GENERATION,
    GET_GENERATION,
    INVALIDATE,
    INVALIDATE_GENERATION,
    INVALIDATE_TAGS,
    LEASE,
    LEASE_GENERATION,
    START_TAG_CLOCK,
    STORE,
    STORE_GENERATION,
)
from cachecoord.storage.waiting_cluster import WaitingRedisCluster

Client = redis.Redis | redis.RedisCluster
"""A single Redis or a Redis Cluster (``redis.cluster``)."""


def connect(settings: RedisSettings) -> Client:
    """A client over a *blocking* pool: a burst waits up to pool_timeout for a
    connection instead of failing at once. RESP2 is chosen explicitly so reply
    types do not change with redis-py's default protocol.

    With ``cluster``, a :class:`redis.asyncio.RedisCluster` that discovers the
    nodes from the one in the URL, follows MOVED/ASK and reloads scripts on
    NOSCRIPT; its callers wait for a connection as well (waiting_cluster.py).

    Either client carries a :class:`HotPath`: pipelined connections for the
    hot read commands of :class:`EntryStore` (hot_path.py)."""
    if settings.cluster:
        return WaitingRedisCluster.from_url(
            settings.url,
            max_connections=settings.max_connections,
            pool_timeout=settings.pool_timeout / 1000,
            socket_timeout=settings.socket_timeout / 1000,
            socket_connect_timeout=settings.socket_timeout / 1000,
            protocol=2,
        )
    pool = redis.BlockingConnectionPool.from_url(
        settings.url,
        max_connections=settings.max_connections,
        timeout=settings.pool_timeout / 1000,
        socket_timeout=settings.socket_timeout / 1000,
        socket_connect_timeout=settings.socket_timeout / 1000,
        protocol=2,
    )
    return PipelinedRedis(connection_pool=pool)


async def queue_script(pipe: Any, script: Any, keys: list[Any], args: list[Any]) -> None:
    """Add a run of *script* to the (non-transactional) pipeline *pipe*.

    A cluster pipeline routes each command by its first key but does not load
    scripts nor retry on NOSCRIPT, so there the script goes as EVAL with its
    text (Redis caches it); a plain pipeline sends EVALSHA and loads it first."""
    if isinstance(pipe, ClusterPipeline):
        # Not awaited: awaiting a ClusterPipeline (re)initializes it, emptying its queue.
        pipe.eval(script.script, len(keys), *keys, *args)
    else:
        await script(keys=keys, args=args, client=pipe)


async def _on_node(
    client: redis.RedisCluster, node: ClusterNode, commands: list[PipelineCommand]
) -> None:
    """Send *commands* over one connection of *node* (in turn, as every call)."""
    sent = node.execute_pipeline(commands)
    try:
        await (client.in_turn(sent) if isinstance(client, WaitingRedisCluster) else sent)
    except (AttributeError, OSError) as err:
        # The node's connections were closed under this call (a topology
        # refresh during a failover): redis-py's node API then fails on the
        # closed socket instead of raising its own ConnectionError.
        raise RedisConnectionError(f"connection to {node.name} lost: {err}") from err


class EntryStore:
    """One namespace's entries in Redis."""

    def __init__(
        self,
        client: Client,
        keyspace: KeySpace,
        *,
        generations: bool,
        breaker: CircuitBreaker | None = None,
        log_bounds: LogBounds | None = None,
    ) -> None:
        self.client = client
        self.cluster = isinstance(client, redis.RedisCluster)
        self.breaker = breaker or CircuitBreaker(failures=5, cooldown_ms=1000)
        self.keys = keyspace
        self.generations = generations
        self.log = InvalidationLog(
            client, keyspace, log_bounds or LogBounds(), breaker=self.breaker
        )
        self._hot_path: HotPath | None = getattr(client, "hot_path", None)
        register = client.register_script
        self._drop_if_clean = register(DROP_IF_CLEAN)
        self._invalidate_tags = register(INVALIDATE_TAGS)
        self._start_tag_clock = register(START_TAG_CLOCK)
        self._get: Any = None
        if generations:
            self._get = register(GET_GENERATION)
            self._lease = register(LEASE_GENERATION)
            self._fill = register(FILL_GENERATION)
            self._invalidate = register(INVALIDATE_GENERATION)
            self._store = register(STORE_GENERATION)
        else:
            self._lease = register(LEASE)
            self._fill = register(FILL)
            self._invalidate = register(INVALIDATE)
            self._store = register(STORE)
        if self._hot_path is not None:
            for script in (self._get, self._lease, self._fill):
                if script is not None:
                    self._hot_path.register(script)

    def _entry_keys(self, key: str) -> tuple[list[str], list[Any]]:
        """KEYS and leading ARGV of the scripts for *key*."""
        if self.generations:
            return [self.keys.generation(key), self.keys.lease(key)], [self.keys.value(key)]
        return [self.keys.value(key), self.keys.lease(key)], []

    def _change_keys(self, key: str) -> tuple[list[str], list[Any]]:
        """KEYS and leading ARGV of the scripts that change *key* (and announce it)."""
        keys, args = self._entry_keys(key)
        return [*keys, self.keys.log(key)], args

    def _announce_args(self, key: str) -> list[int]:
        return self.log.announce_args(self.keys.partition(key))

    def _channel(self, key: str) -> str:
        """The channel the changes of *key* are published on."""
        return self.keys.channel_of(self.keys.partition(key))

    async def get(self, key: str) -> bytes | None:
        if self.generations:
            return await self._get_generation(key)
        return await self._get_value(self.keys.value(key))

    async def _hot(
        self,
        keys: Sequence[str],
        commands: Sequence[Command],
        fallback: Callable[[int], Awaitable[Any]],
    ) -> list[Any]:
        """Replies of *commands* over the hot path (see hot_path.py), the
        first error reply raised; ``fallback(i)`` sends ``commands[i]``
        through redis-py where the hot path cannot."""
        assert self._hot_path is not None
        replies = await self._hot_path.execute(keys, commands)
        if type(replies) is list:
            return replies
        rerouted = [i for i, reply in enumerate(replies) if reply is REROUTE]
        if rerouted:
            again = await asyncio.gather(*(fallback(i) for i in rerouted))
            for i, reply in zip(rerouted, again, strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return list(replies)

    def _script_command(self, script: Any, keys: list[str], args: list[Any]) -> Command:
        return ("EVALSHA", script.sha, len(keys), *keys, *args)

    @_guarded
    async def _get_value(self, name: str) -> bytes | None:
        if self._hot_path is None:
            return cast("bytes | None", await self.client.get(name))
        replies = await self._hot([name], [("GET", name)], lambda _: self.client.get(name))
        return cast("bytes | None", replies[0])

    @_guarded
    async def _get_generation(self, key: str) -> bytes | None:
        keys, args = self._entry_keys(key)
        if self._hot_path is None:
            return cast("bytes | None", await self._get(keys=keys, args=args))
        replies = await self._hot(
            keys[:1],
            [self._script_command(self._get, keys, args)],
            lambda _: self._get(keys=keys, args=args),
        )
        return cast("bytes | None", replies[0])

    @_guarded
    async def read(self, key: str) -> tuple[bytes | None, int]:
        """*key*'s cached value and the namespace's tag clock, in one round
        trip: one MGET on a single Redis; on a cluster (other slots) or with
        generations (a script), two pipelined commands."""
        clock_key = self.keys.tag_clock
        if self._hot_path is None:
            raws, clock = await self._read_many_plain([key])
            return raws[0], clock
        if not self.generations and not self.cluster:
            name = self.keys.value(key)
            replies = await self._hot(
                [name], [("MGET", name, clock_key)], lambda _: self.client.mget(name, clock_key)
            )
            raw, clock = replies[0]
            return raw, int(clock or 0)
        raws, clock = await self._read_many_hot([key])
        return raws[0], clock

    async def read_many(self, key_list: Sequence[str]) -> tuple[list[bytes | None], int]:
        """The cached values of *key_list* and the namespace's tag clock, in
        one round trip where the hot path serves them (one per node)."""
        if self._hot_path is None or not key_list:
            return await self._read_many_plain(key_list)
        return await self._read_many_hot(key_list)

    async def _read_many_plain(self, key_list: Sequence[str]) -> tuple[list[bytes | None], int]:
        clock, raws = await asyncio.gather(self.tag_clock(), self.get_many(key_list))
        return raws, clock

    @_guarded
    async def _read_many_hot(self, key_list: Sequence[str]) -> tuple[list[bytes | None], int]:
        clock_key = self.keys.tag_clock
        names = [self.keys.value(k) for k in key_list]
        if not self.generations and not self.cluster:
            replies = await self._hot(
                names[:1],
                [("MGET", *names, clock_key)],
                lambda _: self.client.mget(*names, clock_key),
            )
            *raws, clock = replies[0]
            return raws, int(clock or 0)
        if self.generations:
            calls = [self._entry_keys(key) for key in key_list]
            routes = [keys[0] for keys, _ in calls]
            commands = [self._script_command(self._get, keys, args) for keys, args in calls]

            def fetch(i: int) -> Awaitable[Any]:
                keys, args = calls[i]
                return self._get(keys=keys, args=args)  # type: ignore[no-any-return]

        else:  # keys of a batch live in many slots: a GET each, grouped by node
            routes, commands = names, [("GET", name) for name in names]

            def fetch(i: int) -> Awaitable[Any]:
                return self.client.get(names[i])

        last = len(commands)
        replies = await self._hot(
            [*routes, clock_key],
            [*commands, ("GET", clock_key)],
            lambda i: self.client.get(clock_key) if i == last else fetch(i),
        )
        return cast("list[bytes | None]", replies[:last]), int(replies[last] or 0)

    @_guarded
    async def tag_clock(self) -> int:
        """The namespace's tag clock (0: no tag was ever invalidated)."""
        return int(await self.client.get(self.keys.tag_clock) or 0)

    @_guarded
    async def started_tag_clock(self) -> int:
        """The namespace's tag clock, started if it is not there (see
        START_TAG_CLOCK): what a value about to be read or written records."""
        keys = [self.keys.tag_clock, self.keys.tags]
        return int(await self._start_tag_clock(keys=keys, args=[]))

    @_guarded
    async def tag_marks(self, tags: Sequence[str]) -> tuple[int, list[int]]:
        """The tag clock as the marks hash last saw it, and the clock value at
        which each of *tags* was last invalidated (0: never)."""
        marks = await self.client.hmget(self.keys.tags, [TAG_CLOCK, *tags])
        recorded, *rest = (int(mark or 0) for mark in marks)
        return recorded, rest

    @_guarded
    async def invalidate_tags(self, messages: dict[str, bytes]) -> int:
        """Move the tag clock, mark each tag of ``tag -> message`` invalidated
        at the new clock value (from then on no read serves a value carrying
        it), then announce each message in the log of the tag's partition
        (one is enough: a reader that resumes reads every partition); returns
        the clock."""
        keys = [self.keys.tag_clock, self.keys.tags]
        clock = int(await self._invalidate_tags(keys=keys, args=list(messages)))
        for tag, message in messages.items():
            await self.log.announce(self.keys.partition(tag), message)
        return clock

    @_guarded
    async def get_many(self, key_list: Sequence[str]) -> list[bytes | None]:
        if self._hot_path is not None and key_list:
            return await self._get_many_hot(key_list)
        if not self.generations:
            names = [self.keys.value(k) for k in key_list]
            if isinstance(self.client, redis.RedisCluster):
                # Keys of a batch live in many slots: MGET per slot, in one pipeline.
                raws = await self.client.mget_nonatomic(names)
            else:
                raws = await self.client.mget(names)
            return cast("list[bytes | None]", raws)
        async with self.client.pipeline(transaction=False) as pipe:
            for key in key_list:
                keys, args = self._entry_keys(key)
                await queue_script(pipe, self._get, keys, args)
            return cast("list[bytes | None]", await pipe.execute())

    async def _get_many_hot(self, key_list: Sequence[str]) -> list[bytes | None]:
        if not self.generations:
            names = [self.keys.value(k) for k in key_list]
            if not self.cluster:
                replies = await self._hot(
                    names[:1], [("MGET", *names)], lambda _: self.client.mget(names)
                )
                return cast("list[bytes | None]", replies[0])
            # Keys of a batch live in many slots: a GET each, grouped by node.
            return await self._hot(
                names, [("GET", name) for name in names], lambda i: self.client.get(names[i])
            )
        calls = [self._entry_keys(key) for key in key_list]
        return await self._hot(
            [keys[0] for keys, _ in calls],
            [self._script_command(self._get, keys, args) for keys, args in calls],
            lambda i: self._get(keys=calls[i][0], args=calls[i][1]),
        )

    @_guarded
    async def take_leases(
        self, tokens: dict[str, str], lease_ms: int, *, even_if_cached: bool = False
    ) -> dict[str, bytes | bool]:
        """Try to take the lease of each missing key: True where this caller got
        it, False where another holds it, the value where the key is cached
        after all (unless *even_if_cached*)."""
        calls = []
        for key, token in tokens.items():
            keys, args = self._entry_keys(key)
            calls.append((keys, [*args, token, int(lease_ms), int(even_if_cached)]))
        if self._hot_path is not None and calls:
            results = await self._hot(
                [keys[0] for keys, _ in calls],
                [self._script_command(self._lease, keys, args) for keys, args in calls],
                lambda i: self._lease(keys=calls[i][0], args=calls[i][1]),
            )
        else:
            async with self.client.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    await queue_script(pipe, self._lease, keys, args)
                results = await pipe.execute()
        return {
            key: result if isinstance(result, bytes) else bool(result)
            for key, result in zip(tokens, results, strict=True)
        }

    @_guarded
    async def fill_many(self, fills: dict[str, tuple[str, bytes, int, bytes]]) -> dict[str, bool]:
        """Store each ``key -> (lease token, envelope, px, notice)`` if its lease
        still holds, and publish the notice."""
        if not fills:
            return {}
        calls = []
        for key, (token, envelope, px, notice) in fills.items():
            keys, args = self._entry_keys(key)
            channel = self.keys.channel_of(self.keys.partition(key))
            calls.append((keys, [*args, token, envelope, px, channel, notice]))
        if self._hot_path is not None:
            results = await self._hot(
                [keys[0] for keys, _ in calls],
                [self._script_command(self._fill, keys, args) for keys, args in calls],
                lambda i: self._fill(keys=calls[i][0], args=calls[i][1]),
            )
        else:
            async with self.client.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    await queue_script(pipe, self._fill, keys, args)
                results = await pipe.execute()
        return {key: bool(ok) for key, ok in zip(fills, results, strict=True)}

    @_guarded
    async def invalidate(self, messages: dict[str, bytes]) -> int:
        """Drop (or, in generation mode, retire) the entries and leases of
        ``key -> message`` and publish each message; returns how many cached
        values were dropped."""
        if not messages:
            return 0
        async with self.client.pipeline(transaction=False) as pipe:
            for key, message in messages.items():
                keys, args = self._change_keys(key)
                await queue_script(
                    pipe,
                    self._invalidate,
                    keys,
                    [*args, self._channel(key), message, *self._announce_args(key)],
                )
            return sum(int(n) for n in await pipe.execute())

    @_guarded
    async def store(self, key: str, envelope: bytes, px: int, version: int, message: bytes) -> bool:
        """Cache a freshly written value unless a newer version is already cached."""
        keys, args = self._change_keys(key)
        stored = await self._store(
            keys=keys,
            args=[
                *args,
                envelope,
                px,
                version,
                self._channel(key),
                message,
                *self._announce_args(key),
            ],
        )
        return bool(stored)

    @_guarded
    async def run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run another Lua script of this namespace (e.g. write-behind's)."""
        return await script(keys=keys, args=args)

    @_guarded
    async def run_and_wait(
        self, script: Any, keys: list[str], args: list[Any], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]:
        """Run *script*, then WAIT for *replicas* on the same connection (WAIT
        covers only the writes of its own connection); returns the script's
        reply and how many replicas acknowledged."""
        client = self.client
        # WAIT must give up before the socket times out: a timeout would count
        # as Redis failing (the breaker), while a primary without replicas is up.
        kwargs = (
            client.connection_kwargs
            if isinstance(client, redis.RedisCluster)
            else client.connection_pool.connection_kwargs
        )
        if socket_timeout := kwargs.get("socket_timeout"):
            timeout_ms = max(1, min(timeout_ms, int(socket_timeout * 1000 * 0.8)))
        if not isinstance(client, redis.RedisCluster):
            async with client.pipeline(transaction=False) as pipe:
                await queue_script(pipe, script, keys, args)
                pipe.wait(replicas, timeout_ms)
                replies = await pipe.execute()
            return replies[0], int(replies[1])
        await client.initialize()
        for attempt in range(2):
            node = client.get_node_from_key(keys[0])
            if node is None:
                raise RedisConnectionError(f"no node serves the slot of {keys[0]!r}")
            commands = [
                PipelineCommand(0, "EVAL", script.script, len(keys), *keys, *args),
                PipelineCommand(1, "WAIT", replicas, timeout_ms),
            ]
            try:
                await _on_node(client, node, commands)
            except RedisConnectionError:
                if attempt:
                    raise
                await client.nodes_manager.initialize()  # a failover, probably
                continue
            reply: Any = commands[0].result
            acked: Any = commands[1].result
            if isinstance(reply, AskError | MovedError) and not attempt:
                await client.nodes_manager.initialize()  # the slot moved
                continue
            for result in (reply, acked):
                if isinstance(result, Exception):
                    raise result
            return reply, int(acked)
        raise AssertionError("unreachable")

    @_guarded
    async def drop_namespace(self, message: bytes) -> int:
        """Delete every cached entry of the namespace (SCAN, never KEYS) but
        unflushed write-behind values and generation counters (no TTL), then
        announce *message* in every partition's log. On a cluster, scan_iter
        walks every primary in turn."""
        dropped = 0
        for pattern in self.keys.scan_patterns:
            async for batch in _batches(self.client.scan_iter(match=pattern, count=1000)):
                async with self.client.pipeline(transaction=False) as pipe:
                    for name in batch:
                        await queue_script(pipe, self._drop_if_clean, [name], [])
                    dropped += sum(int(n) for n in await pipe.execute())
        await self.log.announce_all(message)
        return dropped


async def _batches(iterator: AsyncIterator[bytes], size: int = 500) -> AsyncIterator[list[bytes]]:
    batch: list[bytes] = []
    async for item in iterator:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
