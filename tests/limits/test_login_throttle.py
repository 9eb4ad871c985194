"""Login throttling: this process's own and the one shared through the real Redis, held to one
contract; the shared one across processes, and a login while Redis is down."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import cast

import pytest
import trio
from quart_trio.testing import TrioClient

from actors.errors import LimitsUnavailable
from actors.store import MemoryStore
from actors.store.redis import open_client
from actors.supervisor import open_supervisor
from tests.fakes import FakeProvider
from tests.redis_support import REDIS_URL, dropped_connections, proxied_redis
from tests.web.helpers import HASHER, SECRET
from web.app import create_app
from web.auth import Authenticator
from web.login_throttle import LoginLimiter, LoginThrottle, RedisLoginThrottle
from web.settings import Settings

WINDOW_S = 0.5
KEY = ("10.0.0.1", "test@example.com")

Opener = Callable[[], AbstractAsyncContextManager[LoginLimiter]]


@asynccontextmanager
async def redis_throttle(
    prefix: str, *, url: str = REDIS_URL, window_s: float = WINDOW_S
) -> AsyncIterator[RedisLoginThrottle]:
    async with open_client(url) as client:
        yield RedisLoginThrottle(
            client, prefix=f"{prefix}login:", max_failures=3, window_s=window_s
        )


@pytest.fixture(params=["memory", "redis"])
def throttles(request: pytest.FixtureRequest) -> Opener:
    """Opens the throttle under test (three failures in half a second; real clock)."""
    if request.param == "memory":

        @asynccontextmanager
        async def memory() -> AsyncIterator[LoginLimiter]:
            yield LoginThrottle(max_failures=3, window_s=WINDOW_S)

        return memory
    prefix = request.getfixturevalue("redis_prefix")
    return lambda: redis_throttle(prefix)


async def test_the_failure_that_fills_the_window_throttles_until_the_oldest_leaves_it(
    throttles: Opener,
) -> None:
    async with throttles() as throttle:
        for _ in range(2):
            await throttle.failed(KEY)
        assert await throttle.retry_after_s(KEY) is None
        await throttle.failed(KEY)
        assert await throttle.retry_after_s(KEY) == 1  # half a second, in whole seconds
        assert await throttle.retry_after_s(("10.0.0.2", KEY[1])) is None  # another client
        assert await throttle.retry_after_s((KEY[0], "other@example.com")) is None
        await trio.sleep(WINDOW_S + 0.05)
        assert await throttle.retry_after_s(KEY) is None


async def test_a_success_forgets_the_failures(throttles: Opener) -> None:
    async with throttles() as throttle:
        for _ in range(3):
            await throttle.failed(KEY)
        await throttle.succeeded(KEY)
        assert await throttle.retry_after_s(KEY) is None


async def test_failures_count_across_processes(redis_prefix: str) -> None:
    async with redis_throttle(redis_prefix) as one, redis_throttle(redis_prefix) as two:
        await one.failed(KEY)
        await two.failed(KEY)
        assert await one.retry_after_s(KEY) is None
        await one.failed(KEY)
        assert await two.retry_after_s(KEY) == 1
        await two.succeeded(KEY)
        assert await one.retry_after_s(KEY) is None


async def test_the_window_is_counted_in_whole_seconds_up(redis_prefix: str) -> None:
    async with redis_throttle(redis_prefix, window_s=300) as throttle:
        for _ in range(3):
            await throttle.failed(KEY)
        # Past the end: 300 once a millisecond has passed since the first failure, 301 when
        # all of it happened within one (300.000 s left: waiting exactly that is not enough).
        assert await throttle.retry_after_s(KEY) in (300, 301)


@dropped_connections
async def test_a_login_while_redis_is_down_answers_503_and_works_when_it_is_back(
    redis_prefix: str,
) -> None:
    settings = Settings(auth_secret=SECRET)
    auth = Authenticator(settings, hasher=HASHER)
    right = {"email": "test@example.com", "password": "password123"}
    async with (
        proxied_redis() as proxy,
        redis_throttle(redis_prefix, url=proxy.url) as throttle,
        open_supervisor(FakeProvider(), settings.supervisor, store=MemoryStore()) as sup,
    ):
        throttle._calls.timeout_s = 1
        auth.throttle = throttle
        client = cast(TrioClient, create_app(sup, settings, auth).test_client())
        proxy.down()
        response = await client.post("/api/auth/login", json=right)
        assert response.status_code == 503
        assert response.headers["Retry-After"] == str(LimitsUnavailable.retry_after_s)
        assert "limits" in (await response.get_json())["detail"]
        await proxy.up()
        assert (await client.post("/api/auth/login", json=right)).status_code == 200
