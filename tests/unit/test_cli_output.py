"""How the command line prints values with --json, and its exit codes."""

from __future__ import annotations

import base64

import grpc
import pytest

from cachecoord import exit_codes
from cachecoord.cli_output import value_fields


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"id": 1, "name": "Ada"}', {"encoding": "json", "value": {"id": 1, "name": "Ada"}}),
        (b" [1, 2]", {"encoding": "json", "value": [1, 2]}),
        (b"hello world", {"encoding": "text", "value": "hello world"}),
        # JSON scalars stay text: a script can rely on `encoding`, not guess.
        (b"123", {"encoding": "text", "value": "123"}),
        (b'"quoted"', {"encoding": "text", "value": '"quoted"'}),
        (b"{not json", {"encoding": "text", "value": "{not json"}),
        (b"", {"encoding": "text", "value": ""}),
        (b"\xff\x00", {"encoding": "base64", "value": base64.b64encode(b"\xff\x00").decode()}),
    ],
)
def test_a_value_is_decoded_once_and_says_how(raw: bytes, expected: dict[str, object]) -> None:
    assert value_fields(raw) == expected


def test_each_status_has_its_own_exit_code_apart_from_the_shells() -> None:
    codes = {exit_codes.for_status(code) for code in grpc.StatusCode if code.value[0]}

    assert len(codes) == len(grpc.StatusCode) - 1
    assert exit_codes.for_status(grpc.StatusCode.NOT_FOUND) == 69
    assert exit_codes.for_status(grpc.StatusCode.UNAVAILABLE) == 78
    assert not codes & {exit_codes.OK, exit_codes.FAILURE, exit_codes.USAGE, 126, 127}
    assert max(codes) < 128  # below the shell's 128 + signal
