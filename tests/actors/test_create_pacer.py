"""The Replicate create pacer: token bucket with AIMD, bookings on virtual time."""

from __future__ import annotations

import httpx
import pytest
import trio
import trio.testing

from actors.providers.pacing import CREATE_BURST, MAX_CREATES_PER_S, RATE_STEP, CreatePacer
from actors.providers.replicate import ReplicateProvider, ReplicateSettings


def bookings(pacer: CreatePacer, count: int) -> list[float]:
    """``count`` bookings made now, as times from now."""
    now = trio.current_time()
    return [round(pacer.book() - now, 6) for _ in range(count)]


async def test_a_burst_goes_at_once_then_the_rate_applies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    await trio.sleep(10)  # a full bucket
    stamps = bookings(CreatePacer(), int(CREATE_BURST) + 3)
    assert stamps[: int(CREATE_BURST)] == [0.0] * int(CREATE_BURST)
    assert stamps[int(CREATE_BURST) :] == pytest.approx([0.1, 0.2, 0.3])


async def test_a_429_pauses_every_create_for_retry_after_and_halves_the_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    await trio.sleep(10)
    pacer = CreatePacer()
    pacer.throttled(3.0)
    assert pacer.rate == MAX_CREATES_PER_S / 2
    # paused 3 s with an empty bucket, then one create per 1/rate seconds
    assert bookings(pacer, 3) == pytest.approx([3.0, 3.2, 3.4])


async def test_a_429_voids_the_debt_of_earlier_bookings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pacer = CreatePacer(burst=1)
    await trio.sleep(1)
    assert bookings(pacer, 3) == pytest.approx([0.0, 0.1, 0.2])
    before = pacer.throttles
    pacer.throttled(1.0)
    assert pacer.throttles == before + 1  # how a holder of an earlier booking knows it is void
    assert bookings(pacer, 2) == pytest.approx([1.0, 1.2])


async def test_bookings_refill_with_time_up_to_the_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pacer = CreatePacer(burst=2)
    await trio.sleep(1)
    assert bookings(pacer, 3) == pytest.approx([0.0, 0.0, 0.1])
    await trio.sleep(0.25)  # the debt of 1 is paid at 0.1 s; 1.5 tokens after, capped at 2
    assert bookings(pacer, 3) == pytest.approx([0.0, 0.05, 0.15])


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


@pytest.mark.parametrize(("per_min", "gap_s"), [(60, 1.0), (600, 0.1), (6_000, 0.01)])
async def test_the_providers_create_pace_follows_the_setting(
    autojump_clock: trio.testing.MockClock, per_min: int, gap_s: float
) -> None:
    settings = ReplicateSettings(api_token="r8_test", max_creates_per_min=per_min)
    async with httpx.AsyncClient() as client:
        provider = ReplicateProvider(settings, client)
        await trio.sleep(3600)  # a full bucket
        delays = [await provider.turn_delay("job", index, book=True) for index in range(13)]
    burst = int(CREATE_BURST)
    assert delays[:burst] == [0.0] * burst
    assert delays[burst:] == pytest.approx([gap_s, 2 * gap_s, 3 * gap_s])
    assert provider.statistics()["create_rate_per_s"] == pytest.approx(per_min / 60, abs=1e-3)


async def test_a_429_halves_a_raised_pace_and_recovery_stops_at_the_setting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = ReplicateSettings(api_token="r8_test", max_creates_per_min=6_000)
    async with httpx.AsyncClient() as client:
        provider = ReplicateProvider(settings, client)
    await provider.pace.throttled(1.0)
    assert provider.pace.rate == 50.0
    for _ in range(200):
        await provider.pace.accepted()
    assert provider.pace.rate == 100.0


async def test_a_pace_below_the_floor_is_never_raised_by_a_429(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pacer = CreatePacer(max_rate=1 / 60)  # one create a minute
    pacer.throttled(0)
    assert pacer.rate <= 1 / 60
    pacer.accepted()
    assert pacer.rate == 1 / 60
