"""Settings: one TOML file plus ``CACHECOORD_*`` environment overrides.

Everything is validated while loading; a mistake raises :class:`ConfigError`
naming the file, the key and the fix, and the server does not start.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import re
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_MAX_DURATION_S = 365 * 86_400  # a year; also keeps every TTL within Redis' limits
_HOST_PORT_RE = re.compile(r"(\[[0-9a-fA-F:]+\]|[^:\s\[\]]+):(\d{1,5})")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the fix."""


class StrategyName(enum.StrEnum):
    CACHE_ASIDE = "cache-aside"
    WRITE_THROUGH = "write-through"
    WRITE_BEHIND = "write-behind"


class Kind(enum.StrEnum):
    MAPPED = "mapped"
    MANAGED = "managed"


class Invalidation(enum.StrEnum):
    DELETE = "delete"
    VERSION = "version"


class QueueFull(enum.StrEnum):
    REJECT = "reject"
    WRITE_THROUGH = "write-through"


class Action(enum.StrEnum):
    """What a bearer token may do: to a namespace (read, write, invalidate,
    watch) or, granted by ``lock_prefixes``, to a lock (lock)."""

    READ = "read"
    WRITE = "write"
    INVALIDATE = "invalidate"
    WATCH = "watch"
    LOCK = "lock"


NAMESPACE_ACTIONS = frozenset(Action) - {Action.LOCK}
ANY = "*"
"""In permissions: every namespace (as a key) or every action; in lock_prefixes: every lock."""
_TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MIN_TOKEN_CHARS = 16


class Duration(int):
    """Milliseconds, written in the file as ``"250ms"``, ``"5s"``, ``"5m"``, ``"1h"`` or a
    number of seconds."""


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen: str = "127.0.0.1:50051"
    """host:port of the gRPC listener."""
    instance_id: str = ""
    """Name of this instance in invalidation messages; default host-pid."""
    shutdown_grace: Duration = Duration(10_000)
    """How long in-flight RPCs get to finish on SIGTERM."""
    default_deadline: Duration = Duration(5_000)
    """Deadline applied to backend calls of an RPC that came without one."""
    max_key_bytes: int = 512
    """Longest accepted key (UTF-8 bytes)."""
    max_value_bytes: int = 1_048_576
    """Largest accepted value."""
    max_batch_keys: int = 1000
    """Most keys in one BatchGet or Invalidate."""
    max_connection_age: Duration = Duration(300_000)
    """Clients reconnect after this long (grpc.max_connection_age_ms), so load
    spreads over instances added behind a load balancer."""
    max_connection_age_grace: Duration = Duration(30_000)
    """Calls still open on a connection past max_connection_age get this long
    before it is closed under them (grpc.max_connection_age_grace_ms): Watch
    streams then reconnect (with a RESET); HoldLock streams hand their lock
    off to a new stream every half of this, before that can happen."""
    lock_first_message_timeout: Duration = Duration(10_000)
    """A HoldLock stream whose first message (acquire or resume) does not come
    within this long ends with INVALID_ARGUMENT."""
    reuse_port: bool = False
    """Share the port with other processes (SO_REUSEPORT); set by --workers."""
    watch_heartbeat: Duration = Duration(10_000)
    """Quiet time after which a Watch stream gets a heartbeat."""
    watch_backlog: int = 10_000
    """Events a Watch stream may have unread before it gets a RESET instead."""
    health_listen: str = ""
    """host:port of a second, plaintext listener that serves only grpc.health.v1,
    so that probes work while the main port requires TLS (or client
    certificates); empty: health is served on the main port only."""
    consistency_sample: float = 0.0
    """Fraction (0 to 1) of the changes this instance hears of that the
    consistency observer reads back after consistency_delay; 0: off."""
    consistency_delay: Duration = Duration(5_000)
    """How long after a change the observer checks it: the staleness bound
    being measured."""


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    """Redis URL (redis:// or rediss://); with ``cluster``, the URL of any node
    of the cluster (database 0), from which the others are discovered."""
    cluster: bool = False
    """Redis Cluster mode: commands go to the shard owning their keys (MOVED
    and ASK are followed, topology changes and failovers picked up); pub/sub
    uses one node's connection (PUBLISH reaches every node of a cluster)."""
    max_connections: int = 64
    """Size of the blocking connection pool (on a cluster: Redis calls in
    flight, hence connections to any one node)."""
    pool_timeout: Duration = Duration(1_000)
    """How long a request waits for a free connection before failing."""
    socket_timeout: Duration = Duration(1_000)
    """Timeout of one Redis command (and of connecting)."""
    breaker_failures: int = 5
    """Consecutive failed Redis calls after which Redis is skipped for a while."""
    breaker_cooldown: Duration = Duration(1_000)
    """How long Redis is skipped before one call probes whether it is back."""


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
    prepare_threshold: int = 5
    """Executions before a statement is prepared; -1 disables prepared statements
    (needed behind pgbouncer in transaction mode)."""
    outbox_interval: Duration = Duration(1_000)
    """How often the outbox drainer looks for invalidations left behind."""


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
    ttl: Duration = Duration(300_000)
    """Time a cached value stays fresh."""
    ttl_jitter: float = 0.1
    """Fraction by which each TTL is randomly spread (0 to 0.5)."""
    negative_ttl: Duration = Duration(30_000)
    """Time a "not found" answer is cached."""
    lease: Duration = Duration(3_000)
    """Time a reader may take to load a missing key before another may try."""
    lease_wait: Duration = Duration(1_000)
    """How long a reader waits for another's fill before loading itself."""
    stale_window: Duration = Duration(0)
    """How long past its TTL a value may still be served (marked stale) while
    one reader refreshes it in the background; 0 disables."""
    stale_if_error: Duration = Duration(0)
    """How long past its TTL a value is still served (marked stale) when
    PostgreSQL cannot be reached to reload it; 0 disables."""
    early_refresh_beta: float = 1.0
    """XFetch: how eagerly a hot key is refreshed before it expires (0 disables)."""
    near_cache_entries: int = 0
    """Entries of the in-process near cache (0: no near cache)."""
    near_cache_ttl: Duration = Duration(1_000)
    """Longest time a near-cache entry is served without asking Redis."""
    flush_interval: Duration = Duration(100)
    """write-behind: longest time a queued write waits before its flush starts."""
    flush_batch: int = 500
    """write-behind: most queue entries one flush reads (coalesced per key)."""
    max_queue: int = 100_000
    """write-behind: queued writes beyond which Put answers RESOURCE_EXHAUSTED."""
    on_queue_full: QueueFull = QueueFull.REJECT
    """write-behind: reject a Put on a full queue, or write it through instead."""
    partitions: int = 4
    """write-behind: queues per namespace (on Redis Cluster they spread over shards)."""
    max_attempts: int = 5
    """write-behind: flush attempts of an entry before it is dead-lettered."""
    retry_after: Duration = Duration(1_000)
    """write-behind: how long a failed entry waits before it is retried (doubling)."""
    claim_idle: Duration = Duration(15_000)
    """write-behind: idle time after which another instance takes over a
    crashed instance's unflushed entries."""
    wait_replicas: int = 0
    """write-behind: replicas that must acknowledge a Put (Redis WAIT) before it
    is acknowledged; 0 relies on the primary's persistence alone."""


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


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "redis": RedisSettings,
    "postgres": PostgresSettings,
    "tls": TlsSettings,
}
# Sections read by their own parser (lists of tables), not by _build.
_OTHER_SECTIONS = ("auth", "namespaces")
_ENV_ALIASES = {"CACHECOORD_DATABASE_URL": "CACHECOORD_POSTGRES_URL"}
# Read by the command line, not settings.
_ENV_IGNORED = {
    "CACHECOORD_CONFIG",
    "CACHECOORD_LOG_LEVEL",
    "CACHECOORD_LOG_FORMAT",
    "CACHECOORD_TARGET",
}


def load(path: Path | None, environ: Mapping[str, str]) -> Settings:
    """Read *path* (if any), apply ``CACHECOORD_<SECTION>_<KEY>`` overrides from
    *environ*, validate, and return frozen settings."""
    source = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read the file: {err}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
    for name, value in raw.items():
        if name not in (*_SECTIONS, *_OTHER_SECTIONS):
            raise ConfigError(
                f"{source}: unknown section [{name}]; expected one of "
                f"{', '.join([*_SECTIONS, *_OTHER_SECTIONS])}"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name} must be a table: write it as [{name}]")
    sections = {name: dict(raw.get(name, {})) for name in _SECTIONS}
    # A token's own variable (token_env) may be called CACHECOORD_*: not a setting.
    secrets = _token_variables(raw.get("auth"))
    from_env = _apply_env(sections, {k: v for k, v in environ.items() if k not in secrets})
    namespaces = _namespaces(raw.get("namespaces", {}), source)
    settings = Settings(
        server=_build(ServerSettings, sections["server"], "server", source, from_env),
        redis=_build(RedisSettings, sections["redis"], "redis", source, from_env),
        postgres=_build(PostgresSettings, sections["postgres"], "postgres", source, from_env),
        namespaces=namespaces,
        tls=_build(TlsSettings, sections["tls"], "tls", source, from_env),
        auth=_auth(raw.get("auth", {}), source, environ, namespaces),
    )
    _check(settings, source)
    return settings


# The variables the kubelet injects for each Service of the pod's namespace
# (service links, on unless enableServiceLinks is false): for a Service named
# cachecoord, CACHECOORD_SERVICE_HOST=10.0.0.11, CACHECOORD_PORT=tcp://10.0.0.11:50051,
# CACHECOORD_PORT_50051_TCP_ADDR=10.0.0.11, ... Matched by name *and* value, so
# that a misspelt setting is still refused.
_IP = r"[0-9A-Fa-f.:]+"
_PORT = r"[0-9]{1,5}"
_PROTO = r"(?:TCP|UDP|SCTP)"
_URL = rf"(?:tcp|udp|sctp)://\[?{_IP}\]?:{_PORT}"
_SERVICE_LINKS = tuple(
    (re.compile(rf"CACHECOORD_(?:[A-Z0-9_]+_)?{name}"), re.compile(value))
    for name, value in (
        ("SERVICE_HOST", _IP),
        (r"SERVICE_PORT(?:_[A-Z0-9_]+)?", _PORT),
        ("PORT", _URL),
        (rf"PORT_{_PORT}_{_PROTO}", _URL),
        (rf"PORT_{_PORT}_{_PROTO}_PROTO", r"tcp|udp|sctp"),
        (rf"PORT_{_PORT}_{_PROTO}_PORT", _PORT),
        (rf"PORT_{_PORT}_{_PROTO}_ADDR", _IP),
    )
)


def _is_service_link(var: str, value: str) -> bool:
    """Whether *var* is one of Kubernetes' service-link variables (not a setting)."""
    return any(name.fullmatch(var) and shape.fullmatch(value) for name, shape in _SERVICE_LINKS)


def _apply_env(sections: dict[str, dict[str, Any]], environ: Mapping[str, str]) -> dict[str, str]:
    """Apply the overrides; return ``section.key -> variable`` for messages."""
    from_env: dict[str, str] = {}
    for var, value in sorted(environ.items()):
        if not var.startswith("CACHECOORD_") or var in _ENV_IGNORED:
            continue
        if _is_service_link(var, value):
            continue
        canonical = _ENV_ALIASES.get(var, var)
        section, _, key = canonical.removeprefix("CACHECOORD_").lower().partition("_")
        known = (
            {f.name for f in dataclasses.fields(_SECTIONS[section])}
            if section in _SECTIONS
            else set()
        )
        if key not in known:
            raise ConfigError(
                f"environment variable {var} is not a setting; use CACHECOORD_<SECTION>_<KEY> "
                f"with a section of {', '.join(_SECTIONS)} and a key of that section"
            )
        where = f"{section}.{key}"
        if where in from_env and sections[section][key] != value:
            raise ConfigError(
                f"environment variables {from_env[where]} and {var} both set {where} "
                "to different values; set only one"
            )
        sections[section][key] = value
        from_env[where] = var
    return from_env


def _namespaces(raw: Any, source: str) -> dict[str, NamespaceSettings]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [namespaces] must be a table of [namespaces.<name>]")
    result = {}
    for name, table in raw.items():
        where = f"namespaces.{name}"
        if not NAME_RE.fullmatch(name):
            raise ConfigError(
                f"{source}: [{where}]: a namespace name is 1-63 characters of a-z, 0-9, _ and -,"
                " starting with a letter"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{where}] must be a table")
        if "name" in table:
            raise ConfigError(
                f"{source}: {where}.name: the name is the table's own ([namespaces.<name>]); "
                "remove the key"
            )
        if "kind" not in table:
            raise ConfigError(f'{source}: {where}.kind is missing; set "mapped" or "managed"')
        result[name] = _build(NamespaceSettings, {**table, "name": name}, where, source)
    return result


def _build(
    cls: type[Any],
    values: dict[str, Any],
    where: str,
    source: str,
    from_env: Mapping[str, str] | None = None,
) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            known = ", ".join(f for f in fields if f != "name")
            raise ConfigError(f"{source}: unknown key {where}.{key}; known keys: {known}")
        variable = (from_env or {}).get(f"{where}.{key}")
        label = f"environment variable {variable}" if variable else f"{source}: {where}.{key}"
        kwargs[key] = _coerce(fields[key].type, value, label)
    return cls(**kwargs)


def _coerce(kind: Any, value: Any, label: str) -> Any:
    kind = {"str": str, "int": int, "float": float, "bool": bool}.get(kind) or globals()[kind]
    try:
        if kind is Duration:
            return _duration(value)
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            return kind(value)
        if kind is bool:
            if isinstance(value, str):
                return {"true": True, "1": True, "false": False, "0": False}[value.lower()]
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise TypeError
            return float(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError, KeyError):
        hint = {
            Duration: 'a duration such as "250ms", "5s", "5m", "1h" or a number of seconds',
            int: "an integer",
            float: "a number",
            bool: "true or false",
            str: "a string",
        }.get(kind) or "one of " + ", ".join(repr(m.value) for m in kind)
        raise ConfigError(f"{label} = {value!r} is invalid; expected {hint}") from None


def _duration(value: Any) -> Duration:
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, int | float):
        if not 0 <= value <= _MAX_DURATION_S:
            raise ValueError
        return Duration(round(value * 1000))
    match = _DURATION_RE.fullmatch(str(value))
    if not match:
        raise ValueError
    milliseconds = float(match[1]) * _UNIT_MS[match[2] or "s"]
    if milliseconds > _MAX_DURATION_S * 1000:
        raise ValueError
    return Duration(round(milliseconds))


def _check(settings: Settings, source: str) -> None:
    def fail(key: str, fix: str) -> None:
        raise ConfigError(f"{source}: {key}: {fix}")

    server = settings.server
    listen = _HOST_PORT_RE.fullmatch(server.listen)
    if not listen or int(listen[2]) > 65_535:
        fail("server.listen", f"{server.listen!r} is not host:port, e.g. 127.0.0.1:50051")
    if not 1 <= server.max_key_bytes <= 65_536:
        fail("server.max_key_bytes", "must be between 1 and 65536")
    if not 1 <= server.max_value_bytes <= 64 * 1024 * 1024:
        fail("server.max_value_bytes", "must be between 1 and 67108864")
    if not 1 <= server.max_batch_keys <= 100_000:
        fail("server.max_batch_keys", "must be between 1 and 100000")
    if server.watch_heartbeat <= 0:
        fail("server.watch_heartbeat", "must be positive")
    if not 1 <= server.watch_backlog <= 1_000_000:
        fail("server.watch_backlog", "must be between 1 and 1000000")
    if server.default_deadline <= 0:
        fail("server.default_deadline", "must be positive")
    if server.max_connection_age_grace < 200:
        fail("server.max_connection_age_grace", 'must be at least "200ms"')
    if server.lock_first_message_timeout <= 0:
        fail("server.lock_first_message_timeout", "must be positive")
    if not 0 <= server.consistency_sample <= 1:
        fail("server.consistency_sample", "must be between 0 (off) and 1")
    if server.consistency_delay <= 0:
        fail("server.consistency_delay", "must be positive")
    if not settings.redis.url.startswith(("redis://", "rediss://", "unix://")):
        fail("redis.url", "must start with redis://, rediss:// or unix://")
    if settings.redis.cluster:
        if not settings.redis.url.startswith(("redis://", "rediss://")):
            fail("redis.url", "with redis.cluster = true, must be a redis:// or rediss:// URL")
        if urlsplit(settings.redis.url).path.strip("/") not in ("", "0"):
            fail("redis.url", "Redis Cluster has database 0 only; drop the /<db> from the URL")
    if server.health_listen:
        _check_health_listen(server, source)
    _check_tls(settings.tls, source)
    if settings.redis.max_connections < 1:
        fail("redis.max_connections", "must be at least 1")
    if settings.redis.breaker_failures < 1:
        fail("redis.breaker_failures", "must be at least 1")
    pg = settings.postgres
    if not 0 <= pg.min_connections <= pg.max_connections or pg.max_connections < 1:
        fail("postgres.max_connections", "need 0 <= min_connections <= max_connections, max >= 1")
    if pg.prepare_threshold < -1:
        fail("postgres.prepare_threshold", "must be -1 (disabled) or a count >= 0")
    for ns in settings.namespaces.values():
        where = f"namespaces.{ns.name}"
        if ns.kind is Kind.MAPPED and not (ns.table and ns.key_column):
            fail(f"{where}.table", "a mapped namespace needs both table and key_column")
        if ns.kind is Kind.MANAGED and (ns.table or ns.key_column):
            fail(f"{where}.table", "a managed namespace uses cachecoord's own table; remove table")
        if ns.ttl <= 0:
            fail(f"{where}.ttl", "must be positive")
        if not 0 <= ns.ttl_jitter <= 0.5:
            fail(f"{where}.ttl_jitter", "must be between 0 and 0.5")
        if not 0 <= ns.near_cache_entries <= 10_000_000:
            fail(f"{where}.near_cache_entries", "must be between 0 (off) and 10000000")
        if ns.near_cache_entries and ns.near_cache_ttl <= 0:
            fail(f"{where}.near_cache_ttl", "must be positive")
        if not 0 <= ns.early_refresh_beta <= 100:
            fail(f"{where}.early_refresh_beta", "must be between 0 (off) and 100")
        if ns.lease <= 0 or ns.lease_wait < 0:
            fail(f"{where}.lease", "lease must be positive and lease_wait not negative")
        if ns.strategy is StrategyName.WRITE_BEHIND:
            if ns.invalidation is Invalidation.VERSION:
                fail(
                    f"{where}.invalidation",
                    '"version" is not supported with write-behind; use "delete"',
                )
            for key, value, low, high in (
                ("flush_batch", ns.flush_batch, 1, 10_000),
                ("max_queue", ns.max_queue, 1, 100_000_000),
                ("partitions", ns.partitions, 1, 1024),
                ("max_attempts", ns.max_attempts, 1, 100),
                ("wait_replicas", ns.wait_replicas, 0, 16),
            ):
                if not low <= value <= high:
                    fail(f"{where}.{key}", f"must be between {low} and {high} (got {value})")
            if ns.flush_interval <= 0 or ns.claim_idle <= 0:
                fail(f"{where}.flush_interval", "flush_interval and claim_idle must be positive")


def _check_health_listen(server: ServerSettings, source: str) -> None:
    health = _HOST_PORT_RE.fullmatch(server.health_listen)
    if not health or int(health[2]) > 65_535:
        raise ConfigError(
            f"{source}: server.health_listen: {server.health_listen!r} is not host:port, "
            'e.g. 127.0.0.1:50052 (or "" for no separate health port)'
        )
    if server.health_listen == server.listen and int(health[2]) != 0:
        raise ConfigError(
            f"{source}: server.health_listen: {server.health_listen!r} is server.listen itself; "
            "give the health port a port of its own"
        )


# -- [tls] ---------------------------------------------------------------------


def _check_tls(tls: TlsSettings, source: str) -> None:
    """Fail at start, naming the key, rather than at every client's handshake."""
    if bool(tls.cert_file) != bool(tls.key_file):
        missing = "key_file" if tls.cert_file else "cert_file"
        raise ConfigError(
            f"{source}: tls.{missing}: TLS needs both tls.cert_file and tls.key_file; "
            f"set {missing} too"
        )
    if tls.client_ca_file and not tls.cert_file:
        raise ConfigError(
            f"{source}: tls.client_ca_file: client certificates need TLS; "
            "set tls.cert_file and tls.key_file too"
        )
    if not tls.enabled:
        return
    _certificates(tls.cert_file, f"{source}: tls.cert_file")
    _private_key(tls, source)
    if tls.client_ca_file:
        _certificates(tls.client_ca_file, f"{source}: tls.client_ca_file")


def _certificates(path: str, label: str) -> None:
    """*path* must hold PEM certificates that OpenSSL can parse."""
    text = _pem(path, "CERTIFICATE", label)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except ssl.SSLError as err:
        raise ConfigError(
            f"{label}: {path!r} holds a certificate that cannot be parsed ({err.reason or err})"
        ) from None


def _private_key(tls: TlsSettings, source: str) -> None:
    """The key must be unencrypted (grpc cannot ask for a passphrase) and match the certificate."""
    label = f"{source}: tls.key_file"
    if "ENCRYPTED" in _pem(tls.key_file, "PRIVATE KEY", label):
        raise ConfigError(
            f"{label}: {tls.key_file!r} is encrypted and the server cannot ask for its "
            "passphrase; decrypt it (openssl pkey -in KEY -out KEY.plain)"
        )
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(tls.cert_file, tls.key_file)
    except ssl.SSLError as err:
        problem = (
            "is not the private key of the certificate in tls.cert_file"
            if err.reason == "KEY_VALUES_MISMATCH"
            else "cannot be used with the certificate in tls.cert_file"
        )
        raise ConfigError(
            f"{label}: {tls.key_file!r} {problem} {tls.cert_file!r} ({err.reason or err})"
        ) from None


def _pem(path: str, kind: str, label: str) -> str:
    """The text of PEM file *path*, which must hold a ``-----BEGIN ...<kind>-----`` block."""
    text = _read_text(path, label)
    if not re.search(rf"-----BEGIN [A-Z ]*{kind}-----", text):
        raise ConfigError(
            f"{label}: {path!r} holds no PEM {kind.lower()} (-----BEGIN ...{kind}-----)"
        )
    return text


def _read_text(path: str, label: str) -> str:
    """The file's text; the messages name the file, never what it holds."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{label}: {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{label}: {path!r} is a directory, not a file") from None
    except OSError as err:
        raise ConfigError(f"{label}: cannot read {path!r}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{label}: {path!r} is not UTF-8 text") from None


# -- [auth] --------------------------------------------------------------------

_TOKEN_KEYS = ("name", "token_file", "token_env", "permissions", "lock_prefixes")


def _token_variables(raw: Any) -> set[str]:
    """The environment variables that [[auth.tokens]] read their tokens from."""
    if not isinstance(raw, dict) or not isinstance(raw.get("tokens"), list):
        return set()
    return {
        entry["token_env"]
        for entry in raw["tokens"]
        if isinstance(entry, dict) and isinstance(entry.get("token_env"), str)
    }


def _auth(
    raw: Any, source: str, environ: Mapping[str, str], namespaces: Mapping[str, Any]
) -> AuthSettings:
    """[auth] and its [[auth.tokens]]. The tokens themselves are read only when
    auth is enabled, so a disabled section does not need its secrets around."""
    for key in raw:
        if key not in ("enabled", "tokens"):
            raise ConfigError(f"{source}: unknown key auth.{key}; known keys: enabled, tokens")
    enabled: bool = _coerce("bool", raw.get("enabled", False), f"{source}: auth.enabled")
    entries = raw.get("tokens", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(
            f"{source}: auth.tokens must be a list of tables: write each as [[auth.tokens]]"
        )
    tokens = tuple(
        _token(entry, f"auth.tokens[{i}]", source, environ if enabled else None, namespaces)
        for i, entry in enumerate(entries)
    )
    if enabled and not tokens:
        raise ConfigError(
            f"{source}: auth.enabled: no [[auth.tokens]] are configured, so no call could "
            "succeed; add tokens or set enabled = false"
        )
    _check_distinct(tokens, source)
    return AuthSettings(enabled=enabled, tokens=tokens)


def _token(
    raw: dict[str, Any],
    where: str,
    source: str,
    environ: Mapping[str, str] | None,
    namespaces: Mapping[str, Any],
) -> TokenSettings:
    for key in raw:
        if key not in _TOKEN_KEYS:
            raise ConfigError(
                f"{source}: unknown key {where}.{key}; known keys: {', '.join(_TOKEN_KEYS)}"
            )
    name = raw.get("name")
    if not isinstance(name, str) or not _TOKEN_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{source}: {where}.name: every token needs a name (for the logs): 1-63 letters, "
            "digits, _, . or -, starting with a letter or digit"
        )
    token_file = _coerce("str", raw.get("token_file", ""), f"{source}: {where}.token_file")
    token_env = _coerce("str", raw.get("token_env", ""), f"{source}: {where}.token_env")
    if bool(token_file) == bool(token_env):
        raise ConfigError(
            f"{source}: {where}.token_file: token {name!r} needs exactly one of token_file "
            "(a file holding the token) and token_env (a variable holding it)"
        )
    if token_env and not _ENV_NAME_RE.fullmatch(token_env):
        raise ConfigError(
            f"{source}: {where}.token_env: {token_env!r} is not an environment variable name"
        )
    permissions = _permissions(
        raw.get("permissions", {}), f"{where}.permissions", source, namespaces
    )
    lock_prefixes = _lock_prefixes(raw.get("lock_prefixes", []), f"{where}.lock_prefixes", source)
    if not permissions and not lock_prefixes:
        raise ConfigError(
            f"{source}: {where}.permissions: token {name!r} grants nothing; give it "
            'permissions (e.g. permissions = { users = ["read"] }) or lock_prefixes'
        )
    digest = b""
    if environ is not None:
        secret = _secret(token_file, token_env, where, source, environ)
        digest = hashlib.sha256(secret.encode()).digest()
    return TokenSettings(name, token_file, token_env, permissions, lock_prefixes, digest)


def _permissions(
    raw: Any, where: str, source: str, namespaces: Mapping[str, Any]
) -> dict[str, frozenset[Action]]:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: {where} must be a table of namespace = [actions], "
            'e.g. { users = ["read"] }'
        )
    allowed = ", ".join(sorted(NAMESPACE_ACTIONS)) + f' or "{ANY}"'
    result: dict[str, frozenset[Action]] = {}
    for namespace, actions in raw.items():
        label = f"{source}: {where}.{namespace}"
        if namespace != ANY and namespace not in namespaces:
            raise ConfigError(
                f"{label}: no namespace {namespace!r} is configured; use one of "
                f'{", ".join(sorted(namespaces)) or "(none)"}, or "{ANY}" for every namespace'
            )
        if not isinstance(actions, list) or not actions:
            raise ConfigError(f"{label} must be a non-empty list of actions among {allowed}")
        granted: set[Action] = set()
        for action in actions:
            if action == ANY:
                granted |= NAMESPACE_ACTIONS
            elif action in NAMESPACE_ACTIONS:
                granted.add(Action(action))
            else:
                hint = "; locks are granted by lock_prefixes" if action == Action.LOCK else ""
                raise ConfigError(f"{label}: unknown action {action!r}; expected {allowed}{hint}")
        result[namespace] = frozenset(granted)
    return result


def _lock_prefixes(raw: Any, where: str, source: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
        raise ConfigError(
            f'{source}: {where} must be a list of lock name prefixes (e.g. ["report-"]), '
            f'or ["{ANY}"] for every lock; an empty prefix is not allowed'
        )
    return tuple(raw)


def _secret(
    token_file: str, token_env: str, where: str, source: str, environ: Mapping[str, str]
) -> str:
    """The token, trimmed and checked. Messages never quote it."""
    if token_file:
        label = f"{source}: {where}.token_file"
        secret = _read_text(token_file, label).strip()
        origin = f"file {token_file!r}"
    else:
        label = f"{source}: {where}.token_env"
        if token_env not in environ:
            raise ConfigError(f"{label}: the environment variable {token_env} is not set")
        secret = environ[token_env].strip()
        origin = f"variable {token_env}"
    if not secret:
        raise ConfigError(f"{label}: the {origin} is empty")
    if not (secret.isascii() and secret.isprintable()) or any(c.isspace() for c in secret):
        raise ConfigError(
            f"{label}: the token in the {origin} must be printable ASCII without spaces "
            "(it travels in a gRPC header)"
        )
    if len(secret) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"{label}: the token in the {origin} is too short; use at least "
            f"{MIN_TOKEN_CHARS} random characters (e.g. `openssl rand -hex 32`)"
        )
    return secret


def _check_distinct(tokens: tuple[TokenSettings, ...], source: str) -> None:
    """Two entries with one name would blur the logs; with one token, the
    permissions that apply would depend on the order of the file."""
    seen: dict[str, int] = {}
    digests: dict[bytes, str] = {}
    for i, token in enumerate(tokens):
        if token.name in seen:
            raise ConfigError(
                f"{source}: auth.tokens[{i}].name: {token.name!r} is also the name of "
                f"auth.tokens[{seen[token.name]}]; names must be unique"
            )
        seen[token.name] = i
        if token.digest and token.digest in digests:
            raise ConfigError(
                f"{source}: auth.tokens[{i}]: token {token.name!r} is the same token as "
                f"{digests[token.digest]!r}; give each entry its own token"
            )
        digests[token.digest] = token.name
