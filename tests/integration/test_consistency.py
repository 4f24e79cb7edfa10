"""The consistency observer against real servers: a cached copy left behind
a write (its invalidation deliberately undone) is reported, with the key,
layer and path, in the log, the metrics' source and `cachecoord consistency
report`; when every layer follows, checks are counted and nothing else."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_support import operator
from strategy_support import poll, serve_config, serving

from cachecoord.app import App
from cachecoord.config import load
from cachecoord.storage.keys import KeySpace
from cachecoord_client import AsyncClient
from conftest import Backend

NAMESPACE = """
[namespaces.{ns}]
kind = "managed"
strategy = "cache-aside"
ttl = "5m"
near_cache_entries = 100
near_cache_ttl = "60s"
"""


@dataclass
class Observed:
    ns: str
    config: Path
    app: App
    client: AsyncClient
    backend: Backend

    async def report(self) -> dict[str, Any]:
        result = await operator(
            "consistency report", self.ns, "--minutes", "5", "--json", config=self.config
        )
        assert result.code == 0, result.stderr
        (doc,) = result.json()["namespaces"]
        assert doc["namespace"] == self.ns
        return dict(doc)


@asynccontextmanager
async def observed(backend: Backend, tmp_path: Path) -> AsyncIterator[Observed]:
    ns = f"observed_{uuid.uuid4().hex[:10]}"
    config = serve_config(
        tmp_path,
        listen="127.0.0.1:0",
        redis_url=backend.url,
        postgres_url=backend.dsn,
        instance_id=ns,
        namespaces=NAMESPACE.format(ns=ns),
    )
    text = config.read_text().replace(
        "[server]\n", '[server]\nconsistency_sample = 1\nconsistency_delay = "300ms"\n'
    )
    if backend.cluster:  # in the file: the report command reads it too
        text = text.replace(f'url = "{backend.url}"', f'url = "{backend.url}"\ncluster = true')
    config.write_text(text)
    async with serving(load(config, {})) as (app, client):
        yield Observed(ns, config, app, client, backend)


async def test_a_cached_copy_left_behind_a_write_is_reported(
    own_backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cachecoord.consistency")
    async with observed(own_backend, tmp_path) as it:
        first = await it.client.put(it.ns, "k", b"one")
        await it.client.get(it.ns, "k")  # fills Redis with version `first`
        value_key = KeySpace(it.ns).value("k")
        async with own_backend.client() as redis:
            old = await redis.get(value_key)
            assert old is not None
            second = await it.client.put(it.ns, "k", b"two")  # drops the copy
            await redis.set(value_key, old)  # ... which comes back: a lost invalidation

        doc = await poll(it.report, lambda d: d["violations"] >= 1, within=10)
        assert doc["violations"] == 1
        assert doc["checks"] >= 2  # both Puts were followed up
        assert doc["consistent"] < 1
        (record,) = [r for r in caplog.records if "consistency violation" in r.getMessage()]
        text = record.getMessage()
        for part in (it.ns, "'k'", "redis", "write", f"version {first}", f"version {second}"):
            assert part in text


async def test_when_every_layer_follows_checks_are_counted_and_no_violation(
    own_backend: Backend, tmp_path: Path
) -> None:
    async with observed(own_backend, tmp_path) as it:
        for i in range(10):
            await it.client.put(it.ns, f"k{i}", b"v1")
            await it.client.get(it.ns, f"k{i}")
            await it.client.put(it.ns, f"k{i}", b"v2")
            await it.client.get(it.ns, f"k{i}")
        await it.client.invalidate(it.ns, ["k0", "k1"])
        doc = await poll(it.report, lambda d: d["checks"] >= 22, within=10)
        assert doc["violations"] == 0
        assert doc["nines"] >= 1.3  # log10(22): all that 22 clean checks can show
        assert doc["nines_lower_bound"] is True
