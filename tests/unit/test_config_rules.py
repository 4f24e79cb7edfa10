"""Bounds are declared beside their fields (config/schema.py) and checked by
one validator: every bounded field refuses a value just outside its bound,
naming its own key, and accepts its default."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from cachecoord.config import (
    ConfigError,
    Kind,
    NamespaceSettings,
    PostgresSettings,
    RedisSettings,
    ServerSettings,
    StrategyName,
    rules,
)
from cachecoord.config.rules import Rule

WRITE_BEHIND = NamespaceSettings(name="x", kind=Kind.MANAGED, strategy=StrategyName.WRITE_BEHIND)
SETTINGS: dict[str, Any] = {
    "server": ServerSettings(),
    "redis": RedisSettings(),
    "postgres": PostgresSettings(),
    "namespaces.x": dataclasses.replace(WRITE_BEHIND, near_cache_entries=10),
}


def bounded_fields() -> list[tuple[str, str]]:
    return [
        (where, spec.name)
        for where, settings in SETTINGS.items()
        for spec in dataclasses.fields(settings)
        if "rule" in spec.metadata
    ]


def just_outside(value: Any) -> list[Any]:
    if isinstance(value, str):
        return ["nonsense"]
    return [-(10**12), 10**12]


def test_defaults_satisfy_every_rule() -> None:
    for where, settings in SETTINGS.items():
        rules.check(settings, where, "<test>")


@pytest.mark.parametrize(("where", "key"), bounded_fields())
def test_a_value_outside_a_bound_is_refused_naming_its_key(where: str, key: str) -> None:
    settings = SETTINGS[where]
    rule: Rule = next(f for f in dataclasses.fields(settings) if f.name == key).metadata["rule"]
    refused = [value for value in just_outside(getattr(settings, key)) if not rule.holds(value)]
    assert refused, f"{where}.{key} has a rule that refuses nothing tried"
    for value in refused:
        with pytest.raises(ConfigError, match=rf"<test>: {where}\.{key}: "):
            rules.check(dataclasses.replace(settings, **{key: value}), where, "<test>")


def test_write_behind_bounds_apply_to_write_behind_namespaces_only() -> None:
    cache_aside = NamespaceSettings(name="x", kind=Kind.MANAGED, partitions=0)
    rules.check(cache_aside, "namespaces.x", "<test>")
    with pytest.raises(ConfigError, match=r"namespaces\.x\.partitions: .*\(got 0\)"):
        rules.check(dataclasses.replace(WRITE_BEHIND, partitions=0), "namespaces.x", "<test>")
