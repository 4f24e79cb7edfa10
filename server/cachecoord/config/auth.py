"""[auth] and its [[auth.tokens]]: who may do what, and the tokens' digests."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from cachecoord.config.coerce import coerce
from cachecoord.config.files import read_text
from cachecoord.config.schema import AuthSettings, TokenSettings
from cachecoord.config.values import ANY, NAMESPACE_ACTIONS, Action, ConfigError

_TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MIN_TOKEN_CHARS = 16
_TOKEN_KEYS = ("name", "token_file", "token_env", "permissions", "lock_prefixes")


def token_variables(raw: Any) -> set[str]:
    """The environment variables that [[auth.tokens]] read their tokens from."""
    if not isinstance(raw, dict) or not isinstance(raw.get("tokens"), list):
        return set()
    return {
        entry["token_env"]
        for entry in raw["tokens"]
        if isinstance(entry, dict) and isinstance(entry.get("token_env"), str)
    }


def parse(
    raw: Any, source: str, environ: Mapping[str, str], namespaces: Mapping[str, Any]
) -> AuthSettings:
    """[auth] and its [[auth.tokens]]. The tokens themselves are read only when
    auth is enabled, so a disabled section does not need its secrets around."""
    for key in raw:
        if key not in ("enabled", "tokens"):
            raise ConfigError(f"{source}: unknown key auth.{key}; known keys: enabled, tokens")
    enabled: bool = coerce(bool, raw.get("enabled", False), f"{source}: auth.enabled")
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
    token_file = coerce(str, raw.get("token_file", ""), f"{source}: {where}.token_file")
    token_env = coerce(str, raw.get("token_env", ""), f"{source}: {where}.token_env")
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
        secret = read_text(token_file, label).strip()
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
