"""MAX_CONCURRENCY across processes: several RedisCapacity instances on one prefix of the real
Redis, each with a client of its own, as several processes would be."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import coredis
import pytest
import trio
import trio.testing

import actors.tasks as tasks_module
from actors.limits.redis_capacity import RedisCapacity, open_redis_capacity
from actors.store.redis import open_client
from tests.fakes import never_runs
from tests.redis_support import REDIS_URL, dropped_connections, proxied_redis, waits_out_an_outage


@asynccontextmanager
async def nodes(
    prefix: str, count: int, *, capacity: int, lease_s: float = 10.0, url: str = REDIS_URL
) -> AsyncIterator[list[RedisCapacity]]:
    """``count`` limiters sharing ``prefix``, each on a client of its own."""
    async with AsyncExitStack() as stack:
        limiters = []
        for _ in range(count):
            client = await stack.enter_async_context(open_client(url))
            limiters.append(
                await stack.enter_async_context(
                    open_redis_capacity(
                        client, prefix=f"{prefix}capacity:", capacity=capacity, lease_s=lease_s
                    )
                )
            )
        yield limiters


async def redis_counts(prefix: str) -> tuple[int, int, int]:
    """Slots held, waiters, jobs waiting, as Redis has them."""
    async with open_client(REDIS_URL) as client:
        base = f"{prefix}capacity:"
        return (
            await client.zcard(f"{base}holders"),
            await client.zcard(f"{base}waiters"),
            await client.zcard(f"{base}jobs"),
        )


async def all_given_back(prefix: str) -> None:
    """Wait (10 s at most) until Redis has no slot held and no waiter."""
    with trio.fail_after(10):
        while await redis_counts(prefix) != (0, 0, 0):  # noqa: ASYNC110
            await trio.sleep(0.02)


async def test_never_more_holders_than_the_capacity_across_processes(redis_prefix: str) -> None:
    in_flight = peak = done = 0

    async def attempt(limiter: RedisCapacity, job: str, index: int) -> None:
        nonlocal in_flight, peak, done
        async with limiter.slot(job, priority=index):
            in_flight += 1
            peak = max(peak, in_flight)
            await trio.sleep(random.uniform(0.001, 0.02))
            in_flight -= 1
        done += 1

    async with nodes(redis_prefix, 3, capacity=4) as limiters, trio.open_nursery() as nursery:
        for n in range(60):
            nursery.start_soon(attempt, limiters[n % 3], f"job{n % 5}", n)
    assert done == 60
    assert peak == 4  # reached, never passed
    assert await redis_counts(redis_prefix) == (0, 0, 0)


async def test_a_free_slot_goes_to_the_job_holding_fewest_across_processes(
    redis_prefix: str,
) -> None:
    names = ("a0", "a1", "a2", "a3", "b0")
    order: list[str] = []
    granted = {name: trio.Event() for name in names}
    release = {name: trio.Event() for name in names}

    async def attempt(limiter: RedisCapacity, job: str, name: str, priority: int) -> None:
        async with limiter.slot(job, priority=priority):
            order.append(name)
            granted[name].set()
            await release[name].wait()

    async def queue(limiter: RedisCapacity, job: str, name: str, priority: int) -> None:
        """Start an attempt and return once Redis has it queued (or it holds the slot)."""
        before = (await redis_counts(redis_prefix))[1]
        nursery.start_soon(attempt, limiter, job, name, priority)
        with trio.fail_after(5):
            # Redis's own state is what is waited for: there is no event to wait on.
            while (await redis_counts(redis_prefix))[1] == before and name not in order:  # noqa: ASYNC110
                await trio.sleep(0.005)

    async with nodes(redis_prefix, 2, capacity=1) as (one, two), trio.open_nursery() as nursery:
        await queue(one, "a", "a0", 0)
        assert order == ["a0"]
        # Job a queues three more on one process, priorities out of order; job b one on another.
        await queue(one, "a", "a3", 3)
        await queue(one, "a", "a1", 1)
        await queue(one, "a", "a2", 2)
        await queue(two, "b", "b0", 0)
        await one.renew_once()  # (one hears of b: a's share is half the slot, none whole)
        for name in ("a0", "b0", "a1", "a2", "a3"):
            with trio.fail_after(5):
                await granted[name].wait()
            release[name].set()
    assert order == ["a0", "b0", "a1", "a2", "a3"]
    assert await redis_counts(redis_prefix) == (0, 0, 0)


@asynccontextmanager
async def one_holding_and_three_waiting(
    limiter: RedisCapacity, prefix: str, order: list[str], release: dict[str, trio.Event]
) -> AsyncIterator[trio.Nursery]:
    """Job a's attempts a0 to a3 on ``limiter`` (capacity 1): a0 holds, the others are queued
    in Redis, and ``limiter`` has heard Redis since (a's share is the whole slot)."""

    async def attempt(name: str, priority: int) -> None:
        async with limiter.slot("a", priority=priority):
            order.append(name)
            await release[name].wait()

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(attempt, f"a{n}", n)
        with trio.fail_after(5):
            while await redis_counts(prefix) != (1, 3, 1):  # noqa: ASYNC110
                await trio.sleep(0.005)
            await limiter.renew_once()
        yield nursery


@dropped_connections
async def test_a_process_hands_on_within_the_share_it_last_heard_of_until_redis_answers(
    redis_prefix: str,
) -> None:
    order: list[str] = []
    release = {name: trio.Event() for name in ("a0", "a1", "a2", "a3", "b0")}
    async with (
        proxied_redis() as proxy,
        nodes(redis_prefix, 1, capacity=1, url=proxy.url) as (one,),
        nodes(redis_prefix, 1, capacity=1) as (two,),
        one_holding_and_three_waiting(one, redis_prefix, order, release) as nursery,
    ):

        async def b0() -> None:
            async with two.slot("b"):
                order.append("b0")

        nursery.start_soon(b0)
        with trio.fail_after(5):
            while (await redis_counts(redis_prefix))[1] < 4:  # noqa: ASYNC110
                await trio.sleep(0.005)
        # Process one cannot hear that b waits now: its a's share is still the whole slot,
        # and its slot goes from attempt to attempt of a without Redis.
        proxy.down()
        for name, heir in (("a0", "a1"), ("a1", "a2"), ("a2", "a3")):
            release[name].set()
            with trio.fail_after(2):
                while order[-1] != heir:  # noqa: ASYNC110
                    await trio.sleep(0.005)
        assert one.handed_on == 3
        await proxy.up()
        release["a3"].set()  # a waits no more: the slot goes back through Redis, to b
    assert order == ["a0", "a1", "a2", "a3", "b0"]
    assert await redis_counts(redis_prefix) == (0, 0, 0)


@dropped_connections
async def test_a_process_cut_off_for_most_of_a_lease_hands_nothing_on(redis_prefix: str) -> None:
    order: list[str] = []
    release = {name: trio.Event() for name in ("a0", "a1", "a2", "a3")}
    async with (
        proxied_redis() as proxy,
        nodes(redis_prefix, 1, capacity=1, lease_s=0.6, url=proxy.url) as (one,),
        one_holding_and_three_waiting(one, redis_prefix, order, release),
    ):
        proxy.down()
        await trio.sleep(0.45)  # past two thirds of a lease: Redis may free one's slot soon
        release["a0"].set()
        await trio.sleep(0.3)
        assert order == ["a0"]  # a1 waits for Redis
        await proxy.up()
        with trio.fail_after(5):
            while order[-1] != "a1":  # noqa: ASYNC110
                await trio.sleep(0.005)
        assert one.handed_on == 0
        for name in ("a1", "a2", "a3"):
            release[name].set()
    assert await redis_counts(redis_prefix) == (0, 0, 0)


async def test_a_dead_processes_slot_is_free_once_its_lease_ends(redis_prefix: str) -> None:
    async with open_client(REDIS_URL) as client:
        dead = RedisCapacity(client, prefix=f"{redis_prefix}capacity:", capacity=1, lease_s=0.6)
        # A process that took the slot and then died: its lease is never renewed.
        args = [*dead._base, "A", "dead/1", "job", "0"]
        assert await dead._requests(keys=[], args=args) == ["1", "dead/1"]  # level, granted
    async with nodes(redis_prefix, 1, capacity=1, lease_s=0.6) as (alive,):
        waited_from = trio.current_time()
        with trio.move_on_after(0.3):
            async with alive.slot("other"):
                raise AssertionError("granted while the dead holder's lease runs")
        with trio.fail_after(5):
            async with alive.slot("other"):
                waited = trio.current_time() - waited_from
        assert waited >= 0.5
    assert await redis_counts(redis_prefix) == (0, 0, 0)


async def test_a_slot_held_and_renewed_outlives_its_lease(redis_prefix: str) -> None:
    async with nodes(redis_prefix, 2, capacity=1, lease_s=0.3) as (one, two), one.slot("a"):
        with trio.move_on_after(1.5):  # five leases
            async with two.slot("b"):
                raise AssertionError("a renewed slot was handed out again")


async def test_cancelled_waits_and_holds_leave_no_slot_behind(redis_prefix: str) -> None:
    cancelled_holding = cancelled_waiting = 0

    async def cancelled_while_holding(limiter: RedisCapacity, n: int) -> None:
        nonlocal cancelled_holding
        with trio.CancelScope() as scope:
            async with limiter.slot(f"job{n % 4}", priority=n):
                scope.cancel()
                cancelled_holding += 1
                await trio.sleep(1)  # cancelled: the slot is given back while cancelled

    async def cancelled_at_random(limiter: RedisCapacity, n: int) -> None:
        nonlocal cancelled_waiting
        with trio.move_on_after(random.uniform(0, 0.05)) as scope:
            async with limiter.slot(f"job{n % 4}", priority=n):
                await trio.sleep(random.uniform(0, 0.03))
        if scope.cancelled_caught:
            cancelled_waiting += 1

    async with nodes(redis_prefix, 3, capacity=2) as limiters:
        async with trio.open_nursery() as nursery:
            for n in range(90):
                task = cancelled_while_holding if n % 3 == 0 else cancelled_at_random
                nursery.start_soon(task, limiters[n % 3], n)
                if n % 10 == 0:
                    await trio.sleep(0.01)
        assert cancelled_holding == 30
        assert cancelled_waiting > 0
        assert await redis_counts(redis_prefix) == (0, 0, 0)
        # Every slot is free: both are granted at once.
        with trio.fail_after(2):
            async with limiters[0].slot("x"), limiters[1].slot("y"):
                pass


@dropped_connections
async def test_a_wait_goes_on_while_redis_is_down_and_is_granted_when_it_is_back(
    redis_prefix: str,
) -> None:
    async with (
        proxied_redis() as proxy,
        nodes(redis_prefix, 1, capacity=1, url=proxy.url) as (limiter,),
    ):

        async def take() -> None:
            async with limiter.slot("a"):
                pass

        proxy.down()
        await waits_out_an_outage(proxy, take)
    assert await redis_counts(redis_prefix) == (0, 0, 0)


async def test_a_slot_given_back_goes_to_a_waiter_of_the_same_process_from_the_answer(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RedisCapacity, "_read_grants", never_runs)  # no grant by its stream
    order: list[str] = []
    # A long lease: the renewal (which also finds grants) comes only every 10 s.
    async with nodes(redis_prefix, 1, capacity=1, lease_s=30) as (limiter,):
        held = trio.Event()

        async def first() -> None:
            async with limiter.slot("a"):
                order.append("a")
                held.set()
                await trio.sleep(0.05)

        async def second() -> None:
            await held.wait()
            async with limiter.slot("b"):
                order.append("b")

        with trio.fail_after(2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first)
                nursery.start_soon(second)
    assert order == ["a", "b"]


async def hand_a_slot_to_another_process(
    prefix: str, one: RedisCapacity, two: RedisCapacity
) -> None:
    """``one`` holds the only slot, ``two`` queues for it, ``one`` gives it back: returns once
    ``two`` holds it (within 2 s: with a long lease, only the grants stream can tell it)."""
    held, release, granted = trio.Event(), trio.Event(), trio.Event()

    async def first() -> None:
        async with one.slot("a"):
            held.set()
            await release.wait()

    async def second() -> None:
        async with two.slot("b"):
            granted.set()

    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await held.wait()
            nursery.start_soon(second)
            # Redis's own state is what is waited for: there is no event to wait on.
            while (await redis_counts(prefix))[1] == 0:  # noqa: ASYNC110
                await trio.sleep(0.005)
            release.set()
            await granted.wait()


async def test_a_grant_reaches_a_waiter_of_another_process_by_its_stream(
    redis_prefix: str,
) -> None:
    # A long lease: the renewal (which also finds grants) comes only every 10 s.
    async with nodes(redis_prefix, 2, capacity=1, lease_s=30) as (one, two):
        await hand_a_slot_to_another_process(redis_prefix, one, two)


async def test_a_grants_reader_that_fails_is_counted_and_started_again(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks_module, "RETRY_S", (0.05, 0.05))
    real_read = RedisCapacity._read_grants
    failed: set[str] = set()

    async def read_failing_once(self: RedisCapacity) -> None:
        if self.node not in failed:
            failed.add(self.node)
            raise RuntimeError("a grant this release cannot read")
        await real_read(self)

    monkeypatch.setattr(RedisCapacity, "_read_grants", read_failing_once)
    async with nodes(redis_prefix, 2, capacity=1, lease_s=30) as (one, two):
        await hand_a_slot_to_another_process(redis_prefix, one, two)  # the stream read again

    assert (one.failures.total, two.failures.total) == (1, 1)
    assert (
        two.failures.last == "capacity's grants: RuntimeError('a grant this release cannot read')"
    )


async def test_requests_made_together_go_to_redis_in_one_call(redis_prefix: str) -> None:
    # A long lease: the renewal (its own calls) comes only every 10 s.
    async with nodes(redis_prefix, 1, capacity=5, lease_s=30) as (limiter,):
        held = 0
        all_held, release = trio.Event(), trio.Event()

        async def attempt(index: int) -> None:
            nonlocal held
            async with limiter.slot("a", priority=index):
                held += 1
                if held == 5:
                    all_held.set()
                await release.wait()

        script, calls = limiter._requests, 0

        def counted(**kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return script(**kwargs)

        limiter._requests = counted  # type: ignore[assignment]
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for index in range(5):  # as a job starting its images
                    nursery.start_soon(attempt, index)
                await all_held.wait()
                assert calls == 1
                release.set()
    assert await redis_counts(redis_prefix) == (0, 0, 0)


@dropped_connections
async def test_a_slot_is_given_back_without_waiting_for_redis_and_freed_once_it_is_back(
    redis_prefix: str,
) -> None:
    async with (
        proxied_redis() as proxy,
        nodes(redis_prefix, 1, capacity=1, url=proxy.url, lease_s=30) as (limiter,),
    ):
        slot = limiter.slot("a")
        with trio.fail_after(5):
            await slot.__aenter__()
        proxy.down()
        with trio.testing.assert_no_checkpoints():  # no wait for Redis on the way out
            await slot.__aexit__(None, None, None)
        assert await redis_counts(redis_prefix) == (1, 0, 0)  # held still, as Redis has it
        await proxy.up()
        await all_given_back(redis_prefix)


async def test_a_place_given_up_before_redis_queued_it_is_not_queued_by_a_later_call(
    redis_prefix: str,
) -> None:
    # A process's two senders may cross: the giving up can reach Redis before the queueing.
    async with script_limiter(redis_prefix, capacity=1) as (_, limiter):
        call = partial(granted, limiter)
        assert await call("A", "n/1", "a", "0") == ["n/1"]  # the only slot
        assert await call("R", "n/2") == []
        assert await call("A", "n/2", "b", "0") == []
        assert await redis_counts(redis_prefix) == (1, 0, 0)  # n/2 is not waiting
        assert await call("R", "n/1") == []
    assert await redis_counts(redis_prefix) == (0, 0, 0)


async def test_a_place_asked_for_by_a_waiter_that_left_is_not_asked_for_again(
    redis_prefix: str,
) -> None:
    # As a retry after a failed call would be, once Redis no longer remembers the give-up.
    async with nodes(redis_prefix, 1, capacity=2, lease_s=30) as (limiter,), limiter.slot("a"):
        limiter._request("A", f"{limiter.node}/left", "b", "0")
        with trio.fail_after(5):  # queued behind it, this one would wait for the slot it took
            async with limiter.slot("c"):
                assert await redis_counts(redis_prefix) == (2, 0, 0)


@asynccontextmanager
async def script_limiter(
    prefix: str, capacity: int
) -> AsyncIterator[tuple[coredis.Redis[str], RedisCapacity]]:
    """A client and a limiter on it whose tasks do not run: its scripts are called directly."""
    async with open_client(REDIS_URL) as client:
        yield client, RedisCapacity(client, prefix=f"{prefix}capacity:", capacity=capacity)


async def call_script(limiter: RedisCapacity, *request: str) -> list[str]:
    """One run of the requests script: the water level, then the ids granted."""
    answer: list[str] = await limiter._requests(keys=[], args=[*limiter._base, *request])
    return answer


async def granted(limiter: RedisCapacity, *request: str) -> list[str]:
    """The ids one run of the requests script granted (its water level left out)."""
    return (await call_script(limiter, *request))[1:]


async def test_the_water_level_shares_the_capacity_max_min_across_the_demands(
    redis_prefix: str,
) -> None:
    async with script_limiter(redis_prefix, capacity=4) as (_, limiter):
        queue = [
            ("A", f"n/{n}", job, "0")
            for n, job in enumerate(["a"] * 6 + ["b"], start=1)  # demands a 4, b 1
        ]
        answer = await call_script(limiter, *[part for request in queue for part in request])
        assert answer[0] == "3"  # b's 1 met, a's share 3: 4 slots between them
        assert await call_script(limiter, "A", "n/8", "c", "0", "A", "n/9", "c", "0") == ["1.5"]
        # b's 1 met; a and c share the other 3
        releases = [part for n in range(1, 10) for part in ("R", f"n/{n}")]
        assert (await call_script(limiter, *releases))[0] == "4"  # none left: the capacity
    assert await redis_counts(redis_prefix) == (0, 0, 0)


def water_level(capacity: int, demands: list[int]) -> float:
    """Max-min fair shares, one job at a time: the level no share is above."""
    left, n = float(capacity), len(demands)
    for demand in sorted(demands):
        if demand * n > left:
            return left / n
        left, n = left - demand, n - 1
    return float(capacity)


async def test_the_water_level_of_many_jobs_is_that_of_their_demands_one_by_one(
    redis_prefix: str,
) -> None:
    capacity, rng = 7, random.Random(12)
    async with script_limiter(redis_prefix, capacity=capacity) as (client, limiter):
        requests: list[str] = []
        demands = []
        for job in range(40):
            attempts = rng.randint(1, 9)
            demands.append(min(capacity, attempts))
            requests += [f for n in range(attempts) for f in ("A", f"n/{job}-{n}", f"j{job}", "0")]
        answer = await call_script(limiter, *requests)
        assert float(answer[0]) == pytest.approx(water_level(capacity, demands))
        # Every id given back: no demand is left behind.
        ids = [requests[i + 1] for i in range(0, len(requests), 4)]
        await call_script(limiter, *[f for slot_id in ids for f in ("R", slot_id)])
        base = f"{redis_prefix}capacity:"
        assert await client.exists([f"{base}active", f"{base}demands"]) == 0
    assert await redis_counts(redis_prefix) == (0, 0, 0)


async def test_a_hand_on_moves_the_slot_whatever_else_reached_redis_first(
    redis_prefix: str,
) -> None:
    async with script_limiter(redis_prefix, capacity=2) as (_, limiter):
        call = partial(granted, limiter)
        # The waiter's queueing is still on its way: it holds the slot all the same, and the
        # queueing that comes after changes nothing.
        assert await call("A", "n/1", "a", "0") == ["n/1"]
        assert await call("H", "n/1", "n/2", "a", "") == []
        assert await call("A", "n/2", "a", "0") == ["n/2"]  # (it holds already)
        assert await redis_counts(redis_prefix) == (1, 0, 0)
        # Redis granted the waiter a slot freed elsewhere meanwhile: it keeps that one only.
        assert await call("A", "n/3", "a", "0", "A", "n/4", "a", "0") == ["n/3"]
        assert await call("R", "n/2") == ["n/4"]
        assert await call("H", "n/3", "n/4", "a", "") == []
        assert await redis_counts(redis_prefix) == (1, 0, 0)
        # A waiter that gave its place up takes no slot; the slot handed on is free.
        assert await call("A", "n/5", "b", "0") == ["n/5"]
        assert await call("A", "n/6", "b", "0", "R", "n/6") == []
        assert await call("H", "n/5", "n/6", "b", "") == []
        assert await redis_counts(redis_prefix) == (1, 0, 0)
        await call("R", "n/4")
    assert await redis_counts(redis_prefix) == (0, 0, 0)


@dropped_connections
async def test_a_slot_within_the_process_s_share_goes_to_its_own_waiter_while_redis_is_down(
    redis_prefix: str,
) -> None:
    order: list[str] = []
    release = {f"a{n}": trio.Event() for n in range(4)}
    async with (
        proxied_redis() as proxy,
        nodes(redis_prefix, 1, capacity=2, url=proxy.url, lease_s=30) as (limiter,),
        trio.open_nursery() as nursery,
    ):

        async def attempt(name: str, priority: int) -> None:
            async with limiter.slot("a", priority=priority):
                order.append(name)
                await release[name].wait()

        for n in range(4):
            nursery.start_soon(attempt, f"a{n}", n)
        with trio.fail_after(5):
            while await redis_counts(redis_prefix) != (2, 2, 1):  # noqa: ASYNC110
                await trio.sleep(0.005)
            await limiter.renew_once()  # the level: a's share is the whole capacity
        proxy.down()
        release["a0"].set()
        release["a1"].set()
        with trio.fail_after(2):
            while len(order) < 4:  # noqa: ASYNC110
                await trio.sleep(0.005)
        assert sorted(order[:2]) == ["a0", "a1"]  # (each pair granted at once)
        assert sorted(order[2:]) == ["a2", "a3"]
        assert (limiter.handed_on, limiter.given_back) == (2, 0)
        await proxy.up()
        release["a2"].set()
        release["a3"].set()
    await all_given_back(redis_prefix)


async def test_a_process_holding_every_slot_gives_back_what_is_beyond_its_share(
    redis_prefix: str,
) -> None:
    # Job a takes all 4 slots on process one; job b then asks on process two. From one's
    # next answer on, a's share is 2: one gives its other slots back through Redis, to b,
    # and each process turns its 2 over itself. (Handing every slot on to its own would
    # keep b waiting until a is done.)
    held = {"a": 0, "b": 0}
    done = {"a": 0, "b": 0}
    peaks: list[tuple[int, int]] = []
    b_done_when_a_ended = -1
    b_started = trio.Event()

    async def attempt(limiter: RedisCapacity, job: str, index: int) -> None:
        nonlocal b_done_when_a_ended
        async with limiter.slot(job, priority=index):
            held[job] += 1
            if job == "b":
                b_started.set()
            if b_started.is_set() and max(done.values()) < 50:  # both jobs want 4 or more
                peaks.append((held["a"], held["b"]))
            await trio.sleep(0.005)
            held[job] -= 1
        done[job] += 1
        if job == "a" and done["a"] == 60:
            b_done_when_a_ended = done["b"]

    async with nodes(redis_prefix, 2, capacity=4) as (one, two):
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for index in range(60):
                    nursery.start_soon(attempt, one, "a", index)
                while held["a"] < 4:  # noqa: ASYNC110
                    await trio.sleep(0.001)
                for index in range(60):
                    nursery.start_soon(attempt, two, "b", index)
        assert one.handed_on > 0
        assert two.handed_on > 0
        assert one.given_back > 0
    # Once b's share reached process one, each job held about half while both wanted more:
    # at most one slot more (the lag of a call).
    settled = peaks[len(peaks) // 4 :]
    assert max(a for a, _ in settled) <= 3
    assert max(b for _, b in settled) <= 3
    assert b_done_when_a_ended >= 40
    assert await redis_counts(redis_prefix) == (0, 0, 0)


async def test_hand_ons_and_renewals_that_overtake_each_other_never_count_a_slot_twice(
    redis_prefix: str,
) -> None:
    base = f"{redis_prefix}capacity:"
    async with open_client(REDIS_URL) as client:
        limiter = RedisCapacity(client, prefix=base, capacity=1)
        call = partial(granted, limiter)

        async def renew(*holders: str) -> None:
            await limiter._renew(keys=[], args=[*limiter._base, str(len(holders) // 3), *holders])

        assert await call("A", "n/1", "a", "0") == ["n/1"]
        seq = await client.hget(f"{base}job:a", "seq")
        # n/1's slot went to n/2, then to n/3, all on one process. The renewal names the
        # holder n/3 with the slots it replaced; it reaches Redis first, then the second
        # hand-on, then the first: at every step one slot is held.
        await renew("n/3", "a", "n/2 n/1")
        assert await redis_counts(redis_prefix) == (1, 0, 0)
        assert await client.zscore(f"{base}holders", "n/1") is not None  # renewed in its place
        await call("H", "n/2", "n/3", "a", "n/1")
        assert await redis_counts(redis_prefix) == (1, 0, 0)
        await call("H", "n/1", "n/2", "a", "")
        assert await redis_counts(redis_prefix) == (1, 0, 0)
        assert await client.zrange(f"{base}holders", 0, -1) == ("n/3",)
        # The job kept its age through the hand-ons (its holder changed, it never went idle).
        assert await client.hget(f"{base}job:a", "seq") == seq
        # A waiter named again while it holds renews its lease.
        before = await client.zscore(f"{base}holders", "n/3")
        await trio.sleep(0.02)
        await call("A", "n/3", "a", "0")
        after = await client.zscore(f"{base}holders", "n/3")
        assert before is not None
        assert after is not None
        assert after > before
        await call("R", "n/3")
    assert await redis_counts(redis_prefix) == (0, 0, 0)


async def test_a_hand_on_to_a_holder_that_left_is_sent_as_a_giving_back(
    redis_prefix: str,
) -> None:
    # As a hand-on retried after a failed call would be, once Redis no longer remembers that
    # its heir gave the slot back.
    async with nodes(redis_prefix, 1, capacity=1, lease_s=30) as (limiter,):
        await call_script(limiter, "A", "n/1", "a", "0")
        limiter._request("H", "n/1", f"{limiter.node}/left", "a", "")
        await all_given_back(redis_prefix)


async def test_a_waiter_that_held_and_handed_on_before_redis_heard_is_not_granted_after(
    redis_prefix: str,
) -> None:
    async with script_limiter(redis_prefix, capacity=1) as (_, limiter):
        call = partial(granted, limiter)
        assert await call("A", "n/1", "a", "0", "A", "n/2", "a", "1") == ["n/1"]
        # n/1's slot went to n/2, then n/2's to n/3; the second hand-on reaches Redis first,
        # while n/2 still waits in a's queue there.
        await call("H", "n/2", "n/3", "a", "n/1")
        assert await redis_counts(redis_prefix) == (1, 0, 0)  # n/2 waits no more
        # n/3 gives the slot back: nobody waits for it (n/2 is done), so it is free.
        assert await call("R", "n/3") == []
        assert await call("H", "n/1", "n/2", "a", "") == []
    assert await redis_counts(redis_prefix) == (0, 0, 0)


async def test_a_hand_on_gives_back_every_slot_it_replaced_that_redis_has_held(
    redis_prefix: str,
) -> None:
    async with script_limiter(redis_prefix, capacity=2) as (client, limiter):
        call = partial(granted, limiter)
        # n/1 held; its process handed it to n/2, which a dispatch had granted a slot of its
        # own meanwhile (the process merged the two), then n/2's to n/3. Only the last hand-on
        # reaches Redis (the first one's heir had handed on before it was sent).
        assert await call("A", "n/1", "a", "0", "A", "n/2", "a", "1") == ["n/1", "n/2"]
        await call("H", "n/2", "n/3", "a", "n/1")
        assert await client.zrange(f"{redis_prefix}capacity:holders", 0, -1) == ("n/3",)
        await call("R", "n/3")
    assert await redis_counts(redis_prefix) == (0, 0, 0)


async def test_a_hand_on_whose_heir_left_goes_as_its_heir_s_requests_require(
    redis_prefix: str,
) -> None:
    async with script_limiter(redis_prefix, capacity=1) as (_, limiter):
        limiter._holding["n/2"] = "a"
        hand_on = ("H", "n/1", "n/2", "a", "")
        assert limiter._as_sent(hand_on) == [hand_on]  # the heir holds: sent as it is
        del limiter._holding["n/2"]
        limiter._untold.add("n/2")  # the heir handed on: its own hand-on names n/1
        assert limiter._as_sent(hand_on) == []
        limiter._untold.clear()  # the heir gave the slot back: every slot named is given back
        assert limiter._as_sent(("H", "n/2", "n/3", "a", "n/1")) == [("R", "n/2"), ("R", "n/1")]
        assert limiter._as_sent(("R", "n/1")) == [("R", "n/1")]
