"""Restarts, a failing store and draining: the supervisor and its jobs on a ``JobStore``.

Most tests run on virtual time with ``MemoryStore(resumable=True)``: leaving ``open_supervisor``
is the process stopping, and a second ``open_supervisor`` on the same store object is the next
start. The wall clock follows virtual time, so downtime between the two counts as it would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trio.testing

from actors.errors import JobNotFound, ShuttingDown, StoreUnavailable
from actors.files import ImageFiles, ImageFilesSettings
from actors.job import STORE_RETRY_S
from actors.messages import (
    DoneEvent,
    ImageSnapshot,
    ImageStatus,
    JobEvent,
    JobStatus,
    ProgressEvent,
    Transport,
)
from actors.settings import SupervisorSettings
from actors.store import (
    JobRecord,
    JobStore,
    MemoryStore,
    PutImages,
    PutJob,
    RemoteWork,
    SetRemote,
    commit,
    open_sqlite_store,
)
from actors.supervisor import Batch, Supervisor, open_supervisor
from tests.fakes import FIXED_NOW, FakeProvider, Script, read_all, upper_jitter


def wall_clock() -> datetime:
    """A wall clock that moves with (virtual) time, so ages survive a restart."""
    return FIXED_NOW + timedelta(seconds=trio.current_time())


@asynccontextmanager
async def running(
    store: JobStore, provider: FakeProvider, settings: SupervisorSettings | None = None
) -> AsyncIterator[Supervisor]:
    """One run of the service: leaving the block is the process stopping."""
    async with open_supervisor(
        provider,
        settings or SupervisorSettings(),
        now=wall_clock,
        uniform=upper_jitter,
        store=store,
    ) as supervisor:
        yield supervisor


async def submit(
    supervisor: Supervisor,
    prompt: str = "a red fox",
    n: int = 1,
    key: str | None = None,
    owner: str = "alice",
) -> str:
    snapshot, created = await supervisor.submit(
        owner=owner, prompt=prompt, num_images=n, idempotency_key=key
    )
    assert created
    return snapshot.job_id


@attrs.frozen(kw_only=True)
class FirstRun:
    t0: float
    earlier_id: str  # a 1-image job that finished before the stop
    job_id: str  # a 4-image job stopped with images 0 and 1 done, 2 and 3 in flight
    events: tuple[JobEvent, ...]
    provider: FakeProvider


async def stop_mid_job(store: JobStore) -> FirstRun:
    """Run until images 0 and 1 of a 4-image job are done, then stop (3 s after the submit)."""
    provider = FakeProvider(
        {0: Script(latency_s=1), 1: Script(latency_s=2)},
        default=Script(latency_s=10),
        by_prompt={"earlier": Script(latency_s=0.5)},
    )
    t0 = trio.current_time()
    async with running(store, provider) as supervisor:
        earlier_id = await submit(supervisor, prompt="earlier")
        job_id = await submit(supervisor, n=4, key="key-1")
        await trio.sleep(3)
        events = supervisor.get(job_id, owner="alice").log.events_after(0)
    return FirstRun(t0=t0, earlier_id=earlier_id, job_id=job_id, events=events, provider=provider)


# --- a restart in the middle of a job ----------------------------------------------------------


async def test_stopping_leaves_the_job_unfinished_in_the_store_and_its_remote_work_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(resumable=True)

    first = await stop_mid_job(store)

    stored = {job.job.job_id: job for job in await store.load()}[first.job_id]
    assert stored.job.status is JobStatus.RUNNING
    assert (stored.job.finished_at, stored.job.ttfi_ms) == (None, 1000)
    assert stored.events == first.events
    assert [(e.id, type(e), getattr(e, "index", None)) for e in stored.events] == [
        (1, ProgressEvent, 0),
        (2, ProgressEvent, 1),
    ]
    assert [(image.status, image.attempts) for image in stored.images] == [
        (ImageStatus.COMPLETED, 1),
        (ImageStatus.COMPLETED, 1),
        (ImageStatus.RUNNING, 1),
        (ImageStatus.RUNNING, 1),
    ]
    assert first.provider.remote_cancels == []
    assert first.provider.cancelled == 2  # only this process's calls stopped


async def test_a_new_job_is_stored_with_the_images_that_can_start_at_once_pending(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(resumable=True)
    provider = FakeProvider(default=Script(latency_s=10))
    settings = SupervisorSettings(capacity=3)
    async with running(store, provider, settings) as supervisor:
        await submit(supervisor, prompt="earlier")
        await trio.sleep(0.5)  # its image holds 1 of the 3 slots
        before = datetime.now(UTC)
        job_id = await submit(supervisor, n=4)
        after = datetime.now(UTC)
        stored = {job.job.job_id: job for job in await store.load()}[job_id]
        await trio.sleep(1)
        requests = [request for request in provider.calls if request.job_id == job_id]

    # Stored before the job was accepted: a create may be in flight for images 0 and 1 (the 2
    # free slots) from then on, on the wall clock; images 2 and 3 will note their own.
    assert [(w.index, w.remote_id) for w in stored.remote] == [(0, None), (1, None)]
    since = stored.remote[0].pending_since
    assert since is not None
    assert before <= since <= after
    assert stored.remote[1].pending_since == since
    assert sorted((r.index, r.pending_since) for r in requests) == [(0, since), (1, since)]


async def test_only_an_images_first_call_may_go_on_the_admissions_note(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(default=Script(latency_s=1, not_started=1, fail_times=1))
    async with running(MemoryStore(resumable=True), provider) as supervisor:
        job_id = await submit(supervisor)
        await supervisor.get(job_id, owner="alice").wait_finished()

    # A 429, a transient failure, then the image: after the first call, the provider's own
    # notes (or its having forgotten the image) say what stands.
    assert [request.pending_since is None for request in provider.calls] == [False, True, True]


async def test_the_next_start_restores_the_job_with_its_events_and_ids(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(resumable=True)
    first = await stop_mid_job(store)

    async with running(store, FakeProvider(default=Script(block=trio.Event()))) as supervisor:
        job = supervisor.get(first.job_id, owner="alice")

        assert job.log.events_after(0) == first.events
        assert not job.log.closed
        snapshot = job.snapshot()
        assert (snapshot.status, snapshot.ttfi_ms, snapshot.num_images) == (
            JobStatus.RUNNING,
            1000,
            4,
        )


async def test_the_next_start_generates_only_the_unfinished_images_numbering_attempts_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(resumable=True)
    first = await stop_mid_job(store)
    second = FakeProvider(default=Script(latency_s=1))

    async with running(store, second) as supervisor:
        job = supervisor.get(first.job_id, owner="alice")
        with trio.fail_after(60):
            await job.wait_finished()

    assert sorted((call.job_id, call.index, call.attempt) for call in second.calls) == [
        (first.job_id, 2, 2),
        (first.job_id, 3, 2),
    ]
    # Their remote work is the journal's to say, not the (earlier) admission's.
    assert [call.pending_since for call in second.calls] == [None, None]
    assert [image.attempts for image in job.snapshot().images] == [1, 1, 2, 2]
    assert second.remote_cancels == []


async def test_the_carried_on_job_completes_with_the_next_ids_and_the_first_runs_ttfi(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(resumable=True)
    first = await stop_mid_job(store)
    await trio.sleep(5)  # down from t0 + 3 to t0 + 8

    async with running(store, FakeProvider(default=Script(latency_s=1))) as supervisor:
        job = supervisor.get(first.job_id, owner="alice")
        with trio.fail_after(60):
            events = await read_all(job.log)

    assert trio.current_time() - first.t0 == 9
    assert tuple(events[:2]) == first.events
    carried = events[2:4]
    assert all(isinstance(event, ProgressEvent) for event in carried)
    assert sorted(
        (e.id, e.attempts, e.status) for e in carried if isinstance(e, ProgressEvent)
    ) == [
        (3, 2, ImageStatus.COMPLETED),
        (4, 2, ImageStatus.COMPLETED),
    ]
    # total_ms counts from the submit (the downtime included), ttfi is the first run's.
    assert events[4:] == [
        DoneEvent(
            id=5,
            status=JobStatus.COMPLETED,
            total_ms=9000,
            ttfi_ms=1000,
            completed_count=4,
            failed_count=0,
        )
    ]
    (stored,) = [s for s in await store.load() if s.job.job_id == first.job_id]
    assert stored.events == tuple(events)
    assert (stored.job.status, stored.job.total_ms, stored.job.ttfi_ms) == (
        JobStatus.COMPLETED,
        9000,
        1000,
    )


async def test_idempotency_keys_and_list_order_survive_a_restart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(resumable=True)
    first = await stop_mid_job(store)

    async with running(store, FakeProvider(default=Script(block=trio.Event()))) as supervisor:
        again, created = await supervisor.submit(
            owner="alice", prompt="a red fox", num_images=4, idempotency_key="key-1"
        )
        page, _ = supervisor.list_jobs(owner="alice", limit=10)

    assert (again.job_id, created) == (first.job_id, False)
    assert [snapshot.job_id for snapshot in page] == [first.job_id, first.earlier_id]


async def test_a_new_job_after_a_restart_is_numbered_after_the_restored_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(resumable=True)
    first = await stop_mid_job(store)

    async with running(store, FakeProvider(default=Script(block=trio.Event()))) as supervisor:
        new_id = await submit(supervisor, prompt="a new one")
        seqs = [
            supervisor.get(job_id, owner="alice").seq
            for job_id in (first.earlier_id, first.job_id, new_id)
        ]
        page, cursor = supervisor.list_jobs(owner="alice", limit=1)

    assert seqs == [1, 2, 3]
    assert ([snapshot.job_id for snapshot in page], cursor) == ([new_id], 3)


# --- finished jobs across a restart ------------------------------------------------------------


async def test_a_finished_job_is_restored_read_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(resumable=True)
    async with running(store, FakeProvider({1: Script(permanent="nope")})) as supervisor:
        job_id = await submit(supervisor, n=2)
        job = supervisor.get(job_id, owner="alice")
        with trio.fail_after(60):
            await job.wait_finished()
        before = (job.snapshot(), job.log.events_after(0))

    second = FakeProvider()
    async with running(store, second) as supervisor:
        restored = supervisor.get(job_id, owner="alice")
        with trio.fail_after(1):
            await restored.wait_finished()
        restored.cancel()
        await trio.testing.wait_all_tasks_blocked()

        assert (restored.snapshot(), restored.log.events_after(0)) == before
        assert restored.log.closed
        assert restored.status is JobStatus.COMPLETED
        assert supervisor.statistics().images_queued == 0
    assert second.calls == []


async def test_retention_runs_from_the_finish_across_a_restart_and_deletes_from_the_store(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(resumable=True)
    settings = SupervisorSettings(job_retention_s=60)
    t0 = trio.current_time()
    async with running(store, FakeProvider(), settings) as supervisor:
        job_id = await submit(supervisor, key="key-1")
        with trio.fail_after(60):
            await supervisor.get(job_id, owner="alice").wait_finished()  # at t0 + 1
    await trio.sleep_until(t0 + 30)  # down for 29 s

    async with running(store, FakeProvider(), settings) as supervisor:
        await trio.sleep_until(t0 + 60.9)
        supervisor.get(job_id, owner="alice")
        assert [stored.job.job_id for stored in await store.load()] == [job_id]

        await trio.sleep_until(t0 + 61)
        with pytest.raises(JobNotFound):
            supervisor.get(job_id, owner="alice")
        assert await store.load() == ()
        _, created = await supervisor.submit(
            owner="alice", prompt="a red fox", num_images=1, idempotency_key="key-1"
        )
        assert created


async def test_a_job_whose_retention_ran_out_while_stopped_is_deleted_at_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(resumable=True)
    settings = SupervisorSettings(job_retention_s=60)
    async with running(store, FakeProvider(), settings) as supervisor:
        job_id = await submit(supervisor)
        with trio.fail_after(60):
            await supervisor.get(job_id, owner="alice").wait_finished()
    await trio.sleep(60)

    async with running(store, FakeProvider(), settings) as supervisor:
        with pytest.raises(JobNotFound):
            supervisor.get(job_id, owner="alice")
        assert await store.load() == ()


# --- the provider's remote work ----------------------------------------------------------------


class ResumingProvider(FakeProvider):
    """A FakeProvider that is given journaled remote work on start (and records it)."""

    def __init__(self) -> None:
        super().__init__(default=Script(block=trio.Event()))
        self.resumed: list[RemoteWork] = []
        self.finished: list[str] = []
        self.calls_when_resumed: int | None = None

    def resume_remote_work(self, work: Sequence[RemoteWork], finished: Sequence[str]) -> None:
        self.resumed.extend(work)
        self.finished.extend(finished)
        self.calls_when_resumed = len(self.calls)


def stored_job(job_id: str, seq: int, status: JobStatus, num_images: int) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        seq=seq,
        owner="alice",
        prompt=f"prompt of {job_id}",
        num_images=num_images,
        idempotency_key=None,
        status=status,
        created_at=FIXED_NOW,
        finished_at=FIXED_NOW if status.finished else None,
        total_ms=0 if status.finished else None,
    )


def stored_image(job_id: str, index: int, status: ImageStatus) -> ImageSnapshot:
    return ImageSnapshot(
        id=f"{job_id}-{index}",
        index=index,
        status=status,
        url=None if status is ImageStatus.RUNNING else f"https://img.test/{job_id}/{index}.png",
        error=None,
        attempts=1,
        started_at=FIXED_NOW,
        finished_at=None if status is ImageStatus.RUNNING else FIXED_NOW,
        wait_ms=0,
        provider_ms=0,
    )


async def test_the_remote_work_of_images_still_to_make_is_resumed_before_any_image(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(resumable=True)
    pending_since = FIXED_NOW - timedelta(seconds=3)
    statuses = (ImageStatus.COMPLETED, ImageStatus.RUNNING, ImageStatus.RUNNING)
    await commit(
        store,
        PutJob(stored_job("old", 1, JobStatus.COMPLETED, 1)),
        PutImages("old", (stored_image("old", 0, ImageStatus.COMPLETED),)),
        SetRemote("old", 0, "pred-old-0", None),
        PutJob(stored_job("open", 2, JobStatus.RUNNING, 3)),
        PutImages(
            "open",
            tuple(stored_image("open", i, s) for i, s in enumerate(statuses)),
        ),
        SetRemote("open", 0, "pred-open-0", None),
        SetRemote("open", 1, "pred-open-1", None),
        SetRemote("open", 2, None, pending_since),
    )
    provider = ResumingProvider()

    async with running(store, provider):
        await trio.testing.wait_all_tasks_blocked()

    assert provider.resumed == [
        RemoteWork(
            job_id="open",
            index=1,
            prompt="prompt of open",
            remote_id="pred-open-1",
            pending_since=None,
        ),
        RemoteWork(
            job_id="open",
            index=2,
            prompt="prompt of open",
            remote_id=None,
            pending_since=pending_since,
        ),
    ]
    assert sorted(provider.finished) == ["pred-old-0", "pred-open-0"]
    assert provider.calls_when_resumed == 0
    assert sorted((call.job_id, call.index, call.attempt) for call in provider.calls) == [
        ("open", 1, 2),
        ("open", 2, 2),
    ]


# --- a store that does not outlive the process -------------------------------------------------


async def test_without_a_resumable_store_stopping_cancels_the_job_and_its_remote_work(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    provider = FakeProvider({0: Script(latency_s=1)}, default=Script(latency_s=10))
    async with running(store, provider) as supervisor:
        job_id = await submit(supervisor, n=3)
        job = supervisor.get(job_id, owner="alice")
        await trio.sleep(2)

    events = job.log.events_after(0)
    assert events[-1] == DoneEvent(
        id=4,
        status=JobStatus.CANCELED,
        total_ms=2000,
        ttfi_ms=1000,
        completed_count=1,
        failed_count=0,
    )
    assert job.log.closed
    assert sorted(provider.remote_cancels) == [(job_id, 1), (job_id, 2)]
    (stored,) = await store.load()
    assert (stored.job.status, stored.events) == (JobStatus.CANCELED, events)


# --- a store that fails ------------------------------------------------------------------------


async def test_submit_to_a_broken_store_raises_and_leaves_nothing_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(resumable=True)
    provider = FakeProvider()
    settings = SupervisorSettings(max_active_jobs_per_user=1, max_queued_images=2)
    async with running(store, provider, settings) as supervisor:
        store.broken = "disk full"
        with pytest.raises(StoreUnavailable, match="disk full"):
            await supervisor.submit(
                owner="alice", prompt="a red fox", num_images=2, idempotency_key="key-1"
            )
        await trio.testing.wait_all_tasks_blocked()

        assert supervisor.list_jobs(owner="alice", limit=10) == ((), None)
        stats = supervisor.statistics()
        assert (stats.jobs_retained, stats.images_queued, stats.attempts_total) == (0, 0, 0)
        assert provider.calls == []

        store.broken = None
        # Neither the key nor the per-user and queued-image caps remember the refused job.
        snapshot, created = await supervisor.submit(
            owner="alice", prompt="a red fox", num_images=2, idempotency_key="key-1"
        )
        assert created
        with trio.fail_after(60):
            await supervisor.get(snapshot.job_id, owner="alice").wait_finished()
    assert [stored.job.job_id for stored in await store.load()] == [snapshot.job_id]


async def test_a_job_the_store_refused_is_not_found(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(resumable=True)
    async with running(store, FakeProvider()) as supervisor:
        store.broken = "disk full"
        snapshot, _ = supervisor.submit_nowait(owner="alice", prompt="a red fox", num_images=1)

        # Never visible: not while its first write is pending, nor once it was refused.
        with pytest.raises(JobNotFound):
            supervisor.get(snapshot.job_id, owner="alice")
        assert supervisor.list_jobs(owner="alice", limit=10) == ((), None)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(JobNotFound):
            supervisor.get(snapshot.job_id, owner="alice")


async def test_events_wait_while_the_store_fails_and_appear_once_it_works(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(resumable=True)
    provider = FakeProvider({0: Script(latency_s=1), 1: Script(latency_s=4)})
    async with running(store, provider) as supervisor:
        t0 = trio.current_time()
        job_id = await submit(supervisor, n=2)
        job = supervisor.get(job_id, owner="alice")
        await trio.sleep(0.5)
        store.broken = "disk full"

        await trio.sleep(1.5)  # image 0 finished at t0 + 1, unstored
        assert job.log.events_after(0) == ()
        assert [image.status for image in job.snapshot().images] == [ImageStatus.RUNNING] * 2
        assert job.snapshot().ttfi_ms is None

        store.broken = None
        with trio.fail_after(10):
            (event,) = await job.log.wait_events_after(0)
        # The job tries again 0.1 s after the failure, then doubling: at 1.1, 1.3, 1.7, 2.5.
        retry_at = 1 + sum(STORE_RETRY_S[0] * 2**n for n in range(4))
        assert trio.current_time() - t0 == pytest.approx(retry_at)
        assert isinstance(event, ProgressEvent)
        assert (event.id, event.index, event.status) == (1, 0, ImageStatus.COMPLETED)
        assert job.snapshot().images[0].status is ImageStatus.COMPLETED
        assert job.snapshot().ttfi_ms == 1000

        with trio.fail_after(60):
            rest = await read_all(job.log, cursor=1)
    assert [(type(e), e.id) for e in rest] == [(ProgressEvent, 2), (DoneEvent, 3)]
    assert job.status is JobStatus.COMPLETED
    (stored,) = await store.load()
    assert stored.events == (event, *rest)


# --- draining ----------------------------------------------------------------------------------


async def follow(supervisor: Supervisor, job_id: str, batches: list[Batch]) -> None:
    """Subscribe as a stream does and keep every batch until the log ends or service stops."""
    with supervisor.subscribe(job_id, owner="alice", transport=Transport.SSE) as subscription:
        cursor = 0
        while True:
            batch = await subscription.wait_events_after(cursor, timeout_s=15)
            batches.append(batch)
            if batch.events:
                cursor = batch.events[-1].id
            elif batch.ended or batch.stopping:
                return


async def test_drain_returns_as_soon_as_the_last_job_finishes_within_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider({0: Script(latency_s=1)}, default=Script(latency_s=3))
    async with running(MemoryStore(resumable=True), provider) as supervisor:
        job_id = await submit(supervisor, n=2)
        t0 = trio.current_time()

        await supervisor.drain(10)

        assert trio.current_time() - t0 == 3
        assert supervisor.get(job_id, owner="alice").status is JobStatus.COMPLETED
        assert supervisor.shutting_down.is_set()


async def test_a_subscriber_gets_done_of_a_job_that_ends_while_draining(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider({0: Script(latency_s=1)}, default=Script(latency_s=100))
    batches: list[Batch] = []
    async with running(MemoryStore(resumable=True), provider) as supervisor:
        job_id = await submit(supervisor, n=2)

        async def cancel_later() -> None:
            await trio.sleep(2)  # the subscriber has had event 1 and waits for more
            supervisor.cancel(job_id, owner="alice")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow, supervisor, job_id, batches)
            nursery.start_soon(cancel_later)
            await supervisor.drain(10)

    events = [event for batch in batches for event in batch.events]
    assert [event.id for event in events] == [1, 2, 3]
    assert isinstance(events[-1], DoneEvent)


async def test_drain_refuses_new_jobs_while_it_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(default=Script(latency_s=3))
    async with running(MemoryStore(resumable=True), provider) as supervisor:
        await submit(supervisor)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.drain, 10)
            await trio.testing.wait_all_tasks_blocked()

            assert supervisor.draining.is_set()
            assert not supervisor.shutting_down.is_set()
            with pytest.raises(ShuttingDown):
                await submit(supervisor)


async def test_drain_gives_a_longer_job_exactly_the_grace_then_shuts_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(resumable=True)
    provider = FakeProvider(default=Script(latency_s=100))
    async with running(store, provider) as supervisor:
        job_id = await submit(supervisor)
        t0 = trio.current_time()

        await supervisor.drain(7.5)

        assert trio.current_time() - t0 == 7.5
        assert supervisor.shutting_down.is_set()
        assert supervisor.get(job_id, owner="alice").status is JobStatus.RUNNING
    (stored,) = await store.load()
    assert stored.job.status is JobStatus.RUNNING  # left for the next start
    assert provider.remote_cancels == []


async def test_begin_shutdown_during_drain_ends_the_grace_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(default=Script(latency_s=100))
    async with running(MemoryStore(resumable=True), provider) as supervisor:
        job_id = await submit(supervisor)
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.drain, 10)
            await trio.sleep(2)
            supervisor.begin_shutdown()  # a second signal

        assert trio.current_time() - t0 == 2
        assert supervisor.get(job_id, owner="alice").status is JobStatus.RUNNING


async def test_begin_shutdown_before_drain_leaves_no_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Both signals handled before the task that drains runs: the second one still counts.
    provider = FakeProvider(default=Script(latency_s=100))
    async with running(MemoryStore(resumable=True), provider) as supervisor:
        job_id = await submit(supervisor)
        await trio.sleep(1)
        supervisor.stop_admitting()
        supervisor.begin_shutdown()
        t0 = trio.current_time()

        await supervisor.drain(10)

        assert trio.current_time() - t0 == 0
        assert supervisor.shutting_down.is_set()
        assert supervisor.get(job_id, owner="alice").status is JobStatus.RUNNING


# --- SQLite, on the real clock (its threads and virtual time do not mix) -----------------------


async def test_a_job_stopped_mid_run_on_sqlite_completes_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    first = FakeProvider({0: Script(latency_s=0.01)}, default=Script(latency_s=60))
    async with open_sqlite_store(path) as store, running(store, first) as supervisor:
        earlier_id = await submit(supervisor, prompt="earlier")
        job_id = await submit(supervisor, n=2, key="key-1")
        job = supervisor.get(job_id, owner="alice")
        with trio.fail_after(5):
            await job.log.wait_events_after(0)

    second = FakeProvider(default=Script(latency_s=0.01))
    async with open_sqlite_store(path) as store, running(store, second) as supervisor:
        job = supervisor.get(job_id, owner="alice")
        with trio.fail_after(5):
            events = await read_all(job.log)
        new_id = await submit(supervisor, prompt="a new one")
        page, _ = supervisor.list_jobs(owner="alice", limit=10)

    assert [event.id for event in events] == [1, 2, 3]
    assert job.status is JobStatus.COMPLETED
    assert [(call.index, call.attempt) for call in second.calls if call.job_id == job_id] == [
        (1, 2)
    ]
    assert first.remote_cancels == []
    assert [snapshot.job_id for snapshot in page] == [new_id, job_id, earlier_id]


# --- the image directory's budget ----------------------------------------------------------------


async def test_the_image_budget_evicts_old_finished_jobs_never_for_running_ones(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    local = "/files/{job_id}-{index}.png"  # served by the service: nothing to download
    provider = FakeProvider(
        default=Script(url=local), by_prompt={"slow": Script(latency_s=100, url=local)}
    )
    async with httpx.AsyncClient() as client:
        files = ImageFiles(ImageFilesSettings(directory=tmp_path, max_total_bytes=1000), client)
        async with open_supervisor(
            provider,
            SupervisorSettings(),
            store=MemoryStore(),
            now=wall_clock,
            uniform=upper_jitter,
            files=files,
        ) as supervisor:
            first = await submit(supervisor, n=1)
            await trio.sleep(2)
            files.added(first, f"{first}-0.png", 600)
            running = await submit(supervisor, n=1, prompt="slow")
            files.added(running, f"{running}-0.png", 600)  # 1,200 bytes, 600 of them running

            assert supervisor.get(first, owner="alice").status is JobStatus.COMPLETED

            third = await submit(supervisor, n=1)
            await trio.sleep(2)
            files.added(third, f"{third}-0.png", 600)  # finished jobs alone: 1,200 bytes
            supervisor.statistics()  # retention runs on reads too

            with pytest.raises(JobNotFound):  # the oldest finished job made room
                supervisor.get(first, owner="alice")
            assert supervisor.get(third, owner="alice").status is JobStatus.COMPLETED
            assert supervisor.get(running, owner="alice").status is JobStatus.RUNNING
            assert files.total_bytes == 1200


async def test_a_deletion_the_store_failed_is_written_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(resumable=True)
    async with running(store, FakeProvider(), SupervisorSettings(job_retention_s=60)) as supervisor:
        job_id = await submit(supervisor)
        await trio.sleep(2)  # finished
        store.broken = "disk full"
        await trio.sleep(60)
        supervisor.statistics()  # retention forgets the job; its deletion fails
        with pytest.raises(JobNotFound):
            supervisor.get(job_id, owner="alice")
        assert held_job_ids(store) == [job_id]

        store.broken = None
        await trio.sleep(STORE_RETRY_S[1])

        assert await store.load() == ()


def held_job_ids(store: MemoryStore) -> list[str]:
    """The ids of the jobs the store holds, read while it is broken (``load`` refuses then)."""
    return list(store._jobs)
