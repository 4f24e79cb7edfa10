"""Bounds declared beside the fields they bound, and the one validator that checks them.

A field carries its rule in its metadata::

    max_key_bytes: int = field(default=512, metadata=between(1, 65_536))

:func:`check` reads every field's rule, then the rules that involve more than
one field (a settings class's ``problems()``), and raises :class:`ConfigError`
naming the file and the key of the first one broken.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cachecoord.config.values import ConfigError

HOST_PORT_RE = re.compile(r"(\[[0-9a-fA-F:]+\]|[^:\s\[\]]+):(\d{1,5})")


@dataclass(frozen=True, slots=True)
class Rule:
    """What a field's value must satisfy, and the fix to print when it does not."""

    holds: Callable[[Any], bool]
    fix: Callable[[Any], str]
    when: Callable[[Any], bool] | None = None
    """Applies only to settings for which this is true (e.g. write-behind namespaces)."""


def _rule(
    holds: Callable[[Any], bool],
    fix: str | Callable[[Any], str],
    when: Callable[[Any], bool] | None,
) -> Mapping[str, Rule]:
    text = fix if callable(fix) else lambda _value: fix
    return {"rule": Rule(holds, text, when)}


def between(
    low: float,
    high: float,
    *,
    fix: str | Callable[[Any], str] | None = None,
    when: Callable[[Any], bool] | None = None,
) -> Mapping[str, Rule]:
    """Inclusive range (NaN is outside every range)."""
    text = fix or f"must be between {low} and {high}"
    return _rule(lambda value: low <= value <= high, text, when)


def at_least(
    low: float, *, fix: str | None = None, when: Callable[[Any], bool] | None = None
) -> Mapping[str, Rule]:
    return _rule(lambda value: value >= low, fix or f"must be at least {low}", when)


def positive(*, when: Callable[[Any], bool] | None = None) -> Mapping[str, Rule]:
    return _rule(lambda value: value > 0, "must be positive", when)


def host_port(
    fix: Callable[[Any], str], *, when: Callable[[Any], bool] | None = None
) -> Mapping[str, Rule]:
    """``host:port`` with a port of at most 65535 (IPv6 hosts in brackets)."""

    def holds(value: str) -> bool:
        match = HOST_PORT_RE.fullmatch(value)
        return match is not None and int(match[2]) <= 65_535

    return _rule(holds, fix, when)


def prefixed(prefixes: tuple[str, ...], fix: str) -> Mapping[str, Rule]:
    return _rule(lambda value: value.startswith(prefixes), fix, None)


class Checked(Protocol):
    """A settings class: fields with rules, and rules across fields."""

    def problems(self) -> Iterator[tuple[str, str]]:
        """``(key, fix)`` of every broken rule that involves more than one field."""
        ...


def check(settings: Checked, where: str, source: str) -> None:
    """Raise ConfigError for the first broken rule of *settings* (section *where*)."""
    for spec in dataclasses.fields(settings):  # type: ignore[arg-type]
        rule: Rule | None = spec.metadata.get("rule")
        if rule is None or (rule.when is not None and not rule.when(settings)):
            continue
        value = getattr(settings, spec.name)
        if not rule.holds(value):
            raise ConfigError(f"{source}: {where}.{spec.name}: {rule.fix(value)}")
    for key, fix in settings.problems():
        raise ConfigError(f"{source}: {where}.{key}: {fix}")
