"""``CACHECOORD_<SECTION>_<KEY>`` environment variables over the file's sections."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from cachecoord.config.values import ConfigError

ALIASES = {"CACHECOORD_DATABASE_URL": "CACHECOORD_POSTGRES_URL"}
# Read by the command line, not settings.
IGNORED = {
    "CACHECOORD_CONFIG",
    "CACHECOORD_LOG_LEVEL",
    "CACHECOORD_LOG_FORMAT",
    "CACHECOORD_TARGET",
}

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


def apply(
    sections: dict[str, dict[str, Any]],
    classes: Mapping[str, type[Any]],
    environ: Mapping[str, str],
) -> dict[str, str]:
    """Apply the overrides to *sections* (the file's values of each section of
    *classes*); return ``section.key -> variable`` for messages."""
    from_env: dict[str, str] = {}
    for var, value in sorted(environ.items()):
        if not var.startswith("CACHECOORD_") or var in IGNORED:
            continue
        if _is_service_link(var, value):
            continue
        canonical = ALIASES.get(var, var)
        section, _, key = canonical.removeprefix("CACHECOORD_").lower().partition("_")
        known = (
            {f.name for f in dataclasses.fields(classes[section])} if section in classes else set()
        )
        if key not in known:
            raise ConfigError(
                f"environment variable {var} is not a setting; use CACHECOORD_<SECTION>_<KEY> "
                f"with a section of {', '.join(classes)} and a key of that section"
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
