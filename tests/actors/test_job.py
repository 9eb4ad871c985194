"""JobActor: status, timings, events, failures and cancellation of one job."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import timedelta

import pytest
import trio
import trio.testing

from actors.capacity import FairCapacity
from actors.errors import StoreUnavailable
from actors.job import JobActor
from actors.messages import (
    DoneEvent,
    ImageStatus,
    JobEvent,
    JobStatus,
    ProgressEvent,
    WorkerReport,
)
from actors.retry import RetryPolicy
from actors.settings import SupervisorSettings
from actors.store import AppendEvent, Commit, DeleteJob, MemoryStore, Operation, PutJob
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


# --- the job's actor boundary: a bug in one job ends that job, never the supervisor ------------

BOOM = "boom"  # the prompt of the job a test breaks


def _job_id(operation: Operation) -> str:
    return operation.record.job_id if isinstance(operation, PutJob) else operation.job_id


class BuggyStore(MemoryStore):
    """A memory store whose ``write`` raises ``RuntimeError`` (a bug, not ``StoreUnavailable``)
    for the writes of ``boom`` jobs that ``breaks`` picks; every other write works.
    ``unavailable`` fails those writes as a full disk does instead."""

    def __init__(
        self,
        breaks: Callable[[Sequence[Operation]], bool],
        *,
        resumable: bool = False,
        unavailable: bool = False,
    ) -> None:
        super().__init__(resumable=resumable)
        self._breaks = breaks
        self._unavailable = unavailable
        self._boom_ids: set[str] = set()
        self.raised = 0

    def write(self, *operations: Operation) -> Commit:
        for operation in operations:
            if isinstance(operation, PutJob) and operation.record.prompt == BOOM:
                self._boom_ids.add(operation.record.job_id)
        boom = any(_job_id(operation) in self._boom_ids for operation in operations)
        if boom and self._breaks(operations):
            self.raised += 1
            if self._unavailable:
                return Commit.settled_with(StoreUnavailable("disk full"))
            raise RuntimeError("store bug")
        return super().write(*operations)


def _first_write(operations: Sequence[Operation]) -> bool:
    return any(
        isinstance(op, PutJob) and op.record.status is JobStatus.PENDING for op in operations
    )


def _deletion(operations: Sequence[Operation]) -> bool:
    return any(isinstance(op, DeleteJob) for op in operations)


def _appends(kind: type[JobEvent]) -> Callable[[Sequence[Operation]], bool]:
    def breaks(operations: Sequence[Operation]) -> bool:
        return any(isinstance(op, AppendEvent) and isinstance(op.event, kind) for op in operations)

    return breaks


async def submit(supervisor: Supervisor, prompt: str, n: int = 2) -> str:
    snapshot, _ = await supervisor.submit(owner="alice", prompt=prompt, num_images=n)
    return snapshot.job_id


async def ended(job: JobActor) -> list[JobEvent]:
    with trio.fail_after(60):
        events = await read_all(job.log)
    assert job.log.closed
    assert isinstance(events[-1], DoneEvent)
    assert events[-1].status is job.status
    assert job.status.finished
    return events


async def assert_the_rest_lives_on(
    supervisor: Supervisor, sibling_id: str, caplog: pytest.LogCaptureFixture, boom_id: str
) -> None:
    """The sibling job completes, a new job is admitted and completes, the crash was counted
    once and logged with its traceback."""
    sibling = job_of(supervisor, sibling_id)
    with trio.fail_after(60):
        await sibling.wait_finished()
    assert sibling.status is JobStatus.COMPLETED
    assert {image.status for image in sibling.snapshot().images} == {ImageStatus.COMPLETED}
    later = job_of(supervisor, await submit(supervisor, "later", n=1))
    with trio.fail_after(60):
        await later.wait_finished()
    assert later.status is JobStatus.COMPLETED
    assert supervisor.statistics().jobs_crashed_total == 1
    crashes = [
        record
        for record in caplog.records
        if record.levelno == logging.ERROR and boom_id in record.getMessage()
    ]
    assert crashes
    assert all(record.exc_info for record in crashes)


async def test_a_store_bug_on_the_first_write_refuses_only_that_job(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Its deletion (a refused job is forgotten) fails the same way.
    store = BuggyStore(lambda ops: _first_write(ops) or _deletion(ops))
    supervisor = await start_supervisor(nursery, FakeProvider(), store=store)
    sibling_id = await submit(supervisor, "a red fox")

    with pytest.raises(StoreUnavailable, match="failed to take the job"):
        await submit(supervisor, BOOM)
    await trio.sleep(1)  # the refused job is forgotten; its deletion is tried again meanwhile

    (boom_id,) = store._boom_ids
    listed, _ = supervisor.list_jobs(owner="alice", limit=10)
    assert boom_id not in {job.job_id for job in listed}
    assert store.raised >= 3  # the first write, the deletion, and the deletion again
    await assert_the_rest_lives_on(supervisor, sibling_id, caplog, boom_id)


async def test_a_fold_that_raises_fails_only_its_job_and_stops_its_remote_work(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fold = JobActor._fold

    def buggy_fold(self: JobActor, report: WorkerReport) -> None:
        if self.prompt == BOOM:
            raise RuntimeError("fold bug")
        fold(self, report)

    monkeypatch.setattr(JobActor, "_fold", buggy_fold)
    provider = FakeProvider(by_prompt={BOOM: Script(latency_s=10)})
    # Resumable: the remote work of a job stopped by the process would be kept; a crash's is not.
    store = MemoryStore(resumable=True)
    supervisor = await start_supervisor(nursery, provider, store=store)
    sibling_id = await submit(supervisor, "a red fox")
    boom_id = await submit(supervisor, BOOM)

    job = job_of(supervisor, boom_id)
    events = await ended(job)

    assert job.status is JobStatus.FAILED
    assert [(image.status, image.error) for image in job.snapshot().images] == [
        (ImageStatus.FAILED, "internal error")
    ] * 2
    assert [event.id for event in events] == [1, 2, 3]
    assert sorted(provider.remote_cancels) == [(boom_id, 0), (boom_id, 1)]
    (stored,) = [record for record in await store.load() if record.job.job_id == boom_id]
    assert stored.job.status is JobStatus.FAILED
    await assert_the_rest_lives_on(supervisor, sibling_id, caplog, boom_id)


async def test_a_store_bug_mid_job_fails_its_unfinished_images_and_publishes_done(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every write that carries an image's outcome fails, the job's last one included.
    store = BuggyStore(_appends(ProgressEvent))
    provider = FakeProvider({0: Script(latency_s=1)}, default=Script(latency_s=10))
    supervisor = await start_supervisor(nursery, provider, store=store)
    sibling_id = await submit(supervisor, "a red fox")
    boom_id = await submit(supervisor, BOOM)

    job = job_of(supervisor, boom_id)
    events = await ended(job)

    assert trio.current_time() == 1
    assert [(image.status, image.error) for image in job.snapshot().images] == [
        (ImageStatus.COMPLETED, None),
        (ImageStatus.FAILED, "internal error"),
    ]
    assert events[-1] == DoneEvent(
        id=3,
        status=JobStatus.COMPLETED,
        total_ms=1000,
        ttfi_ms=1000,
        completed_count=1,
        failed_count=1,
    )
    assert provider.remote_cancels == [(boom_id, 1)]
    await assert_the_rest_lives_on(supervisor, sibling_id, caplog, boom_id)


async def test_a_store_bug_on_the_last_write_still_publishes_done(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = BuggyStore(_appends(DoneEvent))
    supervisor = await start_supervisor(nursery, FakeProvider(), store=store)
    sibling_id = await submit(supervisor, "a red fox")
    boom_id = await submit(supervisor, BOOM)

    job = job_of(supervisor, boom_id)
    events = await ended(job)

    assert [type(event) for event in events] == [ProgressEvent, ProgressEvent, DoneEvent]
    assert job.status is JobStatus.COMPLETED  # both images were made and stored
    assert store.raised == 2  # the tail's write, and the last one queued as the job ends
    await assert_the_rest_lives_on(supervisor, sibling_id, caplog, boom_id)


async def test_a_bug_ending_the_job_still_publishes_done(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conclude = JobActor._conclude

    def buggy_conclude(self: JobActor) -> None:
        if self.prompt == BOOM:
            raise RuntimeError("conclude bug")
        conclude(self)

    monkeypatch.setattr(JobActor, "_conclude", buggy_conclude)
    provider = FakeProvider(by_prompt={BOOM: Script(latency_s=10)})
    store = MemoryStore()
    supervisor = await start_supervisor(nursery, provider, store=store)
    sibling_id = await submit(supervisor, "a red fox")
    boom_id = await submit(supervisor, BOOM)
    await trio.sleep(2)

    supervisor.cancel(boom_id, owner="alice")  # the job's end is what fails
    job = job_of(supervisor, boom_id)
    events = await ended(job)

    assert [(image.status, image.error) for image in job.snapshot().images] == [
        (ImageStatus.FAILED, "internal error")
    ] * 2
    finished_at = FIXED_NOW + timedelta(seconds=2)  # from the job's own clocks
    assert [event.finished_at for event in events if isinstance(event, ProgressEvent)] == [
        finished_at
    ] * 2
    assert events[-1] == DoneEvent(
        id=3,
        status=JobStatus.FAILED,
        total_ms=2000,
        ttfi_ms=None,
        completed_count=0,
        failed_count=2,
    )
    (stored,) = [record for record in await store.load() if record.job.job_id == boom_id]
    assert stored.events == tuple(events)
    await assert_the_rest_lives_on(supervisor, sibling_id, caplog, boom_id)


async def test_cancelled_from_outside_while_storing_its_end_still_publishes_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Not resumable: stopping the process ends its jobs, and their followers are told so.
    store = BuggyStore(_appends(DoneEvent), unavailable=True)
    async with trio.open_nursery() as nursery:
        supervisor = await start_supervisor(nursery, FakeProvider(), store=store)
        job = job_of(supervisor, await submit(supervisor, BOOM, n=1))
        await trio.sleep(5)  # the job's last write waits for the store...
        waiting = [type(event) for event in job.log.events_after(0)]
        nursery.cancel_scope.cancel()  # ...when the process stops

    events = job.log.events_after(0)
    assert waiting == [ProgressEvent]
    assert job.log.closed
    assert [type(event) for event in events] == [ProgressEvent, DoneEvent]
    assert job.status is JobStatus.COMPLETED
