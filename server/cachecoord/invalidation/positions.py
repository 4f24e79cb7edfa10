"""Positions in the invalidation log, and the rule that says whether the log
still reaches back to one. Pure: no I/O.

A position is a Redis Stream entry id, ``<ms>-<seq>``, of one partition of a
namespace's log (storage/invalidation_log.py); '' is "none": a namespace this
instance (or a token) never took a position of.
"""

from __future__ import annotations

import re

from cachecoord.storage.invalidation_log import PartitionState

POSITION_RE = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")

NONE = ""
"""No position: whatever came before is unknown."""


def order(position: str) -> tuple[int, int]:
    """A sort key of *position* ('' sorts first)."""
    if not position:
        return (-1, -1)
    ms, _, seq = position.partition("-")
    return (int(ms), int(seq))


def is_newer(position: str, than: str) -> bool:
    """Whether *position* comes after *than* in its partition."""
    return order(position) > order(than)


def reaches_back(state: PartitionState, position: str) -> bool:
    """Whether every entry of a partition after *position* is still in its
    log, given what the log holds (*state*).

    Yes if the position is the log's last-generated id (nothing came after
    it; its entry may have been trimmed), or if its entry is still there (the
    log is trimmed from its head only, so every later one is too). No when
    there is no position, no log (Redis lost it), or the position's entry is
    gone: trimmed by length or age, or never in this log (a log recreated
    after Redis lost its data, or a failover to a replica that had not
    received it: its last-generated id is then behind the position)."""
    if not position or not state.exists:
        return False
    return state.last == position or state.holds_position
