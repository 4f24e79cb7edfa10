"""How the ``cachecoord`` command prints a value with ``--json``."""

from __future__ import annotations

import base64
import json
from typing import Any


def value_fields(value: bytes) -> dict[str, Any]:
    """A value for ``--json``, decoded once: ``encoding`` says what ``value`` is.

    ``json``: the value is a JSON object or array (always, for a mapped
    namespace), given as such; ``text``: UTF-8 text, as a string; ``base64``:
    any other bytes, base64-encoded.
    """
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return {"encoding": "base64", "value": base64.b64encode(value).decode()}
    if text.lstrip()[:1] in ("{", "["):
        try:
            return {"encoding": "json", "value": json.loads(text)}
        except ValueError:
            pass
    return {"encoding": "text", "value": text}
