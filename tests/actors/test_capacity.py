"""FairCapacity: the shared limit is never exceeded, jobs share it fairly, nothing leaks."""

from __future__ import annotations

import trio
import trio.testing

from actors.capacity import FairCapacity
from actors.messages import CapacityStatistics, JobStatus
from actors.settings import SupervisorSettings
from tests.fakes import FakeProvider, Script, start_supervisor


class Holders:
    """Tasks that each take one slot under a job key and hold it until told to let go."""

    def __init__(self, capacity: FairCapacity, nursery: trio.Nursery) -> None:
        self.capacity = capacity
        self.nursery = nursery
        self.started: list[str] = []
        self.releases: dict[str, trio.Event] = {}
        self.scopes: dict[str, trio.CancelScope] = {}

    async def arrive(self, name: str, key: str, priority: int = 0) -> None:
        """Start ``name``'s attempt and wait until it holds a slot or queues for one."""
        self.releases[name] = trio.Event()
        self.scopes[name] = trio.CancelScope()
        self.nursery.start_soon(self._hold, name, key, priority)
        await trio.testing.wait_all_tasks_blocked()

    async def release(self, name: str) -> None:
        self.releases[name].set()
        await trio.testing.wait_all_tasks_blocked()

    async def _hold(self, name: str, key: str, priority: int) -> None:
        with self.scopes[name]:
            async with self.capacity.slot(key, priority=priority):
                self.started.append(name)
                await self.releases[name].wait()


async def test_a_free_token_goes_to_the_job_holding_the_fewest(nursery: trio.Nursery) -> None:
    holders = Holders(FairCapacity(trio.CapacityLimiter(2)), nursery)
    await holders.arrive("a1", "job-a")
    await holders.arrive("a2", "job-a")
    await holders.arrive("a3", "job-a")
    await holders.arrive("b1", "job-b")
    assert holders.started == ["a1", "a2"]

    await holders.release("a1")

    assert holders.started == ["a1", "a2", "b1"]


async def test_ties_go_to_the_job_served_least_recently(nursery: trio.Nursery) -> None:
    holders = Holders(FairCapacity(trio.CapacityLimiter(1)), nursery)
    await holders.arrive("h", "job-h")
    for name, key in [("a1", "job-a"), ("a2", "job-a"), ("b1", "job-b")]:
        await holders.arrive(name, key)

    for name in ["h", "a1", "b1"]:
        await holders.release(name)

    # FIFO would give a1, a2, b1: the second job would wait for all of the first one.
    assert holders.started == ["h", "a1", "b1", "a2"]


async def test_attempts_of_one_job_with_equal_priority_are_served_in_arrival_order(
    nursery: trio.Nursery,
) -> None:
    holders = Holders(FairCapacity(trio.CapacityLimiter(1)), nursery)
    await holders.arrive("h", "job-h")
    for name in ["a3", "a1", "a2"]:
        await holders.arrive(name, "job-a")

    for name in ["h", "a3", "a1"]:
        await holders.release(name)

    assert holders.started == ["h", "a3", "a1", "a2"]


async def test_within_a_job_the_lowest_priority_value_goes_first(nursery: trio.Nursery) -> None:
    holders = Holders(FairCapacity(trio.CapacityLimiter(1)), nursery)
    await holders.arrive("h", "job-h")
    for name, priority in [("p2", 2), ("p0", 0), ("p1", 1)]:
        await holders.arrive(name, "job-a", priority=priority)

    for name in ["h", "p0", "p1"]:
        await holders.release(name)

    assert holders.started == ["h", "p0", "p1", "p2"]


async def test_images_of_one_job_start_in_index_order(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(default=Script(latency_s=1))
    supervisor = await start_supervisor(nursery, provider, SupervisorSettings(capacity=1))
    t0 = trio.current_time()
    snapshot, _ = supervisor.submit_nowait(owner="alice", prompt="in order", num_images=4)

    with trio.fail_after(60):
        await supervisor.get(snapshot.job_id, owner="alice").wait_finished()

    assert [request.index for request in provider.calls] == [0, 1, 2, 3]
    assert [at - t0 for at in provider.call_times] == [0, 1, 2, 3]


async def test_statistics_count_waiting_attempts_and_jobs(nursery: trio.Nursery) -> None:
    capacity = FairCapacity(trio.CapacityLimiter(1))
    holders = Holders(capacity, nursery)
    await holders.arrive("h", "job-h")
    await holders.arrive("a1", "job-a")
    await holders.arrive("a2", "job-a")
    await holders.arrive("b1", "job-b")

    assert capacity.statistics() == CapacityStatistics(total=1, in_use=1, waiting=3, jobs_waiting=2)


async def test_cancelled_waiting_attempt_leaves_no_token_behind(nursery: trio.Nursery) -> None:
    capacity = FairCapacity(trio.CapacityLimiter(1))
    holders = Holders(capacity, nursery)
    await holders.arrive("h", "job-h")
    await holders.arrive("w", "job-w")

    holders.scopes["w"].cancel()
    await trio.testing.wait_all_tasks_blocked()
    assert capacity.statistics() == CapacityStatistics(total=1, in_use=1, waiting=0, jobs_waiting=0)
    await holders.release("h")

    assert holders.started == ["h"]
    assert capacity.limiter.statistics().borrowed_tokens == 0
    await holders.arrive("next", "job-w")
    assert holders.started == ["h", "next"]


async def test_attempt_cancelled_as_it_is_granted_gives_its_token_back(
    nursery: trio.Nursery,
) -> None:
    capacity = FairCapacity(trio.CapacityLimiter(1))
    holders = Holders(capacity, nursery)

    async with capacity.slot("job-h"):
        await holders.arrive("w", "job-w")
        holders.scopes["w"].cancel()
        # Leaving the block releases synchronously, before "w" runs again: the token is granted
        # to an attempt that is already cancelled, which must hand it back.

    await trio.testing.wait_all_tasks_blocked()
    assert holders.started == []
    assert capacity.limiter.statistics().borrowed_tokens == 0
    assert capacity.statistics() == CapacityStatistics(total=1, in_use=0, waiting=0, jobs_waiting=0)


async def test_capacity_is_never_exceeded_across_jobs(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(default=Script(latency_s=1))
    supervisor = await start_supervisor(nursery, provider, SupervisorSettings(capacity=3))
    t0 = trio.current_time()

    jobs = [
        supervisor.get(
            supervisor.submit_nowait(owner="alice", prompt=f"job {n}", num_images=4)[0].job_id,
            owner="alice",
        )
        for n in range(5)
    ]
    with trio.fail_after(60):
        for job in jobs:
            await job.wait_finished()

    assert provider.peak_in_flight == 3
    assert len(provider.calls) == 20
    assert trio.current_time() - t0 == 7  # ceil(20 / 3) rounds of 1 s
    assert {job.status for job in jobs} == {JobStatus.COMPLETED}


async def test_jobs_submitted_together_each_start_within_ceil_j_over_c_rounds(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(default=Script(latency_s=1))
    supervisor = await start_supervisor(nursery, provider, SupervisorSettings(capacity=2))
    t0 = trio.current_time()

    job_ids = [
        supervisor.submit_nowait(owner="alice", prompt=f"job {n}", num_images=6)[0].job_id
        for n in range(3)
    ]
    with trio.fail_after(60):
        for job_id in job_ids:
            await supervisor.get(job_id, owner="alice").wait_finished()

    first_starts = sorted(min(provider.start_times(job_id=job_id)) - t0 for job_id in job_ids)
    assert first_starts == [0, 0, 1]
    assert provider.peak_in_flight == 2


async def test_big_job_submitted_first_does_not_starve_a_small_one(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(default=Script(latency_s=1))
    supervisor = await start_supervisor(nursery, provider, SupervisorSettings(capacity=2))
    t0 = trio.current_time()
    big, _ = supervisor.submit_nowait(owner="alice", prompt="big", num_images=20)
    await trio.testing.wait_all_tasks_blocked()

    small, _ = supervisor.submit_nowait(owner="bob", prompt="small", num_images=1)
    with trio.fail_after(60):
        await supervisor.get(small.job_id, owner="bob").wait_finished()
        await supervisor.get(big.job_id, owner="alice").wait_finished()

    # A FIFO limiter would start the small job's image at 10 s, after all of the big one's.
    assert [at - t0 for at in provider.start_times(job_id=small.job_id)] == [1]
    assert supervisor.get(small.job_id, owner="bob").snapshot().total_ms == 2000
    assert supervisor.get(big.job_id, owner="alice").snapshot().total_ms == 11000


async def test_cancelling_a_job_waiting_for_capacity_leaks_no_token(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(by_prompt={"holder": Script(block=trio.Event())})
    supervisor = await start_supervisor(nursery, provider, SupervisorSettings(capacity=1))
    holder, _ = supervisor.submit_nowait(owner="alice", prompt="holder", num_images=1)
    await trio.testing.wait_all_tasks_blocked()
    waiter, _ = supervisor.submit_nowait(owner="alice", prompt="waiter", num_images=3)
    await trio.testing.wait_all_tasks_blocked()
    assert supervisor.capacity.statistics() == CapacityStatistics(
        total=1, in_use=1, waiting=3, jobs_waiting=1
    )

    with trio.fail_after(10):
        await supervisor.cancel(waiter.job_id, owner="alice").wait_finished()
        assert supervisor.capacity.statistics().waiting == 0
        await supervisor.cancel(holder.job_id, owner="alice").wait_finished()

    assert supervisor.capacity.statistics() == CapacityStatistics(
        total=1, in_use=0, waiting=0, jobs_waiting=0
    )
    assert provider.start_times(job_id=waiter.job_id) == []
