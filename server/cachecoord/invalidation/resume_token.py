"""The Watch resume_token: for each watched namespace, the position of every
partition of its invalidation log that the stream had reached. Pure: no I/O.

Opaque to clients: ``v1.`` then the URL-safe base64 (unpadded) of a JSON
object ``{"<namespace>": ["<position>", ...]}``, one position per partition
('' where the stream had none).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence

from cachecoord.invalidation.positions import POSITION_RE

_VERSION = "v1."
_MAX_LENGTH = 1_000_000


class InvalidToken(ValueError):
    """A resume_token that this server did not make (or for other namespaces)."""


Positions = Mapping[str, Sequence[str]]
"""namespace -> the position of each of its partitions."""


def encode(positions: Positions) -> str:
    data = {name: list(positions[name]) for name in sorted(positions)}
    raw = json.dumps(data, separators=(",", ":")).encode()
    return _VERSION + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, partitions: Mapping[str, int]) -> dict[str, tuple[str, ...]]:
    """The positions in *token*, which must be for exactly the namespaces of
    *partitions* (namespace -> its partition count), each with that many
    partitions. Raises InvalidToken otherwise."""
    if len(token) > _MAX_LENGTH or not token.startswith(_VERSION):
        raise InvalidToken("resume_token is not a token this server made")
    body = token[len(_VERSION) :]
    try:
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, binascii.Error) as err:
        raise InvalidToken("resume_token is not a token this server made") from err
    if not isinstance(data, dict):
        raise InvalidToken("resume_token is not a token this server made")
    if set(data) != set(partitions):
        raise InvalidToken(
            "resume_token is for namespaces "
            f"{', '.join(sorted(map(str, data))) or '(none)'}, not "
            f"{', '.join(sorted(partitions))}: watch the same namespaces to resume"
        )
    decoded: dict[str, tuple[str, ...]] = {}
    for name, count in partitions.items():
        positions = data[name]
        if not isinstance(positions, list) or len(positions) != count:
            raise InvalidToken(
                f"resume_token does not match the {count} log partitions of namespace {name!r}"
            )
        if not all(isinstance(p, str) and (not p or POSITION_RE.match(p)) for p in positions):
            raise InvalidToken(f"resume_token holds a malformed position of namespace {name!r}")
        decoded[name] = tuple(positions)
    return decoded
