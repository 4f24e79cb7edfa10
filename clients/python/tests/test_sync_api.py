"""The blocking `Client` offers exactly what `AsyncClient` offers, blocking.

`cachecoord_client.sync` is generated from `cachecoord_client.client`
(scripts/gen_sync_client.py); these tests hold the generated module to the
public surface users rely on: the same methods, parameters, defaults and
return types, each method a plain function where the asyncio one is a
coroutine function.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

import cachecoord_client
from cachecoord_client import AsyncClient, Client
from cachecoord_client import sync as sync_module

SYNC_NAMES = {"__aenter__": "__enter__", "__aexit__": "__exit__"}
"""Methods whose blocking counterpart is named differently."""

SYNC_ANNOTATIONS = (
    ("AsyncIterator[", "Iterator["),
    ("AsyncWatchStream", "WatchStream"),
    ("grpc.aio.", "grpc."),
)
"""How an annotation of AsyncClient reads in Client (annotations are strings here)."""

BLOCKING_SURFACE = {
    "__init__": "(self, target: 'str', *, default_timeout: 'float' = 5.0, "
    "credentials: 'grpc.ChannelCredentials | None' = None, token: 'str | None' = None, "
    "options: 'Sequence[tuple[str, Any]]' = ()) -> 'None'",
    "__enter__": "(self) -> 'Self'",
    "__exit__": "(self, exc_type: 'type[BaseException] | None', exc: 'BaseException | None', "
    "tb: 'TracebackType | None') -> 'None'",
    "from_channel": "(cls, channel: 'grpc.Channel', *, default_timeout: 'float' = 5.0, "
    "token: 'str | None' = None) -> 'Self'",
    "default_timeout": "(self) -> 'float'",
    "close": "(self) -> 'None'",
    "get": "(self, namespace: 'str', key: 'str', *, min_version: 'int' = 0, "
    "timeout: 'float | None' = None) -> 'Value'",
    "batch_get": "(self, namespace: 'str', keys: 'Iterable[str]', *, "
    "min_versions: 'Mapping[str, int] | None' = None, "
    "timeout: 'float | None' = None) -> 'list[Entry]'",
    # tags: added deliberately (issue 21 item 4), keyword-only with a default.
    "put": "(self, namespace: 'str', key: 'str', value: 'bytes', *, "
    "expected_version: 'int | None' = None, ttl_ms: 'int | None' = None, "
    "tags: 'Iterable[str]' = (), timeout: 'float | None' = None) -> 'int'",
    "delete": "(self, namespace: 'str', key: 'str', *, expected_version: 'int | None' = None, "
    "timeout: 'float | None' = None) -> 'Deleted'",
    "invalidate": "(self, namespace: 'str', keys: 'Iterable[str]' = (), *, all: 'bool' = False, "
    "timeout: 'float | None' = None) -> 'int'",
    "acquire_lock": "(self, name: 'str', *, ttl_ms: 'int', wait_timeout_ms: 'int' = 0, "
    "timeout: 'float | None' = None) -> 'Lock'",
    "release_lock": "(self, name: 'str', token: 'str', *, timeout: 'float | None' = None) "
    "-> 'None'",
    "extend_lock": "(self, name: 'str', token: 'str', *, ttl_ms: 'int', "
    "timeout: 'float | None' = None) -> 'None'",
    "watch": "(self, namespaces: 'Iterable[str]', *, key_prefix: 'str' = '', "
    "timeout: 'float | None' = None, resume: 'bool' = False) -> 'WatchStream'",
    "hold_lock": "(self, name: 'str', *, ttl_ms: 'int', wait_timeout_ms: 'int' = 0, "
    "timeout: 'float | None' = None) -> 'Iterator[HeldLock]'",
}
"""The blocking client's methods as released (before sync.py was generated).
Methods may be added; these must keep their signatures, unless the change is
deliberate (then update this table with it)."""


def _public(cls: type) -> dict[str, Any]:
    """The public attributes of *cls*, dunders of the client protocol included."""
    names = {name for name in vars(cls) if not name.startswith("_")}
    names |= {name for name in vars(cls) if name in ("__init__", *SYNC_NAMES, *SYNC_NAMES.values())}
    return {name: inspect.getattr_static(cls, name) for name in names}


def _function(member: Any) -> Callable[..., Any]:
    if isinstance(member, classmethod | staticmethod):
        return member.__func__
    if isinstance(member, property):
        assert member.fget is not None
        return member.fget
    assert callable(member)
    return member  # type: ignore[no-any-return]


def _blocking(annotation: str) -> str:
    for async_text, sync_text in SYNC_ANNOTATIONS:
        annotation = annotation.replace(async_text, sync_text)
    return annotation


def _signature(member: Any) -> str:
    return str(inspect.signature(_function(member)))


ASYNC_METHODS = _public(AsyncClient)
SYNC_METHODS = _public(Client)


def test_client_has_the_methods_of_async_client_and_no_others() -> None:
    expected = {SYNC_NAMES.get(name, name) for name in ASYNC_METHODS}
    assert set(SYNC_METHODS) == expected


@pytest.mark.parametrize("name", sorted(ASYNC_METHODS))
def test_each_method_has_the_signature_of_its_asyncio_counterpart(name: str) -> None:
    asynchronous = ASYNC_METHODS[name]
    blocking = SYNC_METHODS[SYNC_NAMES.get(name, name)]
    assert type(blocking) is type(asynchronous)  # classmethod, property, function
    assert _signature(blocking) == _blocking(_signature(asynchronous))


@pytest.mark.parametrize("name", sorted(ASYNC_METHODS))
def test_each_coroutine_method_becomes_a_blocking_one(name: str) -> None:
    asynchronous = _function(ASYNC_METHODS[name])
    blocking = _function(SYNC_METHODS[SYNC_NAMES.get(name, name)])
    assert not inspect.iscoroutinefunction(blocking)
    assert not inspect.isasyncgenfunction(inspect.unwrap(blocking))
    if inspect.iscoroutinefunction(asynchronous):
        assert inspect.isfunction(blocking)


@pytest.mark.parametrize("name", sorted(BLOCKING_SURFACE))
def test_the_released_blocking_surface_is_unchanged(name: str) -> None:
    assert _signature(SYNC_METHODS[name]) == BLOCKING_SURFACE[name]


def test_every_public_method_is_documented() -> None:
    for name, member in SYNC_METHODS.items():
        assert inspect.getdoc(_function(member)), name


def test_the_module_exports_the_client_alone() -> None:
    assert sync_module.__all__ == ["Client"]
    assert cachecoord_client.Client is sync_module.Client
    assert sync_module.Client.__module__ == "cachecoord_client.sync"


def test_hold_lock_is_a_context_manager_and_watch_a_plain_method() -> None:
    # contextlib.contextmanager wraps a generator function; the asyncio side an async one.
    assert inspect.isgeneratorfunction(inspect.unwrap(Client.hold_lock))
    assert inspect.isasyncgenfunction(inspect.unwrap(AsyncClient.hold_lock))
    assert not inspect.isgeneratorfunction(Client.watch)
