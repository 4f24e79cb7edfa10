"""Tags a mapped namespace derives from its rows' columns.

``tags = ["tenant:{tenant_id}", "plan:{plan}"]`` in a namespace's settings:
each template is text with ``{column}`` placeholders (``{{`` and ``}}`` for
braces), rendered from the row as PostgreSQL returns it (row_to_json). A
string column is inserted as it is, a number or boolean as JSON writes it;
a row whose placeholder column is NULL does not get that tag.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class BadTemplate(ValueError):
    """A template that is not text with ``{column}`` placeholders."""


@dataclass(frozen=True, slots=True)
class TagTemplate:
    text: str
    parts: tuple[tuple[str, str | None], ...]
    """(literal text, column or None), in order."""

    @classmethod
    def parse(cls, text: str) -> TagTemplate:
        if not text:
            raise BadTemplate("a tag template must not be empty")
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as err:
            raise BadTemplate(f"{text!r}: {err}") from None
        parts: list[tuple[str, str | None]] = []
        for literal, column, spec, conversion in parsed:
            if column is not None and (not column or spec or conversion):
                raise BadTemplate(
                    f"{text!r}: placeholders name one column, as {{tenant_id}}, "
                    "without a conversion or format"
                )
            parts.append((literal, column))
        return cls(text, tuple(parts))

    @property
    def columns(self) -> list[str]:
        return [column for _, column in self.parts if column is not None]

    def render(self, row: Mapping[str, Any]) -> str | None:
        """The tag of *row*; None if a column it names is NULL (or absent)."""
        out: list[str] = []
        for literal, column in self.parts:
            out.append(literal)
            if column is None:
                continue
            value = row.get(column)
            if value is None:
                return None
            out.append(value if isinstance(value, str) else json.dumps(value))
        return "".join(out)


def derive(templates: Sequence[TagTemplate], value: bytes | None) -> tuple[str, ...]:
    """The tags of a row (a JSON object), in template order, without repeats."""
    if not templates or value is None:
        return ()
    row = json.loads(value)
    rendered = (template.render(row) for template in templates)
    return tuple(dict.fromkeys(tag for tag in rendered if tag))
