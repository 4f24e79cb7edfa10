"""``load``: one TOML file plus ``CACHECOORD_*`` environment overrides, validated."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cachecoord.config import auth, environment, files, rules
from cachecoord.config.coerce import coerce, field_types
from cachecoord.config.schema import (
    NamespaceSettings,
    PostgresSettings,
    RedisSettings,
    ServerSettings,
    Settings,
    TlsSettings,
)
from cachecoord.config.values import ConfigError

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")

_SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "redis": RedisSettings,
    "postgres": PostgresSettings,
    "tls": TlsSettings,
}
# Sections read by their own parser (lists of tables), not by _build.
_OTHER_SECTIONS = ("auth", "namespaces")


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
    secrets = auth.token_variables(raw.get("auth"))
    from_env = environment.apply(
        sections, _SECTIONS, {k: v for k, v in environ.items() if k not in secrets}
    )
    namespaces = _namespaces(raw.get("namespaces", {}), source)
    settings = Settings(
        server=_build(ServerSettings, sections["server"], "server", source, from_env),
        redis=_build(RedisSettings, sections["redis"], "redis", source, from_env),
        postgres=_build(PostgresSettings, sections["postgres"], "postgres", source, from_env),
        namespaces=namespaces,
        tls=_build(TlsSettings, sections["tls"], "tls", source, from_env),
        auth=auth.parse(raw.get("auth", {}), source, environ, namespaces),
    )
    _check(settings, source)
    return settings


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
    types = field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types:
            known = ", ".join(f for f in types if f != "name")
            raise ConfigError(f"{source}: unknown key {where}.{key}; known keys: {known}")
        variable = (from_env or {}).get(f"{where}.{key}")
        label = f"environment variable {variable}" if variable else f"{source}: {where}.{key}"
        kwargs[key] = coerce(types[key], value, label)
    return cls(**kwargs)


def _check(settings: Settings, source: str) -> None:
    """Every section's rules (config/rules.py), then the files [tls] points at."""
    rules.check(settings.server, "server", source)
    rules.check(settings.redis, "redis", source)
    rules.check(settings.tls, "tls", source)
    files.check_tls(settings.tls, source)
    rules.check(settings.postgres, "postgres", source)
    for ns in settings.namespaces.values():
        rules.check(ns, f"namespaces.{ns.name}", source)
