"""The canonical form of mapped keys, per key column type (storage/key_forms.py).
That PostgreSQL agrees is checked at every start-up (tables.MappedTable.introspect)
and by tests/integration/test_mapped_keys.py."""

from __future__ import annotations

import pytest

from cachecoord.storage.key_forms import NotAKey, UnsupportedKeyType, canonical_form


@pytest.mark.parametrize(
    ("key_type", "key", "canonical"),
    [
        ("integer", "01", "1"),
        ("bigint", "-9223372036854775808", "-9223372036854775808"),
        ("uuid", "12345678123412341234123456789ABC", "12345678-1234-1234-1234-123456789abc"),
        ("date", "2024-1-1", "2024-01-01"),
        ("date", "0999-12-31", "0999-12-31"),
        ("numeric(10,0)", "1.0", "1"),
        ("numeric(10,0)", "2.5", "3"),
        ("numeric(10,0)", "-0.5", "-1"),
        ("numeric(6,2)", "1.005", "1.01"),
        ("numeric(6,2)", "-0", "0.00"),
        ("numeric(6,2)", "1e2", "100.00"),
        ("numeric(6,2)", " 1.5 ", "1.50"),
        ("numeric(6,2)", "nan", "NaN"),
        ("numeric(10,-1)", "123.456", "120"),
        ("character(4)", "ab", "ab  "),
        ("character(4)", "abcd   ", "abcd"),
        ("character varying(3)", "abc", "abc"),
        ("character varying", "a b ", "a b "),
        ("text", " A ", " A "),
    ],
)
def test_canonical_form(key_type: str, key: str, canonical: str) -> None:
    assert canonical_form(key_type)(key) == canonical


@pytest.mark.parametrize(
    ("key_type", "key"),
    [
        ("smallint", "32768"),
        ("date", "2024-02-30"),
        ("date", "24-01-01"),
        ("date", "infinity"),
        ("date", "today"),
        ("numeric(6,2)", "10000"),
        ("numeric(6,2)", "9999.995"),
        ("numeric(6,2)", "1e99"),
        ("numeric(6,2)", "Infinity"),
        ("character(2)", "abc"),
        ("character varying(2)", "abc"),
    ],
)
def test_no_value_of_the_type(key_type: str, key: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (NotAKey or the parser's own)
        canonical_form(key_type)(key)


def test_reasons_are_given_for_keys_out_of_range() -> None:
    with pytest.raises(NotAKey, match=r"numeric\(6,2\)"):
        canonical_form("numeric(6,2)")("123456")


@pytest.mark.parametrize(
    "key_type",
    ["numeric", "bpchar", "timestamp with time zone", "boolean", "real", "citext", "integer[]"],
)
def test_types_without_an_enforced_canonical_form_are_unsupported(key_type: str) -> None:
    with pytest.raises(UnsupportedKeyType):
        canonical_form(key_type)


def test_a_nondeterministic_collation_is_unsupported() -> None:
    with pytest.raises(UnsupportedKeyType, match="collation"):
        canonical_form("text", deterministic=False)
