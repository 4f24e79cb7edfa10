"""Start-up and shutdown order, and the wiring of every component."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import suppress
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import psycopg
import psycopg_pool
import redis.asyncio as redis
from grpc_health.v1._async import HealthServicer
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from redis.exceptions import RedisClusterException, RedisError

from cachecoord import instruments, telemetry
from cachecoord.cache import Cache
from cachecoord.config import ConfigError, Invalidation, Kind, Settings, StrategyName
from cachecoord.coordination.locks import Locks
from cachecoord.invalidation import triggers
from cachecoord.invalidation.bus import Bus
from cachecoord.invalidation.listener import ChangeListener
from cachecoord.invalidation.messages import Invalidation as Message
from cachecoord.invalidation.outbox import Outbox
from cachecoord.invalidation.watch import WatchHub
from cachecoord.rpc import server as rpc_server
from cachecoord.rpc.auth import Authorizer
from cachecoord.rpc.servicer import CacheCoordServicer
from cachecoord.storage import keys, postgres
from cachecoord.storage.breaker import CircuitBreaker
from cachecoord.storage.keys import KeySpace
from cachecoord.storage.lock_store import LockStore
from cachecoord.storage.redis_store import EntryStore, connect
from cachecoord.storage.tables import ManagedTable, MappedTable, Table
from cachecoord.strategies import STRATEGIES, Backends, Strategy, StrategyKind
from cachecoord.strategies.flusher import Flusher

log = logging.getLogger(__name__)

StartupError = rpc_server.StartupError


class App:
    """One cachecoord instance. ``await start()``, then ``await stop()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.origin = settings.server.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.port = 0
        self.pool: AsyncConnectionPool[AsyncConnection] | None = None
        self.cache: Cache | None = None
        self.flushers: list[Flusher] = []
        self.listener: ChangeListener | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._server: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port = 0
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Connect to the backends, check the configuration against them, and
        serve. Raises StartupError or ConfigError with a message saying why,
        having closed whatever it had opened."""
        try:
            await self._start()
        except BaseException:
            await self._close()
            raise

    async def _start(self) -> None:
        settings = self.settings
        classes = {name: _strategy(ns.strategy, name) for name, ns in settings.namespaces.items()}
        self.pool = pool = postgres.create_pool(settings.postgres)
        self._closers.append(pool.close)
        try:
            await pool.open(wait=True, timeout=10)
            await postgres.install_schema(pool)
            tables = await self._tables(pool)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as err:
            raise StartupError(
                f"cannot use PostgreSQL at {_redact(settings.postgres.url)} (postgres.url): {err}"
            ) from None
        client = connect(settings.redis)
        self._closers.append(client.aclose)
        await self._check_eviction_policy(client)
        breaker = CircuitBreaker(settings.redis.breaker_failures, settings.redis.breaker_cooldown)
        stores = {
            name: EntryStore(
                client,
                KeySpace(name, classes[name].partitions(ns)),
                generations=ns.invalidation is Invalidation.VERSION,
                breaker=breaker,
            )
            for name, ns in settings.namespaces.items()
        }
        outbox = Outbox(
            pool, stores, origin=self.origin, interval_ms=settings.postgres.outbox_interval
        )
        backends = Backends(pool=pool, outbox=outbox, origin=self.origin)
        strategies: dict[str, Strategy] = {
            name: classes[name](ns, tables[name], stores[name], backends)
            for name, ns in settings.namespaces.items()
        }
        self._report_state(breaker, strategies)
        locks = Locks(LockStore(client, breaker=breaker))
        bus = Bus(
            settings.redis.url, cluster=client if isinstance(client, redis.RedisCluster) else None
        )
        bus.on(keys.LOCK_CHANNEL, lambda name: locks.on_release_notice(name.decode()))
        bus.on_reset(locks.wake_all)
        watch_hub = WatchHub(max_backlog=settings.server.watch_backlog)
        for strategy in strategies.values():
            bus.on(strategy.channel, _decoded(strategy.on_message, watch_hub.publish))
            bus.on_reset(strategy.on_reset)
        bus.on_reset(watch_hub.reset)
        self.cache = Cache(strategies, settings.server, watch_hub)
        servicer = CacheCoordServicer(
            self.cache,
            locks,
            default_timeout=settings.server.default_deadline / 1000,
            watch_heartbeat=settings.server.watch_heartbeat / 1000,
            authorizer=Authorizer(settings.auth.tokens) if settings.auth.enabled else None,
        )
        self._server, self._health, self.port = rpc_server.build(
            servicer, settings.server, settings.tls
        )
        if settings.server.health_listen:
            self._health_server, self.health_port = rpc_server.build_health(
                self._health, settings.server.health_listen
            )
        await outbox.open()
        self._closers.append(outbox.close)
        self.listener = ChangeListener(settings.postgres.url, outbox.wake)
        await self.listener.open()
        self._closers.append(self.listener.close)
        await bus.open()
        self._closers.append(bus.close)
        # Serve once subscribed, so the first reads already get invalidations
        # (if Redis is down, serve anyway: reads fall back to PostgreSQL).
        with suppress(TimeoutError):
            await asyncio.wait_for(bus.subscribed.wait(), 2.0)
        grace = settings.server.shutdown_grace / 1000
        for strategy in strategies.values():
            if (flusher := strategy.flusher(consumer=self.origin)) is not None:
                await flusher.open()
                self.flushers.append(flusher)
                self._closers.append(partial(flusher.close, grace))
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
        await rpc_server.set_serving(self._health, True)
        self._log_security()
        log.info(
            "cachecoord %s serving on port %d, namespaces: %s",
            self.origin,
            self.port,
            ", ".join(self.cache.namespaces) or "(none)",
        )

    def _log_security(self) -> None:
        """Say how the port is protected (token names only, never tokens)."""
        tls, auth = self.settings.tls, self.settings.auth
        if tls.client_ca_file:
            log.info("TLS on port %d, client certificates required (mTLS)", self.port)
        elif tls.enabled:
            log.info("TLS on port %d", self.port)
        if self._health_server is not None:
            log.info("plaintext grpc.health.v1 on port %d", self.health_port)
        if auth.enabled:
            log.info("bearer tokens required: %s", ", ".join(t.name for t in auth.tokens))
            if not tls.enabled:
                log.warning(
                    "auth is on without TLS: bearer tokens cross the network in clear text; "
                    "set [tls] cert_file and key_file"
                )

    async def stop(self) -> None:
        """Drain: report NOT_SERVING, let in-flight RPCs finish, close backends."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.settings.server.shutdown_grace / 1000)
        if self._health_server is not None:  # after the drain, which it reports
            await self._health_server.stop(0)
        await self._close()
        self._stopped.set()

    async def _close(self) -> None:
        """Close what was opened, newest first (flushers drain before Redis goes)."""
        closers, self._closers = self._closers, []
        for close in reversed(closers):
            await close()

    def _report_state(self, breaker: CircuitBreaker, strategies: dict[str, Strategy]) -> None:
        """Export the breaker's state and the near caches' sizes as metrics,
        until the instance stops."""

        def breaker_open() -> bool:
            return breaker.is_open

        def near_cache_sizes() -> Iterator[tuple[str, int]]:
            for name, strategy in strategies.items():
                if (size := strategy.near_cache_size()) is not None:
                    yield name, size

        instruments.watch_breaker(breaker_open)
        instruments.watch_near_caches(near_cache_sizes)

        async def unwatch() -> None:
            instruments.unwatch(breaker_open)
            instruments.unwatch(near_cache_sizes)

        self._closers.append(unwatch)

    async def _check_eviction_policy(self, client: redis.Redis | redis.RedisCluster) -> None:
        """Refuse write-behind under an allkeys-* policy: Redis could evict a
        value not yet flushed to PostgreSQL, losing an acknowledged write."""
        behind = [
            name
            for name, ns in self.settings.namespaces.items()
            if ns.strategy is StrategyName.WRITE_BEHIND
        ]
        if not behind:
            return
        try:
            if isinstance(client, redis.RedisCluster):
                # Every primary has its own setting (CONFIG GET may be refused by
                # managed clusters: then only the warning below).
                replies: Any = await client.config_get(
                    "maxmemory-policy", target_nodes=redis.RedisCluster.PRIMARIES
                )
                if "maxmemory-policy" in replies:  # a cluster of one primary
                    replies = {"": replies}
                policies = [r.get("maxmemory-policy", "") for r in replies.values()]
            else:
                policies = [
                    (await client.config_get("maxmemory-policy")).get("maxmemory-policy", "")
                ]
        except (RedisError, RedisClusterException) as err:
            log.warning(
                "cannot read Redis maxmemory-policy (%s); make sure it is not allkeys-*", err
            )
            return
        for raw in policies:
            policy = raw.decode() if isinstance(raw, bytes) else str(raw)
            if not policy.startswith("allkeys"):
                continue
            raise StartupError(
                f"Redis maxmemory-policy is {policy!r}: it may evict write-behind values not yet "
                f"written to PostgreSQL (namespaces {', '.join(behind)}). Set it to noeviction or "
                "volatile-lru (queued values have no TTL, so volatile-* never evicts them)"
            )

    async def _tables(self, pool: AsyncConnectionPool[AsyncConnection]) -> dict[str, Table]:
        tables: dict[str, Table] = {}
        async with pool.connection() as conn:
            for name, ns in self.settings.namespaces.items():
                if ns.kind is Kind.MAPPED:
                    tables[name] = await MappedTable.introspect(conn, ns)
                else:
                    tables[name] = ManagedTable(name)
        return tables


def _strategy(name: StrategyName, namespace: str) -> StrategyKind:
    strategy = STRATEGIES.get(name)
    if strategy is None:
        raise ConfigError(
            f"namespaces.{namespace}.strategy: {name.value!r} is not available in this version; "
            f"use one of {', '.join(s.value for s in STRATEGIES)}"
        )
    return strategy


def _decoded(*handlers: Callable[[Message], None]) -> Callable[[bytes], None]:
    def handle(raw: bytes) -> None:
        try:
            message = Message.decode(raw)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed invalidation message: %.200r", raw)
            return
        for handler in handlers:
            handler(message)
        if telemetry.METRICS:
            attributes = {"cache.namespace": message.namespace, "cache.reason": message.reason}
            instruments.invalidations_received.add(1, attributes)
            if message.at > 0:  # applied here (near cache, Watch) just now
                delay = max(0.0, time.time() - message.at)
                instruments.propagation_delay.record(delay, attributes)

    return handle


def _redact(url: str) -> str:
    """The URL without its password, for messages (secrets are never logged)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


async def change_triggers(settings: Settings, namespace: str, action: str) -> str:
    """Install or uninstall the change triggers of mapped *namespace*."""
    ns = settings.namespaces.get(namespace)
    if ns is None or ns.kind is not Kind.MAPPED:
        mapped = [n for n, s in settings.namespaces.items() if s.kind is Kind.MAPPED]
        raise ConfigError(
            f"{namespace!r} is not a mapped namespace of this configuration; mapped namespaces: "
            + (", ".join(mapped) or "(none)")
        )
    try:
        async with await psycopg.AsyncConnection.connect(settings.postgres.url) as conn:
            await postgres.install_schema_on(conn)
            table = (await MappedTable.introspect(conn, ns)).table
            if action == "install":
                await triggers.install(conn, ns, table)
            else:
                await triggers.uninstall(conn, ns, table)
            await conn.commit()
    except psycopg.Error as err:
        raise ConfigError(
            f"cannot use PostgreSQL at {_redact(settings.postgres.url)} (postgres.url): {err}"
        ) from None
    done = "installed on" if action == "install" else "removed from"
    return f"change triggers of namespace {namespace!r} {done} table {ns.table!r}"


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    app = App(settings)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await app.stop()
