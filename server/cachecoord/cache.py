"""The domain entry point: find the namespace, validate the input, and hand the
call to the namespace's strategy. Front-ends (the gRPC servicer, the CLI)
only translate to and from these calls."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager

from cachecoord import instruments, telemetry
from cachecoord.config import ServerSettings
from cachecoord.errors import InvalidArgument, NamespaceNotFound
from cachecoord.invalidation import resume_token as resume_token_codec
from cachecoord.invalidation.watch import Watcher, WatchHub
from cachecoord.model import Deleted, Entry, Layer
from cachecoord.strategies import Strategy

MAX_TTL_MS = 365 * 86_400_000
MAX_PUT_TAGS = 16
MAX_INVALIDATED_TAGS = 100
MAX_TAG_BYTES = 128


class Cache:
    """Get, BatchGet, Put, Delete and Invalidate over configured namespaces."""

    def __init__(
        self, namespaces: Mapping[str, Strategy], limits: ServerSettings, watch_hub: WatchHub
    ) -> None:
        self._namespaces = dict(namespaces)
        self._limits = limits
        self._watch_hub = watch_hub

    async def get(self, namespace: str, key: str, *, min_version: int = 0) -> Entry:
        strategy = self._namespace(namespace)
        self._check_key(strategy, key)
        _check_min_version(key, min_version)
        entry = await strategy.get(key, min_version)
        if telemetry.TRACING or telemetry.METRICS:
            _observe(strategy, [entry])
        return entry

    async def batch_get(
        self,
        namespace: str,
        keys: Sequence[str],
        *,
        min_versions: Mapping[str, int] | None = None,
    ) -> list[Entry]:
        strategy = self._namespace(namespace)
        self._check_keys(strategy, keys)
        if min_versions:
            unknown = sorted(set(min_versions) - set(keys))
            if unknown:
                raise InvalidArgument(
                    f"min_versions names keys that are not in keys: {', '.join(unknown[:5])}"
                )
            for key, version in min_versions.items():
                _check_min_version(key, version)
        entries = await strategy.batch_get(keys, min_versions)
        if telemetry.TRACING or telemetry.METRICS:
            _observe(strategy, entries)
        return entries

    async def put(
        self,
        namespace: str,
        key: str,
        value: bytes,
        *,
        expected_version: int | None = None,
        ttl_ms: int | None = None,
        tags: Sequence[str] = (),
    ) -> int:
        strategy = self._namespace(namespace)
        self._check_key(strategy, key)
        tags = _checked_tags(tags, "tags", most=MAX_PUT_TAGS)
        strategy.check_tags(tags)
        if len(value) > self._limits.max_value_bytes:
            raise InvalidArgument(
                f"value is {len(value)} bytes; the limit is {self._limits.max_value_bytes} "
                "(server.max_value_bytes)"
            )
        _check_version(expected_version)
        if ttl_ms is not None and not 0 <= ttl_ms <= MAX_TTL_MS:
            raise InvalidArgument(
                f"ttl_ms must be between 0 (namespace default) and {MAX_TTL_MS} (got {ttl_ms})"
            )
        return await strategy.put(key, value, expected_version, ttl_ms or None, tags)

    async def delete(
        self, namespace: str, key: str, *, expected_version: int | None = None
    ) -> Deleted:
        strategy = self._namespace(namespace)
        self._check_key(strategy, key)
        _check_version(expected_version)
        return await strategy.delete(key, expected_version)

    async def invalidate(
        self, namespace: str, keys: Sequence[str], *, everything: bool = False
    ) -> int:
        strategy = self._namespace(namespace)
        if everything:
            if keys:
                raise InvalidArgument("give either keys or all, not both")
            return await strategy.invalidate_all()
        if not keys:
            raise InvalidArgument("give at least one key, or all = true")
        self._check_keys(strategy, keys)
        return await strategy.invalidate(list(dict.fromkeys(keys)))

    async def invalidate_tags(self, namespace: str, tags: Sequence[str]) -> None:
        """Hide every cached value of *namespace* carrying one of *tags*."""
        strategy = self._namespace(namespace)
        if not tags:
            raise InvalidArgument("tags: give at least one tag")
        await strategy.invalidate_tags(_checked_tags(tags, "tags", most=MAX_INVALIDATED_TAGS))

    def watch(
        self, namespaces: Sequence[str], key_prefix: str, resume_token: str = ""
    ) -> AbstractAsyncContextManager[Watcher]:
        """Subscribe to the invalidation events of *namespaces* (from now, or
        from *resume_token*, which must be one of a stream of the same
        namespaces: else InvalidArgument)."""
        if not namespaces:
            raise InvalidArgument("give at least one namespace to watch")
        for name in namespaces:
            self._namespace(name)
        if len(key_prefix.encode()) > self._limits.max_key_bytes:
            raise InvalidArgument(
                f"key_prefix is longer than {self._limits.max_key_bytes} bytes "
                "(server.max_key_bytes)"
            )
        if resume_token:
            try:
                resume_token_codec.decode(resume_token, self._watch_hub.partitions(namespaces))
            except resume_token_codec.InvalidToken as err:
                raise InvalidArgument(str(err)) from None
        return self._watch_hub.watch(namespaces, key_prefix, resume_token)

    @property
    def namespaces(self) -> list[str]:
        return sorted(self._namespaces)

    def strategy(self, namespace: str) -> Strategy:
        """The strategy serving *namespace* (raises NamespaceNotFound)."""
        return self._namespace(namespace)

    def _namespace(self, name: str) -> Strategy:
        strategy = self._namespaces.get(name)
        if strategy is None:
            if not name:
                raise InvalidArgument("namespace must not be empty")
            raise NamespaceNotFound(name, list(self._namespaces))
        return strategy

    def _check_key(self, strategy: Strategy, key: str) -> None:
        if not key:
            raise InvalidArgument("key must not be empty")
        size = len(key.encode())
        if size > self._limits.max_key_bytes:
            raise InvalidArgument(
                f"key is {size} bytes; the limit is {self._limits.max_key_bytes} "
                "(server.max_key_bytes)"
            )
        if "\x00" in key:
            raise InvalidArgument("key must not contain NUL characters")
        strategy.check_key(key)

    def _check_keys(self, strategy: Strategy, keys: Sequence[str]) -> None:
        if not keys:
            raise InvalidArgument("give at least one key")
        if len(keys) > self._limits.max_batch_keys:
            raise InvalidArgument(
                f"{len(keys)} keys in one call; the limit is {self._limits.max_batch_keys} "
                "(server.max_batch_keys)"
            )
        for key in keys:
            self._check_key(strategy, key)


def _observe(strategy: Strategy, entries: Sequence[Entry]) -> None:
    """Record where reads were served from: on the RPC's span (for one key)
    and in the hit/miss counters."""
    namespace = strategy.name
    span = instruments.request_span.get()
    if span is not None and len(entries) == 1:
        entry = entries[0]
        span.set_attributes(
            {
                "cache.namespace": namespace,
                "cache.strategy": strategy.settings.strategy.value,
                "cache.hit": entry.layer is not Layer.DATABASE,
                "cache.layer": entry.layer.value,
                "cache.stale": entry.stale,
            }
        )
    if telemetry.METRICS:
        for entry in entries:
            if entry.layer is Layer.DATABASE:
                instruments.misses.add(1, {"cache.namespace": namespace})
            else:
                instruments.hits.add(
                    1, {"cache.namespace": namespace, "cache.layer": entry.layer.value}
                )


def _check_min_version(key: str, min_version: int) -> None:
    if min_version < 0:
        raise InvalidArgument(
            f"min_version of key {key!r} must not be negative (got {min_version}); "
            "give the version a Put or Delete returned, or 0"
        )


def _checked_tags(tags: Sequence[str], field: str, *, most: int) -> tuple[str, ...]:
    """*tags* without repeats, or InvalidArgument naming *field*."""
    if len(tags) > most:
        raise InvalidArgument(f"{field}: {len(tags)} tags; the limit is {most}")
    for tag in tags:
        size = len(tag.encode())
        if not 1 <= size <= MAX_TAG_BYTES:
            raise InvalidArgument(
                f"{field}: each tag must be 1 to {MAX_TAG_BYTES} bytes of UTF-8 "
                f"(got {size} bytes: {tag[:40]!r})"
            )
    return tuple(dict.fromkeys(tags))


def _check_version(expected_version: int | None) -> None:
    if expected_version is not None and expected_version < 0:
        raise InvalidArgument(f"expected_version must not be negative (got {expected_version})")
