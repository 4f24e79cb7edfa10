"""The hot read commands' way to Redis: pipelined connections (pipelined.py),
one per node, beside redis-py's client, which keeps every other command.

On a single Redis every command goes to its one connection. On a Redis
Cluster each command goes to the node redis-py's cluster client maps its
key's slot to; whatever that map cannot be trusted for is answered
:data:`REROUTE`, and the caller sends that command through redis-py, which
follows MOVED and ASK, refreshes the topology and retries as it always did:

* a slot redis-py does not know (yet);
* a MOVED, ASK, CLUSTERDOWN or TRYAGAIN reply (a slot migration, a failover);
* a node that cannot be reached or does not answer in time (maybe failed over).

Scripts go by SHA (EVALSHA); a node that answers NOSCRIPT gets the script
(SCRIPT LOAD) and the commands that did not run, again.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

import redis.asyncio as redis
from opentelemetry import trace
from redis.asyncio.cluster import ClusterNode, NodesManager
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cachecoord import instruments
from cachecoord.storage.pipelined import Command, MixedReplies, PipelinedConnection


class _Reroute:
    def __repr__(self) -> str:
        return "REROUTE"


REROUTE: Any = _Reroute()
"""The reply of a command to send through redis-py instead."""

_ROUTING_DOUBT = (MovedError, AskError, ClusterDownError, TryAgainError)


class HotPath:
    """Pipelined connections to the nodes of *client* (a single Redis or a
    cluster), made with the settings of the client's own connections."""

    def __init__(self, client: redis.Redis | redis.RedisCluster) -> None:
        self._client = client
        self._scripts: dict[str, str] = {}
        self._nodes: dict[str, PipelinedConnection] = {}
        self._single: PipelinedConnection | None = None
        self._cluster: NodesManager | None = None
        if isinstance(client, redis.RedisCluster):
            self._cluster = client.nodes_manager
        if isinstance(client, redis.Redis):
            pool = client.connection_pool
            self._single = PipelinedConnection(
                lambda: pool.connection_class(**pool.connection_kwargs),
                name=_address(pool.connection_kwargs),
            )

    def register(self, script: AsyncScript) -> None:
        """Make *script* known, to load it where a node answers NOSCRIPT."""
        self._scripts[script.sha] = (
            script.script.decode() if isinstance(script.script, bytes) else str(script.script)
        )

    async def execute(self, keys: Sequence[str], commands: Sequence[Command]) -> list[Any]:
        """The replies of *commands* (``commands[i]`` touches the slot of
        ``keys[i]``): a plain ``list`` of values, or MixedReplies where some
        are error replies (exception objects, not raised) or REROUTE.

        On a single Redis, raises redis-py's ConnectionError or TimeoutError
        if Redis cannot be reached; on a cluster, those commands are REROUTE.

        In a sampled request the call is a client span, as the Redis
        instrumentation makes for redis-py's commands (which these bypass)."""
        if instruments.request_span.get() is None:
            return await self._execute(keys, commands)
        with instruments.tracer.start_as_current_span(
            _span_name(commands), kind=trace.SpanKind.CLIENT, attributes=self._attributes(commands)
        ):
            return await self._execute(keys, commands)

    def _attributes(self, commands: Sequence[Command]) -> dict[str, Any]:
        statement = "\n".join(_statement(command) for command in commands)
        attributes: dict[str, Any] = {"db.redis.pipeline_length": len(commands)}
        if _OLD_SEMCONV:
            attributes |= {"db.system": "redis", "db.statement": statement}
        if _STABLE_SEMCONV:
            attributes |= {"db.system.name": "redis", "db.query.text": statement}
        if self._single is not None:
            attributes["net.peer.name" if _OLD_SEMCONV else "server.address"] = self._single.name
        return attributes

    async def _execute(self, keys: Sequence[str], commands: Sequence[Command]) -> list[Any]:
        single = self._single
        if single is None:
            return await self._on_cluster(keys, commands)
        replies = await single.execute(commands)
        if type(replies) is list:
            return replies
        return await self._load_scripts(single, commands, replies)

    async def _load_scripts(
        self, connection: PipelinedConnection, commands: Sequence[Command], replies: list[Any]
    ) -> list[Any]:
        """Send again the commands answered NOSCRIPT (the node lost its
        scripts: a restart, SCRIPT FLUSH, a new replica), scripts loaded first."""
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            shas = dict.fromkeys(commands[i][1] for i in missing)
            loads = [("SCRIPT", "LOAD", self._scripts[sha]) for sha in shas if sha in self._scripts]
            again = await connection.execute([*loads, *(commands[i] for i in missing)])
            for i, reply in zip(missing, again[len(loads) :], strict=True):
                replies[i] = reply
        if any(isinstance(reply, Exception) for reply in replies):
            return MixedReplies(replies)
        return list(replies)

    async def _on_cluster(self, keys: Sequence[str], commands: Sequence[Command]) -> list[Any]:
        if len(commands) == 1:
            connection = self._connection_for(keys[0])
            if connection is None:
                return MixedReplies([REROUTE])
            return await self._on_node(connection, commands)
        groups: dict[PipelinedConnection, list[int]] = {}
        for i, key in enumerate(keys):
            if (connection := self._connection_for(key)) is not None:
                groups.setdefault(connection, []).append(i)
        if len(groups) == 1:
            ((connection, indices),) = groups.items()
            answered = [await self._on_node(connection, [commands[i] for i in indices])]
        else:
            answered = await asyncio.gather(
                *(
                    self._on_node(connection, [commands[i] for i in indices])
                    for connection, indices in groups.items()
                )
            )
        replies: list[Any] = [REROUTE] * len(commands)
        mixed = sum(map(len, groups.values())) < len(commands)
        for indices, answers in zip(groups.values(), answered, strict=True):
            mixed = mixed or type(answers) is not list
            for i, answer in zip(indices, answers, strict=True):
                replies[i] = answer
        return MixedReplies(replies) if mixed else replies

    async def _on_node(self, connection: PipelinedConnection, sent: Sequence[Command]) -> list[Any]:
        try:
            answers = await connection.execute(sent)
            if type(answers) is list:
                return answers
            answers = await self._load_scripts(connection, sent, answers)
        except (RedisConnectionError, RedisTimeoutError):
            # REROUTE: redis-py finds out whether the node failed over.
            return MixedReplies([REROUTE] * len(sent))
        if type(answers) is list:
            return answers
        return MixedReplies(REROUTE if isinstance(a, _ROUTING_DOUBT) else a for a in answers)

    def _connection_for(self, key: str) -> PipelinedConnection | None:
        """The connection to the node redis-py maps *key*'s slot to, if any."""
        assert self._cluster is not None
        try:
            node = self._cluster.get_node_from_slot(key_slot(key.encode()))
        except (RedisError, RedisClusterException):  # not covered, or not known yet
            return None
        return self._nodes.get(node.name) or self._connection(node)

    def _connection(self, node: ClusterNode) -> PipelinedConnection:
        connection = self._nodes.get(node.name)
        if connection is None:
            # As redis-py's cluster nodes make theirs: no retries at the
            # connection (the cluster client retries, after a refresh).
            kwargs = {**node.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
            connection = self._nodes[node.name] = PipelinedConnection(
                lambda: node.connection_class(**kwargs), name=node.name
            )
        return connection

    def close(self) -> None:
        """Close every connection; calls in flight fail with ConnectionError."""
        if self._single is not None:
            self._single.close()
        for connection in self._nodes.values():
            connection.close()


# The database attributes the contrib instrumentations use, by
# OTEL_SEMCONV_STABILITY_OPT_IN: "database" the stable names only,
# "database/dup" both, otherwise the old ones.
_OPT_IN = {part.strip() for part in os.environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "").split(",")}
_STABLE_SEMCONV = bool(_OPT_IN & {"database", "database/dup"})
_OLD_SEMCONV = "database" not in _OPT_IN


def _span_name(commands: Sequence[Command]) -> str:
    names = dict.fromkeys(str(command[0]) for command in commands)
    return " ".join(names)


def _statement(command: Command) -> str:
    """The command with its arguments left out, as the Redis instrumentation
    sanitizes them (a script's SHA stays: it names the script)."""
    name = str(command[0])
    shown = 2 if name == "EVALSHA" else 1
    return " ".join([*map(str, command[:shown]), *("?" * (len(command) - shown))])


def _address(kwargs: dict[str, Any]) -> str:
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


class PipelinedRedis(redis.Redis):
    """``redis.asyncio.Redis`` with a :class:`HotPath` beside its pool, closed with it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hot_path = HotPath(self)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        self.hot_path.close()
        await super().aclose(close_connection_pool)
