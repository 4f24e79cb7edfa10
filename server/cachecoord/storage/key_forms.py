"""The canonical text form of a mapped table's keys, per key column type.

A key names its row through a cast (``key::type``), and many spellings cast
to one value: ``01`` and ``1``, ``2024-1-1`` and ``2024-01-01``, ``1.0`` and
``1`` in a ``numeric(10,0)`` column, ``ab`` and ``ab  `` in a
``character(4)`` one. Each spelling would be a cache entry of its own, and a
change of the row (a Put through another spelling, or a change trigger,
which names the row by its JSON text) would invalidate only one of them. So
a key must be the text PostgreSQL writes for its value in JSON
(``to_jsonb(value) #>> '{}'``: what ``row_to_json`` and the change triggers
carry). A key column type for which this module cannot compute that form is
refused at start-up (:class:`UnsupportedKeyType`), and at start-up the form
computed here is compared with PostgreSQL's own on sample keys
(``tables.MappedTable.introspect``).
"""

from __future__ import annotations

import datetime
import re
import uuid
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation, localcontext

Canonical = Callable[[str], str]
"""A key's canonical form; ValueError if no value of the type has it (NotAKey
when this module says why)."""

SUPPORTED = (
    "smallint, integer, bigint, uuid, text, character varying, character varying(n), "
    "character(n), date, numeric(p,s)"
)

# Keys tried at start-up against PostgreSQL's own output, for each type
# (those that are no value of the type are skipped).
SAMPLES = (
    "0",
    "1",
    "-1",
    "01",
    "+7",
    "12",
    "1.5",
    "-0.25",
    "1.005",
    "1e2",
    "-0",
    "ab",
    "ab ",
    " a b",
    "2024-01-01",
    "2024-1-1",
    "0999-12-31",
    "12345678-1234-1234-1234-123456789abc",
    "12345678-1234-1234-1234-123456789ABC",
)

_INTEGER_RANGES = {"smallint": 2**15, "integer": 2**31, "bigint": 2**63}
_DATE = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})")
_NUMBER = re.compile(r"\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*|\s*(?i:nan)\s*")


class NotAKey(ValueError):
    """No value of the key column's type is written this way; the message says why."""


class UnsupportedKeyType(Exception):
    """The key column's type has no canonical form enforced here; the message says why."""


def canonical_form(key_type: str, *, deterministic: bool = True) -> Canonical:
    """The canonical form of keys of *key_type* (as ``format_type`` names it);
    *deterministic*: whether the column's collation is (text types)."""
    if key_type in _INTEGER_RANGES:
        return _integer(_INTEGER_RANGES[key_type])
    if key_type == "uuid":
        return lambda key: str(uuid.UUID(key))
    if key_type == "date":
        return _date
    if match := re.fullmatch(r"numeric\((\d+),(-?\d+)\)", key_type):
        return _numeric(int(match[1]), int(match[2]))
    if key_type == "numeric":
        raise UnsupportedKeyType(
            "numeric without a scale keeps the scale it was written with: '1', '1.0' and "
            "'1.00' are one row but three spellings, and which one the row shows depends on "
            "how it was written; give the column a scale (numeric(p,s)) or an integer type"
        )
    text = re.fullmatch(r"(text|character varying|character)(?:\((\d+)\))?", key_type)
    if text is None:
        raise UnsupportedKeyType(
            "several spellings may name one value of this type, and cachecoord does not know "
            "its canonical form"
        )
    if not deterministic:
        raise UnsupportedKeyType(
            "the column's collation is nondeterministic: keys that differ (in case, say) may "
            "name one row"
        )
    length = None if text[2] is None else int(text[2])
    if text[1] == "character":
        if length is None:  # "bpchar": trailing spaces are insignificant but kept
            raise UnsupportedKeyType("character without a length keeps trailing spaces as given")
        return _character(length)
    return _varying(length)


def _integer(bound: int) -> Canonical:
    def canonical(key: str) -> str:
        number = int(key)
        if not -bound <= number < bound:
            raise NotAKey("out of the column type's range")
        return str(number)

    return canonical


def _date(key: str) -> str:
    parts = _DATE.fullmatch(key)
    if parts is None:
        raise NotAKey("a date key is written YYYY-MM-DD (years 1 to 9999)")
    year, month, day = (int(part) for part in parts.groups())
    return datetime.date(year, month, day).isoformat()  # ValueError if no such day


def _numeric(precision: int, scale: int) -> Canonical:
    def canonical(key: str) -> str:
        if _NUMBER.fullmatch(key) is None:
            raise NotAKey("not a decimal number")
        with localcontext() as context:
            context.prec = 2 * (precision + abs(scale)) + 10
            try:
                number = Decimal(key.strip())
                if number.is_nan():
                    return "NaN"
                if not number.is_zero() and number.adjusted() >= precision - scale:
                    raise NotAKey(f"out of range for numeric({precision},{scale})")
                # PostgreSQL rounds to the scale, halves away from zero.
                rounded = number.quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)
            except InvalidOperation:
                raise NotAKey("not a decimal number") from None
            if abs(rounded) >= Decimal(10) ** (precision - scale):
                raise NotAKey(f"out of range for numeric({precision},{scale})")
            return format(rounded.copy_abs() if rounded.is_zero() else rounded, "f")

    return canonical


def _character(length: int) -> Canonical:
    def canonical(key: str) -> str:
        # Trailing spaces are padding: 'ab' and 'ab  ' are one value, shown padded.
        value = key.rstrip(" ")
        if len(value) > length:
            raise NotAKey(f"longer than the column's {length} characters")
        return value.ljust(length)

    return canonical


def _varying(length: int | None) -> Canonical:
    def canonical(key: str) -> str:
        # The cast in a lookup (key::varchar(n)) would cut a longer key to n
        # characters and find the row of its first n.
        if length is not None and len(key) > length:
            raise NotAKey(f"longer than the column's {length} characters")
        return key

    return canonical
