"""The real Redis the tests run against, a fresh prefix per test, and a proxy to cut it off.

Tests need a Redis at ``TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``). Without one they
skip, saying why, except in CI (``CI=true``), where a missing Redis is a failure: CI has one.
Each test writes under a prefix of its own and deletes every key under it afterwards, so test
runs and deployments can share the server.
"""

from __future__ import annotations

import gc
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import pytest
import trio

from actors.store.redis import open_client

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

#: coredis 6.9.0 leaves a connection's anyio memory streams (coredis/connection/_base.py) to the
#: garbage collector when Redis drops the connection; the warning says nothing about our code.
dropped_connections = pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*MemoryObject(Receive|Send)Stream"
    ":pytest.PytestUnraisableExceptionWarning"
)


def _answers(url: str) -> str | None:
    """``None`` if a Redis at ``url`` answers PING, else why not (blocking, bounded)."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 6379), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            answer = sock.recv(64)
    except OSError as exc:
        return f"{exc}"
    if not answer.startswith(b"+PONG"):
        return f"it answered PING with {answer!r}"
    return None


def require_redis() -> None:
    """Skip the test if no Redis answers (fail instead in CI, which has one)."""
    problem = _answers(REDIS_URL)
    if problem is None:
        return
    reason = f"no Redis answers at {REDIS_URL} ({problem}); set TEST_REDIS_URL or start one"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must have Redis")
    pytest.skip(reason)


async def delete_prefix(prefix: str) -> int:
    """Delete every key under ``prefix``; returns how many there were."""
    deleted = 0
    async with open_client(REDIS_URL) as client:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        for start in range(0, len(keys), 500):
            deleted += await client.delete(keys[start : start + 500])
    return deleted


async def keys_under(prefix: str) -> set[str]:
    async with open_client(REDIS_URL) as client:
        return {key async for key in client.scan_iter(match=f"{prefix}*", count=500)}


@asynccontextmanager
async def fresh_prefix() -> AsyncIterator[str]:
    """A prefix no one else uses (``test:<random>:``), its keys deleted afterwards."""
    require_redis()
    prefix = f"test:{secrets.token_hex(6)}:"
    try:
        yield prefix
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await delete_prefix(prefix)


class RedisProxy:
    """A TCP proxy in front of the test Redis that a test can take down and bring back.

    ``down()`` closes every connection and stops listening (connections are refused, as from a
    stopped Redis); ``up()`` listens again on the same port. ``stall()`` keeps connections open
    but forwards nothing (a Redis or network that hangs), until ``up()``; ``blackhole()`` does that
    to the connections open now only, for good.

    Concurrency: :meth:`run` is started in the test's nursery and runs until cancelled.
    """

    def __init__(self) -> None:
        target = urlsplit(REDIS_URL)
        self._target = (target.hostname or "127.0.0.1", target.port or 6379)
        self._db = target.path or "/0"
        self.port = 0
        self._listening: trio.CancelScope | None = None
        self._connections: dict[trio.CancelScope, list[bool]] = {}  # scope -> [black-holed]
        self._flowing = trio.Event()
        self._flowing.set()
        self._up = trio.Event()
        self._listening_again = trio.Event()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}{self._db}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            started = False
            while True:
                listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
                self.port = listeners[0].socket.getsockname()[1]
                with trio.CancelScope() as self._listening:
                    self._listening_again.set()
                    if not started:
                        task_status.started()
                        started = True
                    await trio.serve_listeners(self._forward, listeners, handler_nursery=nursery)
                for listener in listeners:
                    await listener.aclose()
                await self._up.wait()

    def down(self) -> None:
        """Refuse connections and cut the open ones."""
        self._up = trio.Event()
        self._listening_again = trio.Event()
        if self._listening is not None:
            self._listening.cancel()
        for scope in self._connections:
            scope.cancel()

    def stall(self) -> None:
        """Keep connections open but forward nothing (new ones too)."""
        self._flowing = trio.Event()

    def blackhole(self) -> None:
        """The connections open now forward nothing, ever, and are never closed (as when the
        server's host vanished without a reset); new connections work."""
        for state in self._connections.values():
            state[0] = True

    async def up(self) -> None:
        """Listen and forward again (returns once listening)."""
        self._up.set()
        self._flowing.set()
        await self._listening_again.wait()

    async def _forward(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            state = self._connections[scope] = [False]
            try:
                async with (
                    client,
                    await trio.open_tcp_stream(*self._target) as server,
                    trio.open_nursery() as nursery,
                ):
                    nursery.start_soon(self._pipe, client, server, state)
                    nursery.start_soon(self._pipe, server, client, state)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the connection is over, as the side that ended it wanted
            finally:
                del self._connections[scope]

    async def _pipe(
        self, source: trio.SocketStream, sink: trio.SocketStream, state: list[bool]
    ) -> None:
        while data := await source.receive_some(65536):
            await self._flowing.wait()
            if state[0]:
                await trio.sleep_forever()
            await sink.send_all(data)
        # One side closed: so is the other (as a real connection would be).
        raise trio.BrokenResourceError


@asynccontextmanager
async def proxied_redis() -> AsyncIterator[RedisProxy]:
    """A :class:`RedisProxy` in front of the test Redis, running for the block. Mark the test
    ``dropped_connections``: the leftovers of the connections the proxy dropped warn at the
    end of the block (a garbage collection), in that test."""
    proxy = RedisProxy()
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        yield proxy
        nursery.cancel_scope.cancel()
    gc.collect()


async def waits_out_an_outage(proxy: RedisProxy, call: Callable[[], Awaitable[object]]) -> None:
    """Check that ``call()``, made while Redis (behind ``proxy``, taken down by the caller)
    is down, waits instead of failing, and returns once Redis is back."""
    returned = trio.Event()

    async def make_call() -> None:
        await call()
        returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(make_call)
        with trio.move_on_after(0.5):
            await returned.wait()
        assert not returned.is_set(), "returned while Redis was down"
        await proxy.up()
        with trio.fail_after(10):
            await returned.wait()
