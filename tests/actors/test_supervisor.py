"""Supervisor: admission, ownership, idempotency, listing, retention, subscriptions, shutdown."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import trio
import trio.testing

from actors.errors import (
    IdempotencyConflict,
    JobNotFound,
    LimitExceeded,
    Overloaded,
    ShuttingDown,
)
from actors.messages import (
    CapacityStatistics,
    DoneEvent,
    ImageStatus,
    JobStatus,
    ProgressEvent,
    SupervisorStatistics,
    Transport,
)
from actors.retry import RetryPolicy
from actors.settings import SupervisorSettings
from actors.store import MemoryStore
from actors.supervisor import Batch, Supervisor, open_supervisor
from tests.fakes import (
    FIXED_NOW,
    FakeProvider,
    Script,
    fixed_now,
    read_all,
    start_supervisor,
    upper_jitter,
)


def submit(supervisor: Supervisor, owner: str = "alice", prompt: str = "a cat", n: int = 1) -> str:
    snapshot, created = supervisor.submit_nowait(owner=owner, prompt=prompt, num_images=n)
    assert created
    return snapshot.job_id


# --- admission ---------------------------------------------------------------------------------


async def test_submit_returns_a_pending_snapshot(nursery: trio.Nursery) -> None:
    supervisor = await start_supervisor(nursery, FakeProvider())

    snapshot, created = supervisor.submit_nowait(owner="alice", prompt="a cat", num_images=3)

    assert created
    assert snapshot.status is JobStatus.PENDING
    assert (snapshot.owner, snapshot.prompt, snapshot.num_images) == ("alice", "a cat", 3)
    assert (snapshot.created_at, snapshot.ttfi_ms, snapshot.total_ms) == (FIXED_NOW, None, None)
    assert [(image.index, image.status, image.attempts) for image in snapshot.images] == [
        (0, ImageStatus.RUNNING, 0),
        (1, ImageStatus.RUNNING, 0),
        (2, ImageStatus.RUNNING, 0),
    ]


async def test_submit_before_the_supervisor_runs_raises_shutting_down() -> None:
    supervisor = Supervisor(FakeProvider(), SupervisorSettings(), store=MemoryStore())

    with pytest.raises(ShuttingDown):
        supervisor.submit_nowait(owner="alice", prompt="a cat", num_images=1)


async def test_per_user_active_job_cap_raises_limit_exceeded(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    settings = SupervisorSettings(max_active_jobs_per_user=2, retry_after_s=7)
    supervisor = await start_supervisor(nursery, FakeProvider(), settings)
    submit(supervisor)
    submit(supervisor)

    with pytest.raises(LimitExceeded, match="at most 2 per user") as info:
        submit(supervisor)

    assert info.value.retry_after_s == 7
    submit(supervisor, owner="bob")  # the cap is per user


async def test_finished_jobs_do_not_count_against_the_user_cap(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    settings = SupervisorSettings(max_active_jobs_per_user=1)
    supervisor = await start_supervisor(nursery, FakeProvider(), settings)
    job_id = submit(supervisor)
    with trio.fail_after(10):
        await supervisor.get(job_id, owner="alice").wait_finished()

    submit(supervisor)


async def test_global_queued_image_cap_raises_overloaded(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    settings = SupervisorSettings(max_queued_images=10, retry_after_s=9)
    supervisor = await start_supervisor(nursery, FakeProvider(), settings)
    submit(supervisor, owner="alice", n=6)
    submit(supervisor, owner="bob", n=4)

    with pytest.raises(Overloaded) as info:
        submit(supervisor, owner="carol", n=1)

    assert info.value.retry_after_s == 9
    assert supervisor.statistics().images_queued == 10


async def test_someone_elses_job_is_not_found(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(default=Script(latency_s=5))
    supervisor = await start_supervisor(nursery, provider)
    job_id = submit(supervisor, owner="alice")

    with pytest.raises(JobNotFound):
        supervisor.get(job_id, owner="mallory")
    with pytest.raises(JobNotFound):
        supervisor.cancel(job_id, owner="mallory")
    with (
        pytest.raises(JobNotFound),
        supervisor.subscribe(job_id, owner="mallory", transport=Transport.SSE),
    ):
        pass

    with trio.fail_after(10):
        await supervisor.get(job_id, owner="alice").wait_finished()
    assert supervisor.get(job_id, owner="alice").status is JobStatus.COMPLETED


async def test_unknown_job_is_not_found(nursery: trio.Nursery) -> None:
    supervisor = await start_supervisor(nursery, FakeProvider())

    with pytest.raises(JobNotFound, match="no-such-job") as info:
        supervisor.get("no-such-job", owner="alice")

    assert info.value.job_id == "no-such-job"


# --- idempotency -------------------------------------------------------------------------------


async def test_same_idempotency_key_returns_the_same_job(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider()
    supervisor = await start_supervisor(nursery, provider)
    first, created_first = supervisor.submit_nowait(
        owner="alice", prompt="a cat", num_images=2, idempotency_key="k1"
    )

    again, created_again = supervisor.submit_nowait(
        owner="alice", prompt="a cat", num_images=2, idempotency_key="k1"
    )

    assert (created_first, created_again) == (True, False)
    assert again.job_id == first.job_id
    with trio.fail_after(10):
        await supervisor.get(first.job_id, owner="alice").wait_finished()
    assert len(provider.calls) == 2


async def test_replay_of_a_finished_job_returns_its_current_snapshot(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    supervisor = await start_supervisor(nursery, FakeProvider())
    first, _ = supervisor.submit_nowait(
        owner="alice", prompt="a cat", num_images=1, idempotency_key="k1"
    )
    with trio.fail_after(10):
        await supervisor.get(first.job_id, owner="alice").wait_finished()

    again, created = supervisor.submit_nowait(
        owner="alice", prompt="a cat", num_images=1, idempotency_key="k1"
    )

    assert not created
    assert (again.job_id, again.status) == (first.job_id, JobStatus.COMPLETED)


@pytest.mark.parametrize(("prompt", "num_images"), [("a dog", 2), ("a cat", 3)])
async def test_idempotency_key_reused_for_a_different_body_conflicts(
    nursery: trio.Nursery, prompt: str, num_images: int
) -> None:
    supervisor = await start_supervisor(nursery, FakeProvider())
    supervisor.submit_nowait(owner="alice", prompt="a cat", num_images=2, idempotency_key="k1")

    with pytest.raises(IdempotencyConflict):
        supervisor.submit_nowait(
            owner="alice", prompt=prompt, num_images=num_images, idempotency_key="k1"
        )

    assert len(supervisor.list_jobs(owner="alice", limit=10)[0]) == 1


async def test_idempotency_keys_are_per_user(nursery: trio.Nursery) -> None:
    supervisor = await start_supervisor(nursery, FakeProvider())
    mine, _ = supervisor.submit_nowait(
        owner="alice", prompt="a cat", num_images=1, idempotency_key="k1"
    )

    theirs, created = supervisor.submit_nowait(
        owner="bob", prompt="a cat", num_images=1, idempotency_key="k1"
    )

    assert created
    assert theirs.job_id != mine.job_id


async def test_replay_is_answered_even_when_the_user_is_at_the_cap(
    nursery: trio.Nursery,
) -> None:
    settings = SupervisorSettings(max_active_jobs_per_user=1)
    supervisor = await start_supervisor(nursery, FakeProvider(), settings)
    first, _ = supervisor.submit_nowait(
        owner="alice", prompt="a cat", num_images=1, idempotency_key="k1"
    )

    again, created = supervisor.submit_nowait(
        owner="alice", prompt="a cat", num_images=1, idempotency_key="k1"
    )

    assert (again.job_id, created) == (first.job_id, False)


# --- listing -----------------------------------------------------------------------------------


async def test_list_jobs_pages_newest_first_with_a_cursor(nursery: trio.Nursery) -> None:
    supervisor = await start_supervisor(nursery, FakeProvider())
    job_ids = [submit(supervisor, prompt=f"job {n}") for n in range(5)]
    submit(supervisor, owner="bob")

    pages: list[list[str]] = []
    cursor: int | None = None
    while True:
        page, cursor = supervisor.list_jobs(owner="alice", limit=2, before=cursor)
        pages.append([snapshot.job_id for snapshot in page])
        if cursor is None:
            break

    newest_first = job_ids[::-1]
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:5]]


async def test_list_jobs_of_a_user_without_jobs_is_empty(nursery: trio.Nursery) -> None:
    supervisor = await start_supervisor(nursery, FakeProvider())
    submit(supervisor, owner="bob")

    assert supervisor.list_jobs(owner="alice", limit=20) == ((), None)


async def test_list_jobs_exact_page_has_no_next_cursor(nursery: trio.Nursery) -> None:
    supervisor = await start_supervisor(nursery, FakeProvider())
    job_ids = [submit(supervisor, prompt=f"job {n}") for n in range(2)]

    page, cursor = supervisor.list_jobs(owner="alice", limit=2)

    assert [snapshot.job_id for snapshot in page] == job_ids[::-1]
    assert cursor is None


# --- retention ---------------------------------------------------------------------------------


async def test_finished_job_is_forgotten_after_the_retention_time(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    settings = SupervisorSettings(job_retention_s=60)
    provider = FakeProvider(default=Script(latency_s=1))
    supervisor = await start_supervisor(nursery, provider, settings)
    t0 = trio.current_time()
    job_id = submit(supervisor)
    with trio.fail_after(10):
        await supervisor.get(job_id, owner="alice").wait_finished()
    assert trio.current_time() - t0 == 1

    await trio.sleep(59.5)
    assert supervisor.get(job_id, owner="alice").status is JobStatus.COMPLETED
    await trio.sleep(0.5)  # exactly 60 s after the job finished

    with pytest.raises(JobNotFound):
        supervisor.get(job_id, owner="alice")
    assert supervisor.statistics().jobs_retained == 0
    assert supervisor.list_jobs(owner="alice", limit=10) == ((), None)


async def test_unfinished_job_is_kept_past_the_retention_time(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    settings = SupervisorSettings(job_retention_s=60)
    provider = FakeProvider(default=Script(latency_s=100))
    supervisor = await start_supervisor(nursery, provider, settings)
    job_id = submit(supervisor)

    await trio.sleep(90)

    assert supervisor.get(job_id, owner="alice").status is JobStatus.RUNNING


async def test_only_the_newest_finished_jobs_are_kept_beyond_the_max(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(
        by_prompt={
            "first": Script(latency_s=1),
            "second": Script(latency_s=2),
            "third": Script(latency_s=3),
        }
    )
    settings = SupervisorSettings(max_retained_jobs=2)
    supervisor = await start_supervisor(nursery, provider, settings)
    job_ids = [submit(supervisor, prompt=p) for p in ["third", "first", "second"]]
    jobs = [supervisor.get(job_id, owner="alice") for job_id in job_ids]

    with trio.fail_after(10):
        for job in jobs:
            await job.wait_finished()

    third, first, second = job_ids
    with pytest.raises(JobNotFound):
        supervisor.get(first, owner="alice")  # the first to finish is the first forgotten
    assert supervisor.get(second, owner="alice").status is JobStatus.COMPLETED
    assert supervisor.get(third, owner="alice").status is JobStatus.COMPLETED


async def test_forgetting_a_job_frees_its_idempotency_key(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    settings = SupervisorSettings(job_retention_s=10)
    supervisor = await start_supervisor(nursery, FakeProvider(), settings)
    first, _ = supervisor.submit_nowait(
        owner="alice", prompt="a cat", num_images=1, idempotency_key="k1"
    )
    with trio.fail_after(10):
        await supervisor.get(first.job_id, owner="alice").wait_finished()
    await trio.sleep(10)

    again, created = supervisor.submit_nowait(
        owner="alice", prompt="a dog", num_images=2, idempotency_key="k1"
    )

    assert created
    assert again.job_id != first.job_id


# --- subscriptions -----------------------------------------------------------------------------


async def test_subscription_heartbeat_is_an_empty_batch_after_exactly_the_timeout(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(default=Script(block=trio.Event()))
    supervisor = await start_supervisor(nursery, provider)
    job_id = submit(supervisor)
    t0 = trio.current_time()

    with (
        trio.fail_after(60),
        supervisor.subscribe(job_id, owner="alice", transport=Transport.SSE) as subscription,
    ):
        batch = await subscription.wait_events_after(0, timeout_s=15)

    assert batch == Batch(events=(), ended=False, stopping=False)
    assert trio.current_time() - t0 == 15


async def test_subscription_wakes_as_soon_as_an_event_happens(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider({0: Script(latency_s=2.5), 1: Script(latency_s=4)})
    supervisor = await start_supervisor(nursery, provider)
    job_id = submit(supervisor, n=2)
    t0 = trio.current_time()
    woke_at: list[float] = []
    batches: list[Batch] = []

    with (
        trio.fail_after(60),
        supervisor.subscribe(job_id, owner="alice", transport=Transport.WEBSOCKET) as sub,
    ):
        cursor = 0
        while not (batch := await sub.wait_events_after(cursor, timeout_s=15)).ended:
            woke_at.append(trio.current_time() - t0)
            batches.append(batch)
            cursor = batch.events[-1].id

    assert woke_at[0] == 2.5
    assert [type(event) for event in batches[0].events] == [ProgressEvent]
    assert set(woke_at[1:]) == {4}  # image 1, then done (in one batch or two)
    assert [event.id for batch in batches for event in batch.events] == [1, 2, 3]
    assert isinstance(batches[-1].events[-1], DoneEvent)


async def test_subscription_to_a_finished_job_replays_then_ends(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    supervisor = await start_supervisor(nursery, FakeProvider())
    job_id = submit(supervisor, n=3)
    with trio.fail_after(10):
        await supervisor.get(job_id, owner="alice").wait_finished()
    t0 = trio.current_time()

    with supervisor.subscribe(job_id, owner="alice", transport=Transport.SSE) as subscription:
        replay = await subscription.wait_events_after(0, timeout_s=15)
        resumed = await subscription.wait_events_after(2, timeout_s=15)
        after_done = await subscription.wait_events_after(4, timeout_s=15)

    assert [event.id for event in replay.events] == [1, 2, 3, 4]
    assert [event.id for event in resumed.events] == [3, 4]
    assert after_done == Batch(ended=True)
    assert trio.current_time() == t0


async def test_a_subscriber_is_counted_until_its_subscription_is_closed(
    nursery: trio.Nursery,
) -> None:
    supervisor = await start_supervisor(nursery, FakeProvider())
    job_id = submit(supervisor)

    subscription = supervisor.subscribe(job_id, owner="alice", transport=Transport.WEBSOCKET)
    counted = supervisor.statistics().subscribers
    subscription.close()
    subscription.close()  # idempotent

    assert counted == ((Transport.SSE, 0), (Transport.WEBSOCKET, 1))
    assert supervisor.statistics().subscribers == ((Transport.SSE, 0), (Transport.WEBSOCKET, 0))


async def test_open_streams_are_capped_per_user_and_refusals_counted(
    nursery: trio.Nursery,
) -> None:
    settings = SupervisorSettings(max_streams_per_user=2, retry_after_s=7)
    supervisor = await start_supervisor(nursery, FakeProvider(), settings)
    job_id = submit(supervisor)
    bobs = submit(supervisor, owner="bob")

    first = supervisor.subscribe(job_id, owner="alice", transport=Transport.SSE)
    supervisor.subscribe(job_id, owner="alice", transport=Transport.WEBSOCKET)
    with pytest.raises(LimitExceeded, match="at most 2 per user") as info:
        supervisor.subscribe(job_id, owner="alice", transport=Transport.SSE)
    with pytest.raises(LimitExceeded):
        supervisor.check_subscriber(owner="alice", transport=Transport.WEBSOCKET)
    supervisor.subscribe(bobs, owner="bob", transport=Transport.SSE)  # the cap is per user

    assert info.value.retry_after_s == 7
    statistics = supervisor.statistics()
    assert statistics.subscribers == ((Transport.SSE, 2), (Transport.WEBSOCKET, 1))
    assert statistics.subscribers_refused == ((Transport.SSE, 1), (Transport.WEBSOCKET, 1))
    first.close()
    supervisor.subscribe(job_id, owner="alice", transport=Transport.SSE).close()  # room again


# --- shutdown ----------------------------------------------------------------------------------


async def test_begin_shutdown_refuses_new_jobs(nursery: trio.Nursery) -> None:
    supervisor = await start_supervisor(nursery, FakeProvider())

    supervisor.begin_shutdown()
    supervisor.begin_shutdown()  # idempotent

    with pytest.raises(ShuttingDown) as info:
        submit(supervisor)
    assert info.value.retry_after_s == 5
    assert supervisor.statistics().shutting_down


async def test_begin_shutdown_ends_a_waiting_subscription_promptly(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(default=Script(block=trio.Event()))
    supervisor = await start_supervisor(nursery, provider)
    job_id = submit(supervisor)
    batches: list[Batch] = []

    async def subscriber() -> None:
        with supervisor.subscribe(job_id, owner="alice", transport=Transport.SSE) as sub:
            batches.append(await sub.wait_events_after(0, timeout_s=15))
            batches.append(await sub.wait_events_after(0, timeout_s=15))

    nursery.start_soon(subscriber)
    await trio.testing.wait_all_tasks_blocked()
    t0 = trio.current_time()

    supervisor.begin_shutdown()
    with trio.fail_after(1):
        await trio.testing.wait_all_tasks_blocked()

    assert batches == [Batch(stopping=True), Batch(stopping=True)]
    assert trio.current_time() == t0


async def test_leaving_open_supervisor_cancels_unfinished_jobs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider({0: Script(latency_s=1)}, default=Script(latency_s=100))
    with trio.fail_after(10):
        async with open_supervisor(
            provider,
            SupervisorSettings(),
            store=MemoryStore(),
            now=fixed_now(),
            uniform=upper_jitter,
        ) as supervisor:
            job_id = submit(supervisor, n=3)
            job = supervisor.get(job_id, owner="alice")
            await trio.sleep(2)

    with trio.fail_after(1):
        events = await read_all(job.log)
    assert events[-1] == DoneEvent(
        id=4,
        status=JobStatus.CANCELED,
        total_ms=2000,
        ttfi_ms=1000,
        completed_count=1,
        failed_count=0,
    )
    assert [image.status for image in job.snapshot().images] == [
        ImageStatus.COMPLETED,
        ImageStatus.CANCELED,
        ImageStatus.CANCELED,
    ]
    assert provider.cancelled == 2
    with pytest.raises(ShuttingDown):
        submit(supervisor)


# --- statistics --------------------------------------------------------------------------------


async def test_statistics_count_jobs_attempts_capacity_and_subscribers(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(
        by_prompt={
            "flaky": Script(latency_s=1, fail_times=1),
            "bad": Script(latency_s=1, permanent="rejected"),
            "stuck": Script(block=trio.Event()),
        }
    )
    settings = SupervisorSettings(capacity=2, retry=RetryPolicy(attempts=3, base_delay_s=1))
    supervisor = await start_supervisor(nursery, provider, settings)
    t0 = trio.current_time()
    flaky = submit(supervisor, prompt="flaky")
    submit(supervisor, prompt="bad")
    with trio.fail_after(10):
        await supervisor.get(flaky, owner="alice").wait_finished()  # at 3 s: 1 + 1 + 1
    stuck = submit(supervisor, prompt="stuck", n=3)
    await trio.testing.wait_all_tasks_blocked()

    with ExitStack() as stack:
        for transport in [Transport.SSE, Transport.SSE, Transport.WEBSOCKET]:
            stack.enter_context(supervisor.subscribe(stuck, owner="alice", transport=transport))
        statistics = supervisor.statistics()
    after = supervisor.statistics()

    assert statistics == SupervisorStatistics(
        uptime_s=trio.current_time() - t0,
        shutting_down=False,
        jobs_by_status=(
            (JobStatus.PENDING, 0),
            (JobStatus.RUNNING, 1),
            (JobStatus.COMPLETED, 1),
            (JobStatus.FAILED, 1),
            (JobStatus.CANCELED, 0),
        ),
        jobs_retained=3,
        images_queued=3,
        capacity=CapacityStatistics(total=2, in_use=2, waiting=1, jobs_waiting=1),
        attempts_total=5,
        retries_total=1,
        images_completed_total=1,
        images_failed_total=1,
        jobs_crashed_total=0,
        tasks_failed_total=0,
        subscribers=((Transport.SSE, 2), (Transport.WEBSOCKET, 1)),
        subscribers_refused=((Transport.SSE, 0), (Transport.WEBSOCKET, 0)),
    )
    assert statistics.uptime_s == 3
    assert after.subscribers == ((Transport.SSE, 0), (Transport.WEBSOCKET, 0))
