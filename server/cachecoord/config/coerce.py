"""TOML and environment values to the types of the settings' fields."""

from __future__ import annotations

import dataclasses
import enum
import re
import typing
from typing import Any

from cachecoord.config.values import ConfigError, Duration

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_MAX_DURATION_S = 365 * 86_400  # a year; also keeps every TTL within Redis' limits
_HINTS: dict[type, str] = {
    Duration: 'a duration such as "250ms", "5s", "5m", "1h" or a number of seconds',
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    tuple[str, ...]: 'a list of strings, such as ["tenant:{tenant_id}"]',
}


def field_types(cls: type[Any]) -> dict[str, Any]:
    """The type of each field of dataclass *cls*, resolved from its annotations."""
    hints = typing.get_type_hints(cls)
    return {spec.name: hints[spec.name] for spec in dataclasses.fields(cls)}


def coerce(kind: Any, value: Any, label: str) -> Any:
    """*value* as a *kind*; a ConfigError naming *label* and the accepted forms if it is not."""
    try:
        if kind == tuple[str, ...]:
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
        if kind is Duration:
            return duration(value)
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
        hint = _HINTS.get(kind) or "one of " + ", ".join(repr(m.value) for m in kind)
        raise ConfigError(f"{label} = {value!r} is invalid; expected {hint}") from None


def duration(value: Any) -> Duration:
    """A number of seconds or ``"<number><ms|s|m|h>"``, as milliseconds (at most a year)."""
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
