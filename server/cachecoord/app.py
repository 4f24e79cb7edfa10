"""Start-up and shutdown order, and the wiring of every component.

Everything the instance opens is entered in one ``AsyncExitStack``, in
dependency order (PostgreSQL, Redis, the outbox, the change listener, the
bus, the flushers, the gRPC servers), so that stopping, or a start-up that
fails half-way, closes it in reverse: the servers drain first, the flushers
drain before Redis goes, the outbox forgets its finished rows before the
pool closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, suppress

import grpc
import psycopg
import psycopg_pool
from grpc_health.v1._async import HealthServicer

from cachecoord import instruments, telemetry
from cachecoord.cache import Cache
from cachecoord.config import ConfigError, Invalidation, Settings, StrategyName
from cachecoord.consistency import Observer
from cachecoord.coordination.locks import Locks
from cachecoord.invalidation.bus import Bus
from cachecoord.invalidation.feed import Feed
from cachecoord.invalidation.listener import ChangeListener
from cachecoord.invalidation.messages import Invalidation as Message
from cachecoord.invalidation.outbox import Outbox
from cachecoord.invalidation.triggers import change_triggers
from cachecoord.invalidation.watch import WatchHub
from cachecoord.rpc import server as rpc_server
from cachecoord.rpc.auth import Authorizer
from cachecoord.rpc.servicer import CacheCoordServicer
from cachecoord.storage import eviction, keys, postgres
from cachecoord.storage.breaker import CircuitBreaker
from cachecoord.storage.consistency_log import ConsistencyLog
from cachecoord.storage.invalidation_log import LogBounds
from cachecoord.storage.keys import KeySpace
from cachecoord.storage.lock_store import LockStore
from cachecoord.storage.redis_store import EntryStore, connect
from cachecoord.storage.tables import open_tables
from cachecoord.strategies import STRATEGIES, Backends, Strategy, StrategyKind
from cachecoord.strategies.flusher import Flusher

# Imported from here by tests and benchmarks (it used to live here).
__all__ = ["App", "StartupError", "change_triggers"]

log = logging.getLogger(__name__)

StartupError = rpc_server.StartupError


class App:
    """One cachecoord instance. ``await start()``, then ``await stop()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.origin = settings.server.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.port = 0
        self.health_port = 0
        self.pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection] | None = None
        self.cache: Cache | None = None
        self.flushers: list[Flusher] = []
        self.listener: ChangeListener | None = None
        self.bus: Bus | None = None
        self.feeds: dict[str, Feed] = {}
        self._opened = AsyncExitStack()

    async def start(self) -> None:
        """Connect to the backends, check the configuration against them, and
        serve. Raises StartupError or ConfigError with a message saying why,
        having closed whatever it had opened."""
        async with AsyncExitStack() as opened:
            await self._start(opened)
            self._opened = opened.pop_all()

    async def stop(self) -> None:
        """Drain: report NOT_SERVING, let in-flight RPCs finish, close the
        rest, newest first."""
        await self._opened.aclose()

    async def _start(self, opened: AsyncExitStack) -> None:
        settings = self.settings
        classes = {name: _strategy(ns.strategy, name) for name, ns in settings.namespaces.items()}
        self.pool = pool = postgres.create_pool(settings.postgres)
        opened.push_async_callback(pool.close)
        try:
            await pool.open(wait=True, timeout=10)
            await postgres.install_schema(pool)
            tables = await open_tables(pool, settings.namespaces)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as err:
            raise StartupError(
                f"cannot use PostgreSQL at {settings.postgres.redacted_url} (postgres.url): {err}"
            ) from None
        client = connect(settings.redis)
        opened.push_async_callback(client.aclose)
        behind = [
            name
            for name, ns in settings.namespaces.items()
            if ns.strategy is StrategyName.WRITE_BEHIND
        ]
        try:
            await eviction.check_write_behind(client, behind)
        except eviction.UnsafeEviction as err:
            raise StartupError(str(err)) from None
        breaker = CircuitBreaker(settings.redis.breaker_failures, settings.redis.breaker_cooldown)
        stores = {
            name: EntryStore(
                client,
                KeySpace(
                    name,
                    classes[name].partitions(ns),
                    write_behind=classes[name].write_behind,
                    sharded=settings.redis.sharded,
                ),
                generations=ns.invalidation is Invalidation.VERSION,
                breaker=breaker,
                log_bounds=LogBounds(ns.log_max_entries, ns.log_max_age),
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
        opened.enter_context(_reporting_state(breaker, strategies))
        locks = Locks(LockStore(client, breaker=breaker))
        self.bus = bus = Bus(settings.redis.url, client=client)
        bus.on(keys.LOCK_CHANNEL, lambda name: locks.on_release_notice(name.decode()))
        bus.on_reset(locks.wake_all)
        watch_hub = WatchHub(max_backlog=settings.server.watch_backlog)
        handlers: list[Callable[[Message], None]] = [watch_hub.publish]
        if settings.server.consistency_sample > 0:
            observer = Observer(
                {name: strategy.reader for name, strategy in strategies.items()},
                ConsistencyLog(client),
                fraction=settings.server.consistency_sample,
                delay=settings.server.consistency_delay / 1000,
            )
            opened.push_async_callback(observer.close)
            handlers.append(observer.saw)
        for name, strategy in strategies.items():
            feed = Feed(
                name,
                strategy.log,
                [strategy.on_message, *handlers],
                on_suspend=strategy.on_suspend,
                on_resume=strategy.on_resume,
                on_lost=[strategy.on_reset, functools.partial(watch_hub.reset, name)],
            )
            self.feeds[name] = feed
            watch_hub.add_source(name, feed)
            for channel in strategy.channels:
                bus.on(channel, _decoded(feed.receive))
            bus.on_drop(feed.suspend)
            bus.on_subscribed(feed.catch_up)
        self.cache = Cache(strategies, settings.server, watch_hub)
        servicer = CacheCoordServicer(
            self.cache,
            locks,
            default_timeout=settings.server.default_deadline / 1000,
            watch_heartbeat=settings.server.watch_heartbeat / 1000,
            authorizer=Authorizer(settings.auth.tokens) if settings.auth.enabled else None,
        )
        server, health, self.port = rpc_server.build(servicer, settings.server, settings.tls)
        health_server = None
        if settings.server.health_listen:
            health_server, self.health_port = rpc_server.build_health(
                health, settings.server.health_listen
            )
        await opened.enter_async_context(outbox)
        self.listener = ChangeListener(settings.postgres.url, outbox.wake)
        await opened.enter_async_context(self.listener)
        await opened.enter_async_context(bus)
        # Serve once subscribed, so the first reads already get invalidations
        # (if Redis is down, serve anyway: reads fall back to PostgreSQL).
        with suppress(TimeoutError):
            await asyncio.wait_for(bus.subscribed.wait(), 2.0)
        grace = settings.server.shutdown_grace / 1000
        for strategy in strategies.values():
            if (flusher := strategy.flusher(consumer=self.origin)) is not None:
                await flusher.open()
                self.flushers.append(flusher)
                opened.push_async_callback(flusher.close, grace)
        await server.start()
        if health_server is not None:
            await health_server.start()
        opened.push_async_callback(_drain, server, health, health_server, grace)
        await rpc_server.set_serving(health, True)
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
        if self.health_port:
            log.info("plaintext grpc.health.v1 on port %d", self.health_port)
        if auth.enabled:
            log.info("bearer tokens required: %s", ", ".join(t.name for t in auth.tokens))
            if not tls.enabled:
                log.warning(
                    "auth is on without TLS: bearer tokens cross the network in clear text; "
                    "set [tls] cert_file and key_file"
                )


async def _drain(
    server: grpc.aio.Server,
    health: HealthServicer,
    health_server: grpc.aio.Server | None,
    grace: float,
) -> None:
    """Report NOT_SERVING, then let in-flight RPCs finish within *grace* seconds."""
    await health.enter_graceful_shutdown()
    await server.stop(grace)
    if health_server is not None:  # after the drain, which it reports
        await health_server.stop(0)


@contextlib.contextmanager
def _reporting_state(breaker: CircuitBreaker, strategies: dict[str, Strategy]) -> Iterator[None]:
    """Export the breaker's state and the near caches' sizes as metrics, while open."""

    def breaker_open() -> bool:
        return breaker.is_open

    def near_cache_sizes() -> Iterator[tuple[str, int]]:
        for name, strategy in strategies.items():
            if (size := strategy.near_cache_size()) is not None:
                yield name, size

    instruments.watch_breaker(breaker_open)
    instruments.watch_near_caches(near_cache_sizes)
    try:
        yield
    finally:
        instruments.unwatch(breaker_open)
        instruments.unwatch(near_cache_sizes)


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
