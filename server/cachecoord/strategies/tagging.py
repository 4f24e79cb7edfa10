"""Tags: when a cached value carrying tags may still be served.

InvalidateTags never looks for the entries it hides (no key scans). Per
namespace, Redis holds a *tag clock* and, per tag, the clock value at which
the tag was last invalidated (its *mark*; storage/scripts.py INVALIDATE_TAGS
moves the clock and sets the marks in one step). A tagged value records its
tags and the clock value read *before* its content was read from PostgreSQL
(a fill) or written (write-through): its *clock*. It is valid while every one
of its tags has ``mark <= clock``: a tag invalidated after the clock was read
has a higher mark (the clock only grows), so a fill that raced an
InvalidateTags is invalid from the start, and a write made after an
InvalidateTags read a clock at least as high as the marks it set, so it
survives it (rule: :func:`valid`).

A read gets the namespace's clock with the value (EntryStore.read, one round
trip: one MGET on a single Redis); while no tag was invalidated since the
value's clock was read (the clock has not moved) the value is valid without
looking at any mark, and untagged values are never looked at. Otherwise
the marks of the value's tags are read (HMGET), or taken from this
instance's copy of the marks read at that same clock value
(:class:`TagMarks`): the clock moves on every InvalidateTags, so marks read
while it showed a value are the marks of every read that shows it.

A value always records a clock that was there (it is started before a first
fill or tagged write: scripts.py START_TAG_CLOCK), so if Redis lost the
clock (it reads behind the value's) or the marks (their copy of the clock
reads behind it), the value is not trusted: at worst it is reloaded once
more.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence


def valid(*, entry_clock: int, clock: int, marks: Iterable[int] | None) -> bool | None:
    """Whether a tagged value whose clock is *entry_clock* may be served,
    the namespace's clock reading *clock*; None if that needs its tags'
    *marks* and they were not given.

    The clock behind the value's means Redis lost the tag clock (evicted,
    flushed): nothing says which tags were invalidated, so the value is not
    trusted."""
    if clock == entry_clock:
        return True
    if clock < entry_clock:
        return False
    if marks is None:
        return None
    return all(mark <= entry_clock for mark in marks)


_MAX_KEPT = 100_000
"""Tags whose marks one namespace's copy keeps at most (then it starts over)."""

Marks = Callable[[Sequence[str]], Awaitable[tuple[int, list[int]]]]
"""Reads the current marks of some tags from Redis, with the clock as the
marks last saw it (EntryStore.tag_marks)."""


class TagMarks:
    """This instance's copy of one namespace's tag marks, as read while the
    clock showed one value (kept for that value only)."""

    def __init__(self, read_marks: Marks) -> None:
        self._read_marks = read_marks
        self._clock = -1
        self._marks: dict[str, int] = {}

    async def valid(self, tags: Sequence[str], entry_clock: int, clock: int) -> bool:
        """Whether a value with *tags* and *entry_clock* may be served, the
        namespace's clock (read with the value) reading *clock*."""
        decided = valid(entry_clock=entry_clock, clock=clock, marks=None)
        if decided is not None:
            return decided
        cached = self._marks if clock == self._clock else {}
        marks = {tag: cached[tag] for tag in tags if tag in cached}
        missing = [tag for tag in tags if tag not in cached]
        if missing:
            # Read after the clock showed *clock*: at least the marks it
            # stood for (higher ones only hide more, never less).
            recorded, found = await self._read_marks(missing)
            if recorded < clock:
                return False  # the marks were lost (evicted, flushed): nothing to trust
            read = dict(zip(missing, found, strict=True))
            marks.update(read)
            if clock > self._clock or (clock == self._clock and len(self._marks) >= _MAX_KEPT):
                self._clock, self._marks = clock, read
            elif clock == self._clock:
                self._marks.update(read)
        return bool(valid(entry_clock=entry_clock, clock=clock, marks=marks.values()))

    def forget(self) -> None:
        """Redis may have lost or moved the marks (a reconnect): read them again."""
        self._clock, self._marks = -1, {}
