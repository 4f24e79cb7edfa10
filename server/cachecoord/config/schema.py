"""The settings: frozen dataclasses, a docstring under each field and its
bound beside it (``metadata=``, checked by :func:`cachecoord.config.rules.check`).
Rules that involve several fields are each class's ``problems()``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cachecoord.config.rules import HOST_PORT_RE, at_least, between, host_port, positive, prefixed
from cachecoord.config.values import (
    Action,
    Duration,
    Invalidation,
    Kind,
    QueueFull,
    StrategyName,
)
from cachecoord.storage.tag_templates import BadTemplate, TagTemplate


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen: str = field(
        default="127.0.0.1:50051",
        metadata=host_port(lambda value: f"{value!r} is not host:port, e.g. 127.0.0.1:50051"),
    )
    """host:port of the gRPC listener."""
    instance_id: str = ""
    """Name of this instance in invalidation messages; default host-pid."""
    shutdown_grace: Duration = Duration(10_000)
    """How long in-flight RPCs get to finish on SIGTERM."""
    default_deadline: Duration = field(default=Duration(5_000), metadata=positive())
    """Deadline applied to backend calls of an RPC that came without one."""
    max_key_bytes: int = field(default=512, metadata=between(1, 65_536))
    """Longest accepted key (UTF-8 bytes)."""
    max_value_bytes: int = field(default=1_048_576, metadata=between(1, 64 * 1024 * 1024))
    """Largest accepted value."""
    max_batch_keys: int = field(default=1000, metadata=between(1, 100_000))
    """Most keys in one BatchGet or Invalidate."""
    max_connection_age: Duration = Duration(300_000)
    """Clients reconnect after this long (grpc.max_connection_age_ms), so load
    spreads over instances added behind a load balancer."""
    max_connection_age_grace: Duration = field(
        default=Duration(30_000), metadata=at_least(200, fix='must be at least "200ms"')
    )
    """Calls still open on a connection past max_connection_age get this long
    before it is closed under them (grpc.max_connection_age_grace_ms): Watch
    streams then reconnect (with a RESET); HoldLock streams hand their lock
    off to a new stream every half of this, before that can happen."""
    lock_first_message_timeout: Duration = field(default=Duration(10_000), metadata=positive())
    """A HoldLock stream whose first message (acquire or resume) does not come
    within this long ends with INVALID_ARGUMENT."""
    reuse_port: bool = False
    """Share the port with other processes (SO_REUSEPORT); set by --workers."""
    watch_heartbeat: Duration = field(default=Duration(10_000), metadata=positive())
    """Quiet time after which a Watch stream gets a heartbeat."""
    watch_backlog: int = field(default=10_000, metadata=between(1, 1_000_000))
    """Events a Watch stream may have unread before it gets a RESET instead."""
    health_listen: str = field(
        default="",
        metadata=host_port(
            lambda value: (
                f"{value!r} is not host:port, "
                'e.g. 127.0.0.1:50052 (or "" for no separate health port)'
            ),
            when=lambda server: bool(server.health_listen),
        ),
    )
    """host:port of a second, plaintext listener that serves only grpc.health.v1,
    so that probes work while the main port requires TLS (or client
    certificates); empty: health is served on the main port only."""
    consistency_sample: float = field(
        default=0.0, metadata=between(0, 1, fix="must be between 0 (off) and 1")
    )
    """Fraction of the changes this instance hears of that the consistency
    observer reads back after consistency_delay; 0: off."""
    consistency_delay: Duration = field(default=Duration(5_000), metadata=positive())
    """How long after a change the observer checks it: the staleness bound
    being measured."""

    def problems(self) -> Iterator[tuple[str, str]]:
        health = HOST_PORT_RE.fullmatch(self.health_listen)
        if health and self.health_listen == self.listen and int(health[2]) != 0:
            yield (
                "health_listen",
                f"{self.health_listen!r} is server.listen itself; "
                "give the health port a port of its own",
            )


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = field(
        default="redis://127.0.0.1:6379/0",
        metadata=prefixed(
            ("redis://", "rediss://", "unix://"),
            "must start with redis://, rediss:// or unix://",
        ),
    )
    """Redis URL (redis:// or rediss://); with ``cluster``, the URL of any node
    of the cluster (database 0), from which the others are discovered."""
    cluster: bool = False
    """Redis Cluster mode: commands go to the shard owning their keys (MOVED
    and ASK are followed, topology changes and failovers picked up)."""
    sharded_pubsub: bool = True
    """With ``cluster``: invalidation messages go out on each log partition's
    shard channel ``cc:inv:{<ns>:<p>}`` (SPUBLISH, carried by the node owning
    the partition's slot only), and each instance subscribes (SSUBSCRIBE) on
    every primary; ``false``: on the classic channel ``cc:inv:<ns>`` (PUBLISH,
    broadcast to every node; one node's subscription), e.g. for other programs
    subscribed to it. A single Redis always uses the classic channel."""
    max_connections: int = field(default=64, metadata=at_least(1))
    """Size of the blocking connection pool (on a cluster: Redis calls in
    flight, hence connections to any one node)."""
    pool_timeout: Duration = Duration(1_000)
    """How long a request waits for a free connection before failing."""
    socket_timeout: Duration = Duration(1_000)
    """Timeout of one Redis command (and of connecting)."""
    breaker_failures: int = field(default=5, metadata=at_least(1))
    """Consecutive failed Redis calls after which Redis is skipped for a while."""
    breaker_cooldown: Duration = Duration(1_000)
    """How long Redis is skipped before one call probes whether it is back."""

    @property
    def sharded(self) -> bool:
        """Whether invalidation messages use shard channels (sharded_pubsub)."""
        return self.cluster and self.sharded_pubsub

    def problems(self) -> Iterator[tuple[str, str]]:
        if not self.cluster:
            return
        if not self.url.startswith(("redis://", "rediss://")):
            yield "url", "with redis.cluster = true, must be a redis:// or rediss:// URL"
        elif urlsplit(self.url).path.strip("/") not in ("", "0"):
            yield "url", "Redis Cluster has database 0 only; drop the /<db> from the URL"


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    """libpq connection string or URL."""
    min_connections: int = 1
    """Connections kept open."""
    max_connections: int = 10
    """Most connections the pool opens."""
    pool_timeout: Duration = Duration(2_000)
    """How long a request waits for a PostgreSQL connection before UNAVAILABLE."""
    prepare_threshold: int = field(
        default=5, metadata=at_least(-1, fix="must be -1 (disabled) or a count >= 0")
    )
    """Executions before a statement is prepared; -1 disables prepared statements
    (needed behind pgbouncer in transaction mode)."""
    outbox_interval: Duration = Duration(1_000)
    """How often the outbox drainer looks for invalidations left behind."""

    @property
    def redacted_url(self) -> str:
        """The URL without its password, for messages (secrets are never logged)."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))

    def problems(self) -> Iterator[tuple[str, str]]:
        if not 0 <= self.min_connections <= self.max_connections or self.max_connections < 1:
            yield "max_connections", "need 0 <= min_connections <= max_connections, max >= 1"


def _near_cache_on(ns: NamespaceSettings) -> bool:
    return ns.near_cache_entries > 0


def _write_behind(ns: NamespaceSettings) -> bool:
    return ns.strategy is StrategyName.WRITE_BEHIND


def _write_behind_between(low: int, high: int) -> Mapping[str, Any]:
    return between(
        low,
        high,
        fix=lambda value: f"must be between {low} and {high} (got {value})",
        when=_write_behind,
    )


@dataclass(frozen=True, slots=True)
class NamespaceSettings:
    name: str
    """Name used by clients."""
    kind: Kind
    """mapped (an existing table, values are JSON rows) or managed (opaque bytes)."""
    table: str = ""
    """mapped only: the table (optionally schema-qualified)."""
    key_column: str = ""
    """mapped only: the column holding the key; must be unique."""
    strategy: StrategyName = StrategyName.CACHE_ASIDE
    """cache-aside, write-through or write-behind."""
    invalidation: Invalidation = Invalidation.DELETE
    """delete the cached copy, or bump the key's version."""
    ttl: Duration = field(default=Duration(300_000), metadata=positive())
    """Time a cached value stays fresh."""
    ttl_jitter: float = field(default=0.1, metadata=between(0, 0.5))
    """Fraction by which each TTL is randomly spread (0 to 0.5)."""
    negative_ttl: Duration = Duration(30_000)
    """Time a "not found" answer is cached."""
    lease: Duration = field(default=Duration(3_000), metadata=positive())
    """Time a reader may take to load a missing key before another may try."""
    lease_wait: Duration = field(
        default=Duration(1_000), metadata=at_least(0, fix="must not be negative")
    )
    """How long a reader waits for another's fill before loading itself."""
    stale_window: Duration = Duration(0)
    """How long past its TTL a value may still be served (marked stale) while
    one reader refreshes it in the background; 0 disables."""
    stale_if_error: Duration = Duration(0)
    """How long past its TTL a value is still served (marked stale) when
    PostgreSQL cannot be reached to reload it; 0 disables."""
    early_refresh_beta: float = field(
        default=1.0, metadata=between(0, 100, fix="must be between 0 (off) and 100")
    )
    """XFetch: how eagerly a hot key is refreshed before it expires (0 disables)."""
    near_cache_entries: int = field(
        default=0, metadata=between(0, 10_000_000, fix="must be between 0 (off) and 10000000")
    )
    """Entries of the in-process near cache (0: no near cache)."""
    near_cache_ttl: Duration = field(
        default=Duration(1_000), metadata=positive(when=_near_cache_on)
    )
    """Longest time a near-cache entry is served without asking Redis."""
    log_partitions: int = field(
        default=8, metadata=between(1, 1024, fix=lambda v: f"must be between 1 and 1024 (got {v})")
    )
    """Partitions of the invalidation log (and of the keys: each key belongs to
    one, and on Redis Cluster they spread over shards). write-behind uses its
    queue ``partitions`` instead."""
    log_max_entries: int = field(
        default=10_000,
        metadata=between(1, 10_000_000, fix=lambda v: f"must be between 1 and 10000000 (got {v})"),
    )
    """Entries each log partition keeps at least (trimmed approximately,
    ``MAXLEN ~``: up to about a hundred more)."""
    log_max_age: Duration = field(default=Duration(600_000), metadata=positive())
    """Entries of the log older than this are trimmed (at each append)."""
    flush_interval: Duration = field(default=Duration(100), metadata=positive(when=_write_behind))
    """write-behind: longest time a queued write waits before its flush starts."""
    flush_batch: int = field(default=500, metadata=_write_behind_between(1, 10_000))
    """write-behind: most queue entries one flush reads (coalesced per key)."""
    max_queue: int = field(default=100_000, metadata=_write_behind_between(1, 100_000_000))
    """write-behind: queued writes beyond which Put answers RESOURCE_EXHAUSTED."""
    on_queue_full: QueueFull = QueueFull.REJECT
    """write-behind: reject a Put on a full queue, or write it through instead."""
    partitions: int = field(default=4, metadata=_write_behind_between(1, 1024))
    """write-behind: queues per namespace (on Redis Cluster they spread over shards)."""
    max_attempts: int = field(default=5, metadata=_write_behind_between(1, 100))
    """write-behind: flush attempts of an entry before it is dead-lettered."""
    retry_after: Duration = Duration(1_000)
    """write-behind: how long a failed entry waits before it is retried (doubling)."""
    claim_idle: Duration = field(default=Duration(15_000), metadata=positive(when=_write_behind))
    """write-behind: idle time after which another instance takes over a
    crashed instance's unflushed entries."""
    wait_replicas: int = field(default=0, metadata=_write_behind_between(0, 16))
    """write-behind: replicas that must acknowledge a Put (Redis WAIT) before it
    is acknowledged; 0 relies on the primary's persistence alone."""
    tags: tuple[str, ...] = ()
    """mapped only: tag templates, e.g. ["tenant:{tenant_id}"]: each value gets
    the tags rendered from its row's columns (for InvalidateTags)."""

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.kind is Kind.MAPPED and not (self.table and self.key_column):
            yield "table", "a mapped namespace needs both table and key_column"
        if self.kind is Kind.MANAGED and (self.table or self.key_column):
            yield "table", "a managed namespace uses cachecoord's own table; remove table"
        if _write_behind(self) and self.invalidation is Invalidation.VERSION:
            yield "invalidation", '"version" is not supported with write-behind; use "delete"'
        yield from self._tag_problems()

    def _tag_problems(self) -> Iterator[tuple[str, str]]:
        if not self.tags:
            return
        if self.kind is Kind.MANAGED:
            yield "tags", "only a mapped namespace derives tags from columns; a Put gives its tags"
        for text in self.tags:
            try:
                TagTemplate.parse(text)
            except BadTemplate as err:
                yield "tags", str(err)


@dataclass(frozen=True, slots=True)
class TlsSettings:
    cert_file: str = ""
    """PEM certificate (chain) the gRPC port presents; set it with key_file to
    serve TLS only. Empty: plaintext."""
    key_file: str = ""
    """PEM private key of cert_file (unencrypted: grpc cannot ask for a passphrase)."""
    client_ca_file: str = ""
    """PEM CA certificate(s); set, every client must present a certificate
    signed by one of them (mutual TLS)."""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    def problems(self) -> Iterator[tuple[str, str]]:
        """Fail at start, naming the key, rather than at every client's handshake
        (the files themselves are checked by config/files.py)."""
        if bool(self.cert_file) != bool(self.key_file):
            missing = "key_file" if self.cert_file else "cert_file"
            yield missing, f"TLS needs both tls.cert_file and tls.key_file; set {missing} too"
        elif self.client_ca_file and not self.cert_file:
            yield (
                "client_ca_file",
                "client certificates need TLS; set tls.cert_file and tls.key_file too",
            )


@dataclass(frozen=True, slots=True)
class TokenSettings:
    name: str
    """Who holds the token; logs name it, never the token itself."""
    token_file: str = ""
    """File holding the token, read at start; surrounding whitespace is trimmed."""
    token_env: str = ""
    """Environment variable holding the token (instead of token_file)."""
    permissions: Mapping[str, frozenset[Action]] = field(default_factory=dict)
    """Namespace (or "*": every namespace) -> the actions allowed on it."""
    lock_prefixes: tuple[str, ...] = ()
    """Lock names this token may acquire, hold, extend and release: prefixes
    of the name, or "*" for every lock."""
    digest: bytes = field(default=b"", repr=False)
    """SHA-256 of the token (empty while auth is disabled). The token itself
    is not kept, so no repr, log line or core dump of the settings holds it."""


@dataclass(frozen=True, slots=True)
class AuthSettings:
    enabled: bool = False
    """Require a bearer token (``authorization: Bearer <token>``) on every
    CacheCoordService call; health and reflection stay open."""
    tokens: tuple[TokenSettings, ...] = ()
    """The accepted tokens, each with its permissions ([[auth.tokens]])."""


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    postgres: PostgresSettings = field(default_factory=PostgresSettings)
    namespaces: Mapping[str, NamespaceSettings] = field(default_factory=dict)
    tls: TlsSettings = field(default_factory=TlsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
