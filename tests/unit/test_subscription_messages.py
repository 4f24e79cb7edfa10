"""The messages of a subscription (storage/subscription.py) over stand-in
connections: deliveries of either kind pass in order, Redis' confirmations
make it confirmed, and an unsubscription Redis pushes by itself (a shard
channel's slot left the node) or a connection's failure is the whole
subscription's drop."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from cachecoord.storage.subscription import Messages, Unsubscribed


class Connection:
    """A PubSub that replies what it is given, then waits."""

    def __init__(self, *replies: dict[str, Any] | Exception) -> None:
        self.replies = list(replies)

    async def get_message(self, timeout: float) -> dict[str, Any] | None:  # noqa: ASYNC109 (PubSub's)
        if not self.replies:
            await asyncio.sleep(timeout)
            return None
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


def reply(kind: str, channel: str, data: bytes | int = 1) -> dict[str, Any]:
    return {"type": kind, "pattern": None, "channel": channel.encode(), "data": data}


async def drained(subscription: Messages) -> None:
    """Wait for the confirmations, then read until the subscription drops."""
    await subscription.confirmed()
    while True:
        await subscription.next()


def messages(*connections: tuple[Connection, int]) -> Messages:
    return Messages([(cast("Any", c), n) for c, n in connections], wait=0.05)


async def test_deliveries_of_both_kinds_pass_once_every_channel_is_confirmed() -> None:
    classic = Connection(reply("subscribe", "cc:locks"), reply("message", "cc:locks", b"l"))
    shard = Connection(
        reply("ssubscribe", "cc:inv:{a:0}"),
        reply("ssubscribe", "cc:inv:{a:1}"),
        reply("smessage", "cc:inv:{a:1}", b"m"),
    )
    subscription = messages((classic, 1), (shard, 2))
    try:
        await subscription.confirmed()
        got = {await subscription.next(), await subscription.next()}
        assert got == {("cc:locks", b"l"), ("cc:inv:{a:1}", b"m")}
        assert await subscription.next() is None
    finally:
        await subscription.aclose()


@pytest.mark.parametrize("kind", ["sunsubscribe", "unsubscribe"])
async def test_an_unsubscription_pushed_by_redis_drops_the_subscription(kind: str) -> None:
    shard = Connection(reply("ssubscribe", "cc:inv:{a:0}"), reply(kind, "cc:inv:{a:0}", 0))
    subscription = messages((Connection(), 0), (shard, 1))
    try:
        with pytest.raises(Unsubscribed):
            await drained(subscription)
    finally:
        await subscription.aclose()
    assert issubclass(Unsubscribed, RedisError)


async def test_a_connection_lost_before_confirmation_fails_the_subscription() -> None:
    lost = Connection(RedisConnectionError("lost"))
    subscription = messages((Connection(reply("subscribe", "cc:locks")), 1), (lost, 1))
    try:
        with pytest.raises(RedisConnectionError):
            await drained(subscription)
    finally:
        await subscription.aclose()
