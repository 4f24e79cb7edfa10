"""The decisions of the read path, apart from its I/O.

Reader (reads.py) asks Redis and PostgreSQL; what it does with their answers
is decided here, from the answers, the time (``now``, given) and a random
source (given), so that every rule is unit-tested without servers or sleeps
(dogpile.cache keeps its dogpile lock apart from its backends the same way):

- a Redis hit is served fresh, served stale while one reader refreshes it
  in the background (stale-while-revalidate), refreshed early with the
  probability XFetch gives, or reloaded before it is served
  (:func:`decide_hit`); a write-behind value PostgreSQL does not have yet is
  none of these: it is the newest there is;
- what a miss's lease request leaves this reader to do: serve what Redis had
  after all, load and fill under its lease, or wait for the holder's fill
  (:func:`plan_misses`, :class:`FillWait`);
- from when a loaded row is known current, and whether the near cache may
  keep it (:func:`loaded_read`; the join rule that uses it is
  coordination/single_flight.py's :func:`may_join`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cachecoord.clock import Clock, Random
from cachecoord.model import Entry
from cachecoord.storage.expiry import jittered


@dataclass(frozen=True, slots=True)
class Read:
    """An answer, and what is known of how current it is."""

    entry: Entry
    as_of: int = 0
    """A tick of the reader's load flight taken just before the read that
    produced *entry* (an SQL query, a Redis read, or a lease fill that Redis
    accepted): *entry* reflects every write acknowledged before that tick
    (see coordination/single_flight.py)."""
    confirmed_at: float | None = None
    """Monotonic time at which the read began, if Redis confirmed *entry*
    current (a Redis read, or an accepted fill): the near cache may keep it
    for near_cache_ttl from then. None: not to be kept."""


# -- hits --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HitDecision:
    """What to do with a value found in Redis."""

    stale: bool
    """Past its logical expiry: if served, it is marked stale."""
    remaining_ms: int
    """What is left of its TTL (0 once past it)."""
    reload: bool
    """Past the stale window too: load it again before answering (it is kept
    only to be served if PostgreSQL cannot answer: stale-if-error)."""
    refresh: bool
    """Serve it, and have one reader reload it in the background."""


def decide_hit(
    *,
    now_ms: int,
    fresh_until_ms: int,
    load_ms: int,
    dirty: bool,
    stale_window_ms: int,
    beta: float,
    rand: Random,
) -> HitDecision:
    """Decide on a Redis hit at wall-clock *now_ms*.

    A *dirty* value (a write-behind write PostgreSQL does not have yet, kept
    without a TTL until flushed) is the newest there is: never stale, never
    reloaded from PostgreSQL, which is behind it. Otherwise, past
    *fresh_until_ms* it is stale, and past the stale window as well it must be
    reloaded; a stale value inside the window, or one XFetch picks for an
    early refresh (:func:`refresh_early`), is served and refreshed.
    """
    remaining = fresh_until_ms - now_ms
    if dirty:
        return HitDecision(False, max(0, remaining), False, False)
    stale = remaining <= 0
    reload = stale and -remaining > stale_window_ms
    refresh = not reload and (
        stale or refresh_early(now_ms, load_ms, fresh_until_ms, beta=beta, rand=rand)
    )
    return HitDecision(stale, max(0, remaining), reload, refresh)


def refresh_early(
    now_ms: int, load_ms: int, fresh_until_ms: int, *, beta: float, rand: Random
) -> bool:
    """XFetch (Vattani et al., VLDB 2015): refresh when
    ``now - delta * beta * ln(rand) >= expiry``, delta being what a load took
    (at least 1 ms). ``-ln(rand)`` is exponential, so the chance grows as the
    expiry nears, and sooner for keys that are slow to load; beta scales it
    (0 or less: never early)."""
    if beta <= 0:
        return False
    # 1 - rand is in (0, 1]: ln never sees 0.
    return now_ms - max(load_ms, 1) * beta * math.log(1.0 - rand()) >= fresh_until_ms


# -- fills -------------------------------------------------------------------


def fill_ttl(
    *,
    found: bool,
    ttl_ms: int,
    negative_ttl_ms: int,
    jitter: float,
    stale_window_ms: int,
    stale_if_error_ms: int,
    rand: Random,
) -> tuple[int, int]:
    """The logical TTL of a value just read or written (the negative TTL for
    a key that does not exist), spread by ``± jitter`` so that keys written
    together do not expire together; and the Redis PX to store it with: the
    TTL plus the longer of the stale window and stale-if-error, during which
    it may still be served stale."""
    ttl = jittered(ttl_ms if found else negative_ttl_ms, jitter, rand)
    return ttl, ttl + max(stale_window_ms, stale_if_error_ms)


def loaded_read(
    entry: Entry, *, filled: bool, query_as_of: int, fill_as_of: int, began: float
) -> Read:
    """A row loaded from PostgreSQL, as an answer. If Redis accepted its fill
    (the lease was still there: no write came between the lease and the
    fill), it is current as of the fill, and the near cache may keep it,
    counting its age from *began*, when the read began. Otherwise it is
    current as of its query only, and never kept: a write may have come
    after the query (the refused fill says one did), or Redis could not say."""
    if filled:
        return Read(entry, fill_as_of, began)
    return Read(entry, query_as_of)


# -- leases ------------------------------------------------------------------


class LeaseOutcome(enum.Enum):
    """Redis' answer to a miss's lease request, per key."""

    CACHED = "cached"
    """The key was filled meanwhile: serve that value (current as of this
    Redis read)."""
    LEASED = "leased"
    """This reader holds the lease: it loads, and fills under the lease."""
    HELD = "held"
    """Another reader holds the lease: wait for its fill (up to lease_wait)."""

    @classmethod
    def of(cls, taken: bytes | bool) -> LeaseOutcome:
        """The outcome of one key of ``EntryStore.take_leases``: the cached
        value, True (taken) or False (held by another)."""
        if isinstance(taken, bytes):
            return cls.CACHED
        return cls.LEASED if taken else cls.HELD


@dataclass(frozen=True, slots=True)
class MissPlan:
    """What a reader does about keys that missed Redis, once it asked for
    their leases."""

    cached: dict[str, bytes]
    """Found in Redis after all: served as they are."""
    load: list[str]
    """To load from PostgreSQL (in one query), in the order asked."""
    fill: frozenset[str]
    """Of those, the keys whose lease this reader holds: filled after the load."""
    wait_for: str | None
    """A single key leased by another reader: wait for its fill first, and
    load it only if the wait ends without it."""


def plan_misses(keys: Sequence[str], taken: Mapping[str, bytes | bool]) -> MissPlan:
    """Plan the load of *keys* from Redis' answer to their lease requests
    (*taken*; empty if Redis could not answer: then load all, fill none).

    Only a single key is waited for: a batch does not hold its other keys
    back for one another reader is loading (it loads it too, unfilled)."""
    cached: dict[str, bytes] = {}
    fill: set[str] = set()
    held: set[str] = set()
    for key, answer in taken.items():
        outcome = LeaseOutcome.of(answer)
        if outcome is LeaseOutcome.CACHED:
            assert isinstance(answer, bytes)
            cached[key] = answer
        elif outcome is LeaseOutcome.LEASED:
            fill.add(key)
        else:
            held.add(key)
    load = [key for key in keys if key not in cached]
    wait_for = load[0] if len(load) == 1 and load[0] in held else None
    return MissPlan(cached, load, frozenset(fill), wait_for)


class FillWait:
    """The bounded wait for another reader's fill: up to *lease_wait_ms*,
    woken by its fill notice, with a poll of Redis as the fallback for a lost
    notice, backing off from *first_poll* to *max_poll* seconds.

    Each :meth:`next_timeout` is how long to wait for the notice before the
    next look at Redis; None once the budget is spent (the reader then loads
    the key itself, unfilled)."""

    def __init__(
        self, lease_wait_ms: int, clock: Clock, *, first_poll: float = 0.01, max_poll: float
    ) -> None:
        self._clock = clock
        self._deadline = clock.monotonic() + lease_wait_ms / 1000
        self._poll = first_poll
        self._max_poll = max_poll

    def next_timeout(self) -> float | None:
        remaining = self._deadline - self._clock.monotonic()
        if remaining <= 0:
            return None
        timeout = min(self._poll, remaining)
        self._poll = min(self._poll * 2, self._max_poll)
        return timeout
