"""JobActor: status, timings, events, failures and cancellation of one job."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from actors.capacity import FairCapacity
from actors.job import JobActor
from actors.messages import DoneEvent, ImageStatus, JobStatus, ProgressEvent
from actors.retry import RetryPolicy
from actors.settings import SupervisorSettings
from actors.store import MemoryStore
from actors.supervisor import Supervisor
from actors.worker import WorkerContext
from tests.fakes import (
    FIXED_NOW,
    FakeProvider,
    Script,
    fixed_now,
    read_all,
    start_supervisor,
    upper_jitter,
)


def job_of(supervisor: Supervisor, job_id: str) -> JobActor:
    return supervisor.get(job_id, owner="alice")


async def run_job(
    nursery: trio.Nursery,
    provider: FakeProvider,
    *,
    num_images: int,
    capacity: int = 10,
    retry: RetryPolicy | None = None,
) -> JobActor:
    """Submit one job for alice on a fresh supervisor and return its actor (still running)."""
    settings = SupervisorSettings(capacity=capacity, retry=retry or RetryPolicy())
    supervisor = await start_supervisor(nursery, provider, settings)
    snapshot, _ = supervisor.submit_nowait(owner="alice", prompt="a red fox", num_images=num_images)
    return job_of(supervisor, snapshot.job_id)


async def test_job_completes_with_exact_ttfi_and_total(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(default=Script(latency_s=1))
    job = await run_job(nursery, provider, num_images=4, capacity=2)

    with trio.fail_after(60):
        await job.wait_finished()

    snapshot = job.snapshot()
    assert (snapshot.status, snapshot.ttfi_ms, snapshot.total_ms) == (
        JobStatus.COMPLETED,
        1000,
        2000,
    )
    assert [image.url for image in snapshot.images] == [
        f"https://img.test/{job.job_id}/{index}.png" for index in range(4)
    ]
    assert [image.id for image in snapshot.images] == [f"{job.job_id}-{i}" for i in range(4)]
    assert {(image.status, image.attempts, image.error) for image in snapshot.images} == {
        (ImageStatus.COMPLETED, 1, None)
    }


async def test_ttfi_counts_from_acceptance_to_first_success(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(
        {0: Script(latency_s=1, permanent="nope"), 1: Script(latency_s=2.5), 2: Script(latency_s=4)}
    )
    job = await run_job(nursery, provider, num_images=3)

    with trio.fail_after(60):
        await job.wait_finished()

    assert (job.snapshot().ttfi_ms, job.snapshot().total_ms) == (2500, 4000)


async def test_job_is_pending_until_an_attempt_starts_then_running(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    unblock = trio.Event()
    provider = FakeProvider(by_prompt={"first": Script(block=unblock, latency_s=0)})
    settings = SupervisorSettings(capacity=1)
    supervisor = await start_supervisor(nursery, provider, settings)
    supervisor.submit_nowait(owner="alice", prompt="first", num_images=1)
    await trio.testing.wait_all_tasks_blocked()
    second, _ = supervisor.submit_nowait(owner="alice", prompt="second", num_images=2)
    await trio.testing.wait_all_tasks_blocked()
    job = job_of(supervisor, second.job_id)

    assert job.snapshot().status is JobStatus.PENDING
    assert job.snapshot().attempts == 0
    assert {image.status for image in job.snapshot().images} == {ImageStatus.RUNNING}

    unblock.set()
    await trio.testing.wait_all_tasks_blocked()

    assert job.snapshot().status is JobStatus.RUNNING
    assert job.snapshot().attempts == 1


async def test_progress_events_come_one_per_image_in_id_order_then_done(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(
        {0: Script(latency_s=3), 1: Script(latency_s=1), 2: Script(latency_s=2)}
    )
    job = await run_job(nursery, provider, num_images=3)

    with trio.fail_after(60):
        live = await read_all(job.log)

    assert [event.id for event in live] == [1, 2, 3, 4]
    progress = [event for event in live if isinstance(event, ProgressEvent)]
    assert [event.index for event in progress] == [1, 2, 0]  # in the order they finished
    assert {(e.status, e.attempts, e.started_at, e.finished_at) for e in progress} == {
        (ImageStatus.COMPLETED, 1, FIXED_NOW, FIXED_NOW)
    }
    assert live[-1] == DoneEvent(
        id=4,
        status=JobStatus.COMPLETED,
        total_ms=3000,
        ttfi_ms=1000,
        completed_count=3,
        failed_count=0,
    )
    with trio.fail_after(1):
        assert await read_all(job.log) == live  # a late subscriber replays the same events


async def test_job_whose_images_all_failed_is_failed_without_ttfi(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(default=Script(latency_s=1, permanent="content policy"))
    job = await run_job(nursery, provider, num_images=2)

    with trio.fail_after(60):
        events = await read_all(job.log)

    assert (job.status, job.snapshot().ttfi_ms, job.snapshot().total_ms) == (
        JobStatus.FAILED,
        None,
        1000,
    )
    assert events[-1] == DoneEvent(
        id=3,
        status=JobStatus.FAILED,
        total_ms=1000,
        ttfi_ms=None,
        completed_count=0,
        failed_count=2,
    )
    assert {image.error for image in job.snapshot().images} == {"content policy"}


async def test_job_with_at_least_one_success_is_completed(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider({1: Script(latency_s=1, permanent="nope")})
    job = await run_job(nursery, provider, num_images=3)

    with trio.fail_after(60):
        events = await read_all(job.log)

    assert job.status is JobStatus.COMPLETED
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert (done.completed_count, done.failed_count) == (2, 1)


async def test_unexpected_provider_exception_fails_only_that_image(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider({1: Script(latency_s=1, crash=ValueError)})
    job = await run_job(nursery, provider, num_images=3)

    with trio.fail_after(60):
        await job.wait_finished()

    images = job.snapshot().images
    assert [(image.status, image.error) for image in images] == [
        (ImageStatus.COMPLETED, None),
        (ImageStatus.FAILED, "internal error (ValueError)"),
        (ImageStatus.COMPLETED, None),
    ]
    assert job.status is JobStatus.COMPLETED


async def test_retried_image_records_its_attempts(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider({0: Script(latency_s=1, fail_times=2)})
    retry = RetryPolicy(attempts=3, base_delay_s=0.5)
    t0 = trio.current_time()
    job = await run_job(nursery, provider, num_images=2, retry=retry)

    with trio.fail_after(60):
        await job.wait_finished()

    snapshot = job.snapshot()
    assert [image.attempts for image in snapshot.images] == [3, 1]
    assert snapshot.attempts == 4
    assert [image.provider_ms for image in snapshot.images] == [3000, 1000]
    # Calls of 1 s with backoffs of exactly 0.5 s and 1 s between them.
    assert [at - t0 for at in provider.start_times(index=0)] == [0, 1.5, 3.5]
    assert snapshot.total_ms == 4500


async def test_snapshot_splits_waiting_for_capacity_from_provider_time(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(default=Script(latency_s=1))
    job = await run_job(nursery, provider, num_images=2, capacity=1)

    with trio.fail_after(60):
        await job.wait_finished()

    images = job.snapshot().images
    assert [image.wait_ms for image in images] == [0, 1000]  # images start in index order
    assert [image.provider_ms for image in images] == [1000, 1000]
    assert [image.started_at for image in images] == [FIXED_NOW, FIXED_NOW]


async def test_cancel_stops_calls_in_flight_and_publishes_canceled_done(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(default=Script(latency_s=10))
    job = await run_job(nursery, provider, num_images=3)
    await trio.sleep(4)

    job.cancel()
    with trio.fail_after(10):
        events = await read_all(job.log)

    assert provider.cancelled == 3
    assert provider.in_flight == 0
    assert events[-1] == DoneEvent(
        id=4,
        status=JobStatus.CANCELED,
        total_ms=4000,
        ttfi_ms=None,
        completed_count=0,
        failed_count=0,
    )
    assert [(image.status, image.error) for image in job.snapshot().images] == [
        (ImageStatus.CANCELED, "canceled")
    ] * 3
    assert job.status is JobStatus.CANCELED


async def test_cancel_keeps_images_that_already_finished(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider({0: Script(latency_s=1)}, default=Script(latency_s=10))
    job = await run_job(nursery, provider, num_images=2)
    await trio.sleep(2)

    job.cancel()
    with trio.fail_after(10):
        events = await read_all(job.log)

    assert [image.status for image in job.snapshot().images] == [
        ImageStatus.COMPLETED,
        ImageStatus.CANCELED,
    ]
    assert events[-1] == DoneEvent(
        id=3,
        status=JobStatus.CANCELED,
        total_ms=2000,
        ttfi_ms=1000,
        completed_count=1,
        failed_count=0,
    )
    assert provider.cancelled == 1


async def test_cancel_before_the_job_runs_calls_no_provider(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider()
    job = await run_job(nursery, provider, num_images=3)

    job.cancel()
    with trio.fail_after(10):
        await job.wait_finished()

    assert provider.calls == []
    assert job.status is JobStatus.CANCELED
    assert job.snapshot().total_ms == 0
    assert [image.started_at for image in job.snapshot().images] == [None, None, None]


async def test_cancel_of_a_finished_job_changes_nothing(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(default=Script(latency_s=1))
    job = await run_job(nursery, provider, num_images=2)
    with trio.fail_after(10):
        await job.wait_finished()
    before = (job.snapshot(), job.log.events_after(0))

    job.cancel()
    await trio.testing.wait_all_tasks_blocked()

    assert (job.snapshot(), job.log.events_after(0)) == before
    assert job.status is JobStatus.COMPLETED


async def test_cancellation_from_outside_still_publishes_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(default=Script(latency_s=10))
    context = WorkerContext(
        job_id="job-1",
        prompt="a red fox",
        provider=provider,
        capacity=FairCapacity(trio.CapacityLimiter(2)),
        retry=RetryPolicy(),
        attempt_timeout_s=60,
        provider_cancel_s=5.0,
        now=fixed_now(),
        uniform=upper_jitter,
    )
    job = JobActor(
        job_id="job-1",
        owner="alice",
        prompt="a red fox",
        num_images=2,
        context=context,
        store=MemoryStore(),
    )

    with trio.move_on_after(3):  # the server stopping, not job.cancel()
        await job.run()

    done = job.log.events_after(0)[-1]
    assert done == DoneEvent(
        id=3,
        status=JobStatus.CANCELED,
        total_ms=3000,
        ttfi_ms=None,
        completed_count=0,
        failed_count=0,
    )
    assert job.log.closed
    assert provider.cancelled == 2


@pytest.mark.parametrize("num_images", [1, 5])
async def test_log_holds_one_event_per_image_plus_done(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, num_images: int
) -> None:
    job = await run_job(nursery, FakeProvider(), num_images=num_images)

    with trio.fail_after(60):
        await job.wait_finished()

    assert job.log.last_id == num_images + 1
    assert job.log.closed
