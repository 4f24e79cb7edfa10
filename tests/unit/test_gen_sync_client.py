"""scripts/gen_sync_client.py: the rules that turn the asyncio client into the blocking one."""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from gen_sync_client import SOURCE, TARGET, GenerationError, generate


def convert(source: str) -> str:
    """The conversion alone (no ruff, no docstring edits), without the header."""
    text = generate(textwrap.dedent(source), docstring_edits={})
    return text.split("\n", 3)[3]  # the three lines of the header


def test_await_and_async_keywords_are_removed() -> None:
    assert convert(
        """\
        async def get(self) -> int:
            async with self._lock:
                async for item in self._items:
                    await self._call(item)
            return (await self._answer()).value
        """
    ) == textwrap.dedent(
        """\
        def get(self) -> int:
            with self._lock:
                for item in self._items:
                    self._call(item)
            return (self._answer()).value
        """
    )


def test_an_async_block_gives_way_to_its_else_branch_dedented() -> None:
    assert convert(
        """\
        class Client:
            if True:  # ASYNC

                async def close(self) -> None:
                    \"\"\"Close the channel
                    and wait.\"\"\"
                    await self._channel.close(None)

            else:

                def close(self) -> None:
                    \"\"\"Close the channel
                    at once.\"\"\"
                    self._channel.close()  # blocking
        """
    ) == textwrap.dedent(
        """\
        class Client:

            def close(self) -> None:
                \"\"\"Close the channel
                at once.\"\"\"
                self._channel.close()  # blocking
        """
    )


def test_an_async_block_without_else_disappears_with_its_comments() -> None:
    assert convert(
        """\
        def setup(self) -> None:
            self.a = 1
            if True:  # ASYNC
                # Tasks of the event loop.
                self.tasks = set()
            self.b = 2
        """
    ) == textwrap.dedent(
        """\
        def setup(self) -> None:
            self.a = 1
            self.b = 2
        """
    )


def test_nested_async_blocks_are_resolved() -> None:
    assert convert(
        """\
        if True:  # ASYNC
            x = 1
        else:
            if True:  # ASYNC
                y = 1
            else:
                y = 2
        """
    ) == ("y = 2\n")


def test_names_dotted_names_and_imports_are_mapped() -> None:
    assert convert(
        """\
        from __future__ import annotations

        import asyncio
        import grpc.aio
        from collections.abc import AsyncIterator

        __all__ = ["AsyncClient"]


        class AsyncClient:
            async def __aenter__(self) -> AsyncClient:
                await asyncio.sleep(0.1)
                return self

            def stream(self, channel: grpc.aio.Channel) -> AsyncIterator[int]:
                raise StopAsyncIteration
        """
    ) == textwrap.dedent(
        """\
        from __future__ import annotations
        import time

        from collections.abc import Iterator

        __all__ = ["Client"]


        class Client:
            def __enter__(self) -> Client:
                time.sleep(0.1)
                return self

            def stream(self, channel: grpc.Channel) -> Iterator[int]:
                raise StopIteration
        """
    )


def test_docstrings_and_comments_follow_the_names() -> None:
    assert convert(
        '''\
        def watch(self) -> AsyncWatchStream:
            """An async iterator; use it in ``async with``, see `AsyncClient.get`.

            >>> async with client.watch() as events:
            ...     await events.aclose()
            """
            # AsyncWatchStream cancels its call
            return AsyncWatchStream()
        '''
    ) == textwrap.dedent(
        '''\
        def watch(self) -> WatchStream:
            """An iterator; use it in ``with``, see `Client.get`.

            >>> with client.watch() as events:
            ...     events.close()
            """
            # WatchStream cancels its call
            return WatchStream()
        '''
    )


def test_docstring_edits_must_match_exactly_once() -> None:
    source = 'class AsyncClient:\n    """Asyncio client.\n\n    Bound to a loop."""\n'
    edited = generate(
        source, docstring_edits={"AsyncClient": [("\n\nBound to a loop.", " Thread-safe.")]}
    )
    assert '"""Asyncio client. Thread-safe."""' in edited
    with pytest.raises(GenerationError, match="exactly once"):
        generate(source, docstring_edits={"AsyncClient": [("Bound to a task.", "")]})
    with pytest.raises(GenerationError, match=r"no docstring of AsyncClient\.gone"):
        generate(source, docstring_edits={"AsyncClient.gone": [("x", "y")]})


@pytest.mark.parametrize(
    ("source", "what"),
    [
        ("import asyncio\n\nasync def f() -> None:\n    await asyncio.shield(g())\n", "shield"),
        ("from asyncio import sleep\n", "instead of `from asyncio import X`"),
        ("x: AsyncCache | None = None\n", "AsyncCache has no blocking name"),
        ("class A:\n    async def __aiter__(self) -> A:\n        return self\n", None),
    ],
)
def test_what_has_no_mapping_fails_naming_the_line(source: str, what: str | None) -> None:
    if what is None:  # mapped (__aiter__ -> __iter__): no failure
        generate(source, docstring_edits={})
        return
    with pytest.raises(GenerationError, match=what):
        generate(source, docstring_edits={})


def test_a_malformed_async_block_is_refused() -> None:
    with pytest.raises(GenerationError, match="if True:  # ASYNC"):
        generate("if ASYNC:  # ASYNC\n    x = 1\n", docstring_edits={})
    with pytest.raises(GenerationError, match="elif"):
        generate("if True:  # ASYNC\n    x = 1\nelif y:\n    x = 2\n", docstring_edits={})


def test_a_method_added_to_the_asyncio_client_needs_no_change_to_the_script() -> None:
    source = SOURCE.read_text(encoding="utf-8").replace(
        "    async def release_lock(",
        textwrap.indent(
            textwrap.dedent(
                '''\
                async def touch(
                    self, namespace: str, keys: AsyncIterator[str], *, timeout: float | None = None
                ) -> int:
                    """Invalidate every key of an ``async for`` source."""
                    return sum([await self.invalidate(namespace, [k]) async for k in keys])

                '''
            ),
            "    ",
        )
        + "    async def release_lock(",
    )
    text = generate(source)
    assert "    def touch(\n" in text
    assert "keys: Iterator[str]" in text
    assert "[self.invalidate(namespace, [k]) for k in keys]" in text


@pytest.mark.skipif(
    not shutil.which("ruff", path=str(Path(sys.executable).parent)), reason="needs ruff"
)
def test_the_committed_blocking_client_is_generated_from_the_asyncio_one() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    expected = generate(SOURCE.read_text(encoding="utf-8"), ruff=ruff)
    assert TARGET.read_text(encoding="utf-8") == expected, "run `make sync-client`"
