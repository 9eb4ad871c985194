"""The Replicate create pacer: token bucket with AIMD, on virtual time."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from actors.providers.pacing import CREATE_BURST, MAX_CREATES_PER_S, RATE_STEP, CreatePacer


async def times_of(pacer: CreatePacer, count: int) -> list[float]:
    t0 = trio.current_time()
    stamps = []
    for _ in range(count):
        await pacer.acquire()
        stamps.append(round(trio.current_time() - t0, 6))
    return stamps


async def test_a_burst_goes_at_once_then_the_rate_applies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    await trio.sleep(10)  # a full bucket
    stamps = await times_of(CreatePacer(), int(CREATE_BURST) + 3)
    assert stamps[: int(CREATE_BURST)] == [0.0] * int(CREATE_BURST)
    assert stamps[int(CREATE_BURST) :] == pytest.approx([0.1, 0.2, 0.3])


async def test_a_429_pauses_every_create_for_retry_after_and_halves_the_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    await trio.sleep(10)
    pacer = CreatePacer()
    pacer.throttled(3.0)
    assert pacer.rate == MAX_CREATES_PER_S / 2
    stamps = await times_of(pacer, 3)
    # paused 3 s with an empty bucket, then one create per 1/rate seconds
    assert stamps == pytest.approx([3.0, 3.2, 3.4])


async def test_accepted_creates_recover_the_rate_up_to_the_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pacer = CreatePacer()
    pacer.throttled(0)
    pacer.throttled(0)
    assert pacer.rate == MAX_CREATES_PER_S / 4
    pacer.accepted()
    assert pacer.rate == MAX_CREATES_PER_S / 4 + RATE_STEP
    for _ in range(100):
        pacer.accepted()
    assert pacer.rate == MAX_CREATES_PER_S
    assert pacer.throttles == 2


async def test_waiting_creates_are_served_in_order(autojump_clock: trio.testing.MockClock) -> None:
    pacer = CreatePacer(burst=1)
    await trio.sleep(1)
    order: list[int] = []

    async def create(number: int) -> None:
        await pacer.acquire()
        order.append(number)

    async with trio.open_nursery() as nursery:
        for number in range(5):
            nursery.start_soon(create, number)
            await trio.testing.wait_all_tasks_blocked()
    assert order == [0, 1, 2, 3, 4]
