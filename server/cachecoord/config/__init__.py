"""Settings: one TOML file plus ``CACHECOORD_*`` environment overrides.

Everything is validated while loading; a mistake raises :class:`ConfigError`
naming the file, the key and the fix, and the server does not start.

    values.py       the error, enumerations and Duration
    schema.py       the frozen settings, each bound beside its field
    rules.py        how bounds are declared, and the one validator
    coerce.py       TOML and environment values to field types
    environment.py  CACHECOORD_<SECTION>_<KEY> overrides
    files.py        TLS certificate, key and token files
    auth.py         [auth] and [[auth.tokens]]
    loader.py       load(): all of the above, in order
"""

from cachecoord.config.auth import MIN_TOKEN_CHARS
from cachecoord.config.loader import NAME_RE, load
from cachecoord.config.schema import (
    AuthSettings,
    NamespaceSettings,
    PostgresSettings,
    RedisSettings,
    ServerSettings,
    Settings,
    TlsSettings,
    TokenSettings,
)
from cachecoord.config.values import (
    ANY,
    NAMESPACE_ACTIONS,
    Action,
    ConfigError,
    Duration,
    Invalidation,
    Kind,
    QueueFull,
    StrategyName,
)

__all__ = [
    "ANY",
    "MIN_TOKEN_CHARS",
    "NAMESPACE_ACTIONS",
    "NAME_RE",
    "Action",
    "AuthSettings",
    "ConfigError",
    "Duration",
    "Invalidation",
    "Kind",
    "NamespaceSettings",
    "PostgresSettings",
    "QueueFull",
    "RedisSettings",
    "ServerSettings",
    "Settings",
    "StrategyName",
    "TlsSettings",
    "TokenSettings",
    "load",
]
