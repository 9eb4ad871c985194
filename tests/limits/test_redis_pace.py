"""The create pace shared through the real Redis: several RedisPace instances on one prefix,
each on a client of its own, as several processes; real clock (so figures are approximate)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from actors.limits.redis_pace import RedisPace
from actors.providers.pacing import MAX_CREATES_PER_S, RATE_STEP
from actors.store.redis import open_client
from tests.redis_support import REDIS_URL, dropped_connections, proxied_redis, waits_out_an_outage

#: Real time passes between calls: a booking is within this of its exact figure.
SLACK_S = 0.03


@asynccontextmanager
async def paces(
    prefix: str, count: int, *, burst: float = 2, url: str = REDIS_URL
) -> AsyncIterator[list[RedisPace]]:
    async with AsyncExitStack() as stack:
        found = []
        for _ in range(count):
            client = await stack.enter_async_context(open_client(url))
            found.append(RedisPace(client, prefix=prefix, burst=burst))
        yield found


async def delays(pace: RedisPace, count: int) -> list[float]:
    found = []
    for _ in range(count):
        at, _ = await pace.book()
        found.append(at - trio.current_time())
    return found


async def test_bookings_on_any_process_take_the_next_turn_of_all(redis_prefix: str) -> None:
    async with paces(redis_prefix, 2) as (one, two):
        booked = [*(await delays(one, 2)), *(await delays(two, 2)), *(await delays(one, 1))]
    # A burst of two, then one every 1/10 s, whichever process books.
    step = 1 / MAX_CREATES_PER_S
    assert booked == pytest.approx([0, 0, step, 2 * step, 3 * step], abs=SLACK_S)


async def test_a_429_on_one_process_pauses_and_slows_the_others(redis_prefix: str) -> None:
    async with paces(redis_prefix, 2) as (one, two):
        assert (await two.book())[1] == 0  # booked before any 429
        await one.throttled(1.0)
        assert one.throttles == 1
        assert one.rate == MAX_CREATES_PER_S / 2
        # The other process sees the pause, the halved rate, and that its booking is void.
        assert await two.paused_until() - trio.current_time() == pytest.approx(1.0, abs=SLACK_S)
        assert two.throttles == 1
        assert two.rate == MAX_CREATES_PER_S / 2
        step = 2 / MAX_CREATES_PER_S
        assert await delays(two, 2) == pytest.approx([1.0, 1.0 + step], abs=SLACK_S)
        await two.accepted()
        assert one.rate == MAX_CREATES_PER_S / 2  # as of its own latest call
        await one.accepted()
        assert one.rate == MAX_CREATES_PER_S / 2 + 2 * RATE_STEP


async def test_the_ceiling_is_the_max_rate_given(redis_prefix: str) -> None:
    async with open_client(REDIS_URL) as client:
        pace = RedisPace(client, prefix=redis_prefix, max_rate=2, burst=1)
        assert await delays(pace, 3) == pytest.approx([0, 0.5, 1.0], abs=SLACK_S)
        await pace.throttled(0)
        await pace.throttled(0)
        assert pace.rate == 0.5  # halved twice, as a pace of one process would be
        await pace.accepted()
        assert pace.rate == 1.5


async def test_the_rate_grows_back_to_at_most_the_max(redis_prefix: str) -> None:
    async with paces(redis_prefix, 1) as (pace,):
        await pace.throttled(0)
        for _ in range(10):
            await pace.accepted()
        assert pace.rate == MAX_CREATES_PER_S


@dropped_connections
async def test_a_booking_waits_for_redis_and_a_429_pauses_this_process_meanwhile(
    redis_prefix: str,
) -> None:
    async with proxied_redis() as proxy, paces(redis_prefix, 1, url=proxy.url) as (pace,):
        pace._calls.timeout_s = 0.5
        proxy.down()
        await pace.throttled(2.0)  # not noted in Redis, but this process pauses
        assert await pace.paused_until() - trio.current_time() > 1.0
        await waits_out_an_outage(proxy, pace.book)
