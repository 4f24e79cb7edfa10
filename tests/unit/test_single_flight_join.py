"""Single-flight's join rule (coordination/single_flight.py), the race of
issue 17 scenario 1 pinned without servers: a Get that starts after a write
was acknowledged must not take the row of a load that read before it.

Ticks stand for moments: the reader takes its ticket after its own Redis
miss; a load's result is current as of the tick taken just before the read
that proves it (its SQL query, a Redis read, or a fill Redis accepted)."""

from __future__ import annotations

import asyncio

import pytest

from cachecoord.coordination.single_flight import Shared, SingleFlight, may_join


def test_a_reader_may_join_a_load_that_began_after_its_miss() -> None:
    assert may_join(ticket=5, started=6, as_of=0)


def test_a_reader_may_join_a_load_whose_proof_came_after_its_miss() -> None:
    assert may_join(ticket=5, started=1, as_of=6)


@pytest.mark.parametrize(("started", "as_of"), [(1, 4), (1, 5), (5, 5), (4, 1)])
def test_a_reader_may_not_join_a_load_that_read_before_its_miss(started: int, as_of: int) -> None:
    assert not may_join(ticket=5, started=started, as_of=as_of)


class HeldLoad:
    """A load that takes its as-of tick (its SQL query), then waits to be let go."""

    def __init__(self, flight: SingleFlight[str, bytes], value: bytes) -> None:
        self._flight = flight
        self.value = value
        self.as_of = 0
        self.queried = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0
        self.filled_as_of: int | None = None

    async def __call__(self) -> Shared[bytes]:
        self.calls += 1
        self.as_of = self._flight.tick()  # just before the query
        self.queried.set()
        await self.release.wait()
        if self.filled_as_of is not None:  # a fill Redis accepted, after the query
            return Shared(self.value, self.filled_as_of)
        return Shared(self.value, self.as_of)


async def test_a_read_that_missed_after_a_write_does_not_take_an_older_load() -> None:
    flight: SingleFlight[str, bytes] = SingleFlight("test")
    old = HeldLoad(flight, b"old")
    first = asyncio.create_task(flight.run("k", old, flight.tick()))
    await old.queried.wait()  # the load has read the old row
    # ... a write is acknowledged here; then a Get starts and misses Redis:
    ticket = flight.tick()
    second = asyncio.create_task(flight.run("k", HeldLoad(flight, b"unused"), ticket))
    await asyncio.sleep(0)  # it joins the running load
    old.release.set()

    assert await first == b"old"  # the Get that began before the write
    assert await second is None  # must read again

    # It reads again with its first ticket: the load it starts (or finds) now
    # began after its miss, so it is taken.
    new = HeldLoad(flight, b"new")
    new.release.set()
    assert await flight.run("k", new, ticket) == b"new"


async def test_a_read_again_is_served_by_a_load_that_started_after_its_miss() -> None:
    """At most one retry: a load found on the second try began after the
    reader's ticket, whatever its as-of tick."""
    flight: SingleFlight[str, bytes] = SingleFlight("test")
    ticket = flight.tick()  # the reader's miss; its first load was refused
    later = HeldLoad(flight, b"new")
    starter = asyncio.create_task(flight.run("k", later, flight.tick()))
    await later.queried.wait()
    joiner = asyncio.create_task(flight.run("k", HeldLoad(flight, b"unused"), ticket))
    await asyncio.sleep(0)
    later.release.set()
    assert await starter == b"new"
    assert await joiner == b"new"
    assert later.calls == 1


async def test_readers_that_missed_before_the_query_share_its_load() -> None:
    flight: SingleFlight[str, bytes] = SingleFlight("test")
    load = HeldLoad(flight, b"v")
    tickets = [flight.tick() for _ in range(3)]  # three misses, then the load
    readers = [asyncio.create_task(flight.run("k", load, t)) for t in tickets]
    await load.queried.wait()
    load.release.set()
    assert await asyncio.gather(*readers) == [b"v"] * 3
    assert load.calls == 1


async def test_a_reader_that_missed_after_the_query_takes_a_row_whose_fill_was_accepted() -> None:
    """The accepted fill proves no write came between the lease and the
    fill: a reader whose miss came before the fill may take the row."""
    flight: SingleFlight[str, bytes] = SingleFlight("test")
    load = HeldLoad(flight, b"v")
    first = asyncio.create_task(flight.run("k", load, flight.tick()))
    await load.queried.wait()
    ticket = flight.tick()  # missed after the query...
    joiner = asyncio.create_task(flight.run("k", HeldLoad(flight, b"unused"), ticket))
    await asyncio.sleep(0)
    load.filled_as_of = flight.tick()  # ... but before the fill Redis accepted
    load.release.set()
    assert await first == b"v"
    assert await joiner == b"v"


async def test_the_reader_that_starts_a_load_always_takes_it() -> None:
    flight: SingleFlight[str, bytes] = SingleFlight("test")
    load = HeldLoad(flight, b"v")
    load.release.set()
    late_ticket = 10**6  # newer than anything the load records
    assert await flight.run("k", load, late_ticket) == b"v"


async def test_a_finished_load_is_not_joined() -> None:
    flight: SingleFlight[str, bytes] = SingleFlight("test")
    load = HeldLoad(flight, b"v")
    load.release.set()
    await flight.run("k", load, flight.tick())
    assert "k" not in flight
    again = HeldLoad(flight, b"w")
    again.release.set()
    assert await flight.run("k", again, flight.tick()) == b"w"


async def test_a_cancelled_reader_does_not_cancel_the_load_others_wait_for() -> None:
    flight: SingleFlight[str, bytes] = SingleFlight("test")
    load = HeldLoad(flight, b"v")
    tickets = flight.tick(), flight.tick()
    gone = asyncio.create_task(flight.run("k", load, tickets[0]))
    staying = asyncio.create_task(flight.run("k", load, tickets[1]))
    await load.queried.wait()
    gone.cancel()
    load.release.set()
    assert await staying == b"v"
    assert gone.cancelled()


# -- read_through: the reader's side, its miss, its ticket, its retry -----------


class Cache:
    """The cache a reader looks in: a miss until :attr:`value` is set; counts looks."""

    def __init__(self) -> None:
        self.value: bytes | None = None
        self.looks = 0

    async def look(self) -> bytes | None:
        self.looks += 1
        return self.value


async def test_a_hit_is_answered_without_a_load() -> None:
    flight: SingleFlight[str, bytes] = SingleFlight("test")
    cache, load = Cache(), HeldLoad(flight, b"unused")
    cache.value = b"cached"
    assert await flight.read_through("k", cache.look, load) == b"cached"
    assert load.calls == 0


async def test_a_read_that_misses_after_a_write_reads_again_instead_of_taking_the_older_load() -> (
    None
):
    """Issue 17 scenario 1 from the reader's side: its ticket is taken after
    its own miss, so the older load is refused; it looks again (once) and
    its own load answers the new row."""
    flight: SingleFlight[str, bytes] = SingleFlight("test")
    old = HeldLoad(flight, b"old")
    first = asyncio.create_task(flight.read_through("k", Cache().look, old))
    await old.queried.wait()  # the older load has read the old row
    # ... a write is acknowledged; a Get starts and misses:
    cache, new = Cache(), HeldLoad(flight, b"new")
    second = asyncio.create_task(flight.read_through("k", cache.look, new))
    await asyncio.sleep(0)
    old.release.set()
    new.release.set()
    assert await first == b"old"
    assert await second == b"new"
    assert cache.looks == 2
    assert (old.calls, new.calls) == (1, 1)


async def test_a_read_refused_once_takes_a_hit_found_on_its_second_look() -> None:
    flight: SingleFlight[str, bytes] = SingleFlight("test")
    old = HeldLoad(flight, b"old")
    first = asyncio.create_task(flight.read_through("k", Cache().look, old))
    await old.queried.wait()
    cache, unused = Cache(), HeldLoad(flight, b"unused")
    second = asyncio.create_task(flight.read_through("k", cache.look, unused))
    await asyncio.sleep(0)
    cache.value = b"filled meanwhile"
    old.release.set()
    assert await first == b"old"
    assert await second == b"filled meanwhile"
    assert unused.calls == 0


async def test_concurrent_misses_before_the_query_share_one_load() -> None:
    flight: SingleFlight[str, bytes] = SingleFlight("test")
    load = HeldLoad(flight, b"v")
    readers = [asyncio.create_task(flight.read_through("k", Cache().look, load)) for _ in range(5)]
    await load.queried.wait()
    load.release.set()
    assert await asyncio.gather(*readers) == [b"v"] * 5
    assert load.calls == 1
