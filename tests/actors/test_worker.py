"""run_image_worker: attempts, timeouts, retries with exact backoff, and what it reports."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trio.testing

from actors.capacity import FairCapacity
from actors.files import ImageFiles, ImageFilesSettings, KeptImage
from actors.job import JobActor
from actors.messages import (
    AttemptStarted,
    ImageOutcome,
    ImageStatus,
    JobStatus,
    ProgressEvent,
    WorkerReport,
)
from actors.providers.base import ImageRequest
from actors.retry import RetryPolicy
from actors.settings import SupervisorSettings
from actors.store import MemoryStore
from actors.supervisor import open_supervisor
from actors.worker import WorkerContext, run_image_worker
from tests.fakes import FIXED_NOW, FakeProvider, Script, fixed_now, start_supervisor, upper_jitter

JOB_ID = "job-1"


def make_context(
    provider: FakeProvider,
    *,
    attempts: int = 3,
    base_delay_s: float = 1.0,
    attempt_timeout_s: float = 60.0,
    capacity: FairCapacity | None = None,
) -> WorkerContext:
    return WorkerContext(
        job_id=JOB_ID,
        prompt="a lighthouse at dusk",
        provider=provider,
        capacity=capacity or FairCapacity(trio.CapacityLimiter(1)),
        retry=RetryPolicy(attempts=attempts, base_delay_s=base_delay_s, max_delay_s=8.0),
        attempt_timeout_s=attempt_timeout_s,
        provider_cancel_s=5.0,
        now=fixed_now(),
        uniform=upper_jitter,
    )


async def run_worker(context: WorkerContext, index: int = 0) -> list[WorkerReport]:
    """Run one worker to the end and return everything it reported, in order."""
    reports_send, reports_recv = trio.open_memory_channel[WorkerReport](0)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(run_image_worker, index, context=context, reports_send=reports_send)
            )
            with reports_recv:  # the loop ends when the worker closes its channel
                reports = [report async for report in reports_recv]
    return reports


def outcome_of(reports: list[WorkerReport]) -> ImageOutcome:
    *attempts, outcome = reports
    assert all(isinstance(report, AttemptStarted) for report in attempts)
    assert isinstance(outcome, ImageOutcome)
    return outcome


async def test_success_reports_one_attempt_then_the_outcome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(default=Script(latency_s=1.5))

    reports = await run_worker(make_context(provider), index=2)

    assert reports == [
        AttemptStarted(index=2, attempt=1, at=FIXED_NOW, waited_s=0.0),
        ImageOutcome(
            index=2,
            status=ImageStatus.COMPLETED,
            url=f"https://img.test/{JOB_ID}/2.png",
            error=None,
            attempts=1,
            finished_at=FIXED_NOW,
            provider_s=1.5,
        ),
    ]


async def test_transient_failures_are_retried_after_exact_backoffs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(default=Script(latency_s=1, fail_times=2))
    t0 = trio.current_time()

    reports = await run_worker(make_context(provider, base_delay_s=1))

    # 1 s call, 1 s backoff, 1 s call, 2 s backoff, 1 s call.
    assert [at - t0 for at in provider.start_times()] == [0, 2, 5]
    assert trio.current_time() - t0 == 6
    assert [r.attempt for r in reports if isinstance(r, AttemptStarted)] == [1, 2, 3]
    outcome = outcome_of(reports)
    assert (outcome.status, outcome.attempts, outcome.provider_s) == (
        ImageStatus.COMPLETED,
        3,
        3.0,
    )


async def test_retry_after_hint_delays_the_next_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(default=Script(latency_s=1, fail_times=1, retry_after_s=30))
    t0 = trio.current_time()

    outcome = outcome_of(await run_worker(make_context(provider, base_delay_s=1)))

    assert [at - t0 for at in provider.start_times()] == [0, 31]
    assert outcome.status is ImageStatus.COMPLETED


async def test_permanent_error_fails_the_image_with_its_message_and_no_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(default=Script(latency_s=1, permanent="prompt rejected by policy"))
    t0 = trio.current_time()

    outcome = outcome_of(await run_worker(make_context(provider)))

    assert (outcome.status, outcome.error, outcome.attempts, outcome.url) == (
        ImageStatus.FAILED,
        "prompt rejected by policy",
        1,
        None,
    )
    assert len(provider.calls) == 1
    assert trio.current_time() - t0 == 1


async def test_attempt_timeout_is_retried_and_named_in_the_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(default=Script(latency_s=10))
    t0 = trio.current_time()

    outcome = outcome_of(
        await run_worker(make_context(provider, attempts=2, base_delay_s=1, attempt_timeout_s=2))
    )

    # 2 s timeout, 1 s backoff, 2 s timeout.
    assert [at - t0 for at in provider.start_times()] == [0, 3]
    assert trio.current_time() - t0 == 5
    assert outcome.status is ImageStatus.FAILED
    assert outcome.error == "the provider did not answer within 2 s (gave up after 2 attempts)"
    assert outcome.provider_s == 4.0
    assert provider.cancelled == 2


async def test_gives_up_after_the_configured_number_of_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(default=Script(latency_s=1, fail_times=99))

    outcome = outcome_of(await run_worker(make_context(provider, attempts=4, base_delay_s=0)))

    assert outcome.status is ImageStatus.FAILED
    assert outcome.error == "transient failure 4 (gave up after 4 attempts)"
    assert outcome.attempts == 4
    assert [request.attempt for request in provider.calls] == [1, 2, 3, 4]


async def test_unexpected_provider_exception_fails_the_image_as_internal_error(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    provider = FakeProvider(default=Script(latency_s=1, crash=ValueError))

    outcome = outcome_of(await run_worker(make_context(provider)))

    assert (outcome.status, outcome.error, outcome.attempts) == (
        ImageStatus.FAILED,
        "internal error (ValueError)",
        1,
    )
    assert len(provider.calls) == 1
    assert "provider raised" in caplog.text


@pytest.mark.parametrize(
    "script",
    [Script(latency_s=1, permanent="rejected"), Script(latency_s=1, crash=ValueError)],
    ids=["permanent", "internal-error"],
)
async def test_a_failed_last_attempt_counts_in_provider_time(
    autojump_clock: trio.testing.MockClock, script: Script
) -> None:
    # A transient failure's call time is counted (see the timeout test: 4.0 s for two calls),
    # so the call that ended in a permanent or unexpected error must be counted too.
    provider = FakeProvider(default=script)

    outcome = outcome_of(await run_worker(make_context(provider)))

    assert outcome.status is ImageStatus.FAILED
    assert outcome.provider_s == 1.0


# --- failures that started nothing (429, a create that created nothing) -------------------------


@pytest.mark.parametrize(
    ("script", "attempts", "starts"),
    [
        # One attempt only, yet three failures that started nothing (a create that created
        # nothing, say) are retried: 1 s calls, backoffs of 1, 2 and 4 s.
        (Script(latency_s=1, not_started=3), 1, [0, 2, 5, 10]),
        # A 429's Retry-After is waited for, and uses no attempt either.
        (Script(latency_s=1, not_started=1, retry_after_s=30), 1, [0, 31]),
        # Two free retries, then two counted failures, then success on the last of 3 attempts;
        # each budget backs off from its own first retry (1, 2 s free; 1, 2 s counted).
        (Script(latency_s=1, not_started=2, fail_times=2), 3, [0, 2, 5, 7, 10]),
    ],
    ids=["not-created", "429-retry-after", "then-real-failures"],
)
async def test_failures_that_started_nothing_use_no_attempt(
    autojump_clock: trio.testing.MockClock, script: Script, attempts: int, starts: list[int]
) -> None:
    provider = FakeProvider(default=script)
    t0 = trio.current_time()

    reports = await run_worker(make_context(provider, attempts=attempts, base_delay_s=1))

    assert [at - t0 for at in provider.start_times()] == starts
    assert trio.current_time() - t0 == starts[-1] + 1
    outcome = outcome_of(reports)
    assert (outcome.status, outcome.attempts, outcome.provider_s) == (
        ImageStatus.COMPLETED,
        len(starts),
        len(starts) * 1.0,
    )
    assert provider.remote_cancels == []


async def test_a_permanent_error_after_not_started_failures_fails_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(default=Script(latency_s=1, not_started=2, permanent="bad prompt"))
    t0 = trio.current_time()

    outcome = outcome_of(await run_worker(make_context(provider, attempts=1, base_delay_s=1)))

    assert [at - t0 for at in provider.start_times()] == [0, 2, 5]
    assert trio.current_time() - t0 == 6
    assert (outcome.status, outcome.error, outcome.attempts) == (
        ImageStatus.FAILED,
        "bad prompt",
        3,
    )


@pytest.mark.parametrize(
    ("retry", "starts", "error"),
    [
        # 3 free retries (backoffs 1, 2, 4 s), then 2 counted attempts (backoff 1 s between).
        (
            RetryPolicy(attempts=2, base_delay_s=1, free_retries=3),
            [0, 2, 5, 10, 12],
            "nothing started 5 (gave up after 2 attempts and 3 free retries)",
        ),
        # The first failure ends at 1 s. Free retries begin at 2, 5 and 10 s (1, 4 and 9 s
        # after it); the next would begin at 11 + 8 s, past the window, so that failure uses
        # the only attempt and the image fails.
        (
            RetryPolicy(attempts=1, base_delay_s=1, free_retry_window_s=10),
            [0, 2, 5, 10],
            "nothing started 4 (gave up after 1 attempt and 3 free retries)",
        ),
    ],
    ids=["count", "time-window"],
)
async def test_the_free_retries_end_then_attempts_are_used(
    autojump_clock: trio.testing.MockClock, retry: RetryPolicy, starts: list[int], error: str
) -> None:
    provider = FakeProvider(default=Script(latency_s=1, not_started=99))
    t0 = trio.current_time()
    context = attrs.evolve(make_context(provider), retry=retry)

    outcome = outcome_of(await run_worker(context))

    assert [at - t0 for at in provider.start_times()] == starts
    assert trio.current_time() - t0 == starts[-1] + 1
    assert (outcome.status, outcome.attempts, outcome.error) == (
        ImageStatus.FAILED,
        len(starts),
        error,
    )
    assert provider.remote_cancels == [(JOB_ID, 0)]


async def test_waiting_for_capacity_does_not_count_against_the_attempt_timeout(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    capacity = FairCapacity(trio.CapacityLimiter(1))
    release = trio.Event()

    async def hold_the_only_token() -> None:
        async with capacity.slot("other job"):
            await trio.sleep(5)
            release.set()

    nursery.start_soon(hold_the_only_token)
    await trio.testing.wait_all_tasks_blocked()
    provider = FakeProvider(default=Script(latency_s=1.5))

    reports = await run_worker(make_context(provider, attempt_timeout_s=2, capacity=capacity))

    assert release.is_set()
    assert reports[0] == AttemptStarted(index=0, attempt=1, at=FIXED_NOW, waited_s=5.0)
    assert outcome_of(reports).status is ImageStatus.COMPLETED


async def test_cancelled_worker_cancels_the_provider_call_and_reports_no_outcome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(default=Script(block=trio.Event()))
    context = make_context(provider)
    reports_send, reports_recv = trio.open_memory_channel[WorkerReport](0)
    reports: list[WorkerReport] = []

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(run_image_worker, 0, context=context, reports_send=reports_send)
            )
            with reports_recv:
                reports.append(await reports_recv.receive())
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()

    assert [type(report) for report in reports] == [AttemptStarted]
    assert provider.cancelled == 1
    assert provider.in_flight == 0
    assert context.capacity.statistics().in_use == 0


async def test_backoff_is_taken_without_holding_a_token(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = FakeProvider(
        by_prompt={
            "flaky": Script(latency_s=1, fail_times=1),
            "steady": Script(latency_s=1),
        }
    )
    settings = SupervisorSettings(capacity=1, retry=RetryPolicy(attempts=3, base_delay_s=4))
    supervisor = await start_supervisor(nursery, provider, settings)
    t0 = trio.current_time()
    flaky, _ = supervisor.submit_nowait(owner="alice", prompt="flaky", num_images=1)
    await trio.testing.wait_all_tasks_blocked()
    steady, _ = supervisor.submit_nowait(owner="bob", prompt="steady", num_images=1)

    with trio.fail_after(60):
        await supervisor.get(flaky.job_id, owner="alice").wait_finished()

    # The steady image runs in the flaky one's 4 s backoff (1 s to 5 s), on the only token.
    assert [at - t0 for at in provider.start_times(job_id=steady.job_id)] == [1]
    assert [at - t0 for at in provider.start_times(job_id=flaky.job_id)] == [0, 5]
    assert supervisor.get(steady.job_id, owner="bob").snapshot().total_ms == 2000
    assert supervisor.get(flaky.job_id, owner="alice").snapshot().total_ms == 6000
    assert provider.peak_in_flight == 1


# --- stopping remote work (provider.cancel) ----------------------------------------------------


class SlowCancelProvider(FakeProvider):
    """A FakeProvider whose ``cancel`` takes ``cancel_latency_s`` of virtual time, recording the
    call when it starts and (in ``finished_cancels``) when it ends."""

    def __init__(self, *, cancel_latency_s: float, default: Script) -> None:
        super().__init__(default=default)
        self.cancel_latency_s = cancel_latency_s
        self.finished_cancels: list[tuple[str, int]] = []

    async def cancel(self, job_id: str, index: int) -> None:
        self.remote_cancels.append((job_id, index))
        await trio.sleep(self.cancel_latency_s)
        self.finished_cancels.append((job_id, index))


async def cancel_mid_attempt(context: WorkerContext, index: int = 0) -> list[WorkerReport]:
    """Start a worker, cancel it from outside once its first attempt is in flight."""
    reports_send, reports_recv = trio.open_memory_channel[WorkerReport](0)
    reports: list[WorkerReport] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(run_image_worker, index, context=context, reports_send=reports_send)
            )
            with reports_recv:
                reports.append(await reports_recv.receive())
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
    return reports


async def test_a_cancelled_worker_asks_the_provider_to_stop_its_remote_work_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(default=Script(block=trio.Event()))

    reports = await cancel_mid_attempt(make_context(provider), index=3)

    assert [type(report) for report in reports] == [AttemptStarted]
    assert provider.cancelled == 1
    assert provider.remote_cancels == [(JOB_ID, 3)]


async def test_a_worker_cancelled_in_its_backoff_stops_the_earlier_attempts_remote_work(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # After an attempt timeout the provider's remote work goes on (the retry would continue it);
    # a cancel during the backoff must stop it.
    provider = FakeProvider(default=Script(latency_s=10))
    context = make_context(provider, attempts=3, base_delay_s=4, attempt_timeout_s=2)
    reports_send, reports_recv = trio.open_memory_channel[WorkerReport](0)
    t0 = trio.current_time()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(run_image_worker, 0, context=context, reports_send=reports_send)
            )
            with reports_recv:
                await reports_recv.receive()  # attempt 1: times out at 2 s, backoff until 6 s
                await trio.sleep(3)
                nursery.cancel_scope.cancel()

    assert trio.current_time() - t0 == 3
    assert len(provider.calls) == 1
    assert provider.remote_cancels == [(JOB_ID, 0)]


async def test_the_remote_cancel_is_shielded_from_the_job_cancel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The worker is already cancelled when it calls provider.cancel: unshielded, the provider's
    # first checkpoint would end it at once.
    provider = SlowCancelProvider(cancel_latency_s=2, default=Script(block=trio.Event()))
    t0 = trio.current_time()

    await cancel_mid_attempt(make_context(provider))

    assert provider.finished_cancels == [(JOB_ID, 0)]
    assert trio.current_time() - t0 == 2


async def test_a_slow_remote_cancel_is_cut_after_provider_cancel_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = SlowCancelProvider(cancel_latency_s=600, default=Script(block=trio.Event()))
    context = make_context(provider)
    t0 = trio.current_time()

    await cancel_mid_attempt(context)

    assert provider.remote_cancels == [(JOB_ID, 0)]
    assert provider.finished_cancels == []
    assert trio.current_time() - t0 == context.provider_cancel_s == 5


async def test_giving_up_after_the_last_transient_failure_cancels_remote_work_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = FakeProvider(default=Script(latency_s=1, fail_times=99))

    outcome = outcome_of(await run_worker(make_context(provider, attempts=3), index=1))

    assert (outcome.status, outcome.attempts) == (ImageStatus.FAILED, 3)
    assert len(provider.calls) == 3
    assert provider.remote_cancels == [(JOB_ID, 1)]


async def test_giving_up_waits_for_the_remote_cancel_within_provider_cancel_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = SlowCancelProvider(cancel_latency_s=600, default=Script(latency_s=1, fail_times=99))
    t0 = trio.current_time()

    outcome = outcome_of(await run_worker(make_context(provider, attempts=1)))

    # 1 s attempt, then the remote cancel, cut after provider_cancel_s (5 s).
    assert outcome.status is ImageStatus.FAILED
    assert (provider.remote_cancels, provider.finished_cancels) == ([(JOB_ID, 0)], [])
    assert trio.current_time() - t0 == 6


@pytest.mark.parametrize(
    "script",
    [Script(latency_s=1), Script(latency_s=1, fail_times=2)],
    ids=["success", "success-after-retries"],
)
async def test_no_remote_cancel_when_the_image_completes(
    autojump_clock: trio.testing.MockClock, script: Script
) -> None:
    provider = FakeProvider(default=script)

    outcome = outcome_of(await run_worker(make_context(provider, attempts=3)))

    assert outcome.status is ImageStatus.COMPLETED
    assert outcome.attempts == len(provider.calls)
    assert provider.remote_cancels == []


@pytest.mark.parametrize(
    "script",
    [
        Script(latency_s=1, permanent="prompt rejected by policy"),
        Script(latency_s=1, crash=ValueError),
    ],
    ids=["permanent", "internal-error"],
)
async def test_a_failed_image_asks_the_provider_to_stop_its_remote_work_once(
    autojump_clock: trio.testing.MockClock, script: Script
) -> None:
    # A permanent answer (a poll refused, say) may leave a prediction running at the provider,
    # and the provider keeps the image's state until it is told the image is over.
    provider = SlowCancelProvider(cancel_latency_s=600, default=script)
    t0 = trio.current_time()

    outcome = outcome_of(await run_worker(make_context(provider, attempts=3), index=2))

    assert outcome.status is ImageStatus.FAILED
    assert len(provider.calls) == 1
    assert (provider.remote_cancels, provider.finished_cancels) == ([(JOB_ID, 2)], [])
    # 1 s attempt, then the cancel, bounded by provider_cancel_s (5 s).
    assert trio.current_time() - t0 == 6


async def test_an_attempt_timeout_leaves_remote_work_running_for_the_next_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A timed-out attempt is retried, and the retry continues the same remote work: no cancel.
    provider = FakeProvider(default=Script(latency_s=10))

    reports = await run_worker(make_context(provider, attempts=2, attempt_timeout_s=2))

    # Only the give-up after the second timeout stops it.
    assert outcome_of(reports).attempts == 2
    assert provider.cancelled == 2
    assert provider.remote_cancels == [(JOB_ID, 0)]


async def test_cancelling_a_job_cancels_remote_work_of_its_running_images_only(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    block = trio.Event()
    provider = FakeProvider(
        {0: Script(block=block), 2: Script(block=block)}, default=Script(latency_s=1)
    )
    supervisor = await start_supervisor(nursery, provider, SupervisorSettings(capacity=5))
    snapshot, _ = supervisor.submit_nowait(owner="alice", prompt="a pier", num_images=3)
    job = supervisor.get(snapshot.job_id, owner="alice")
    with trio.fail_after(60):
        (first,) = await job.log.wait_events_after(0)  # image 1 completed
        supervisor.cancel(snapshot.job_id, owner="alice")
        await job.wait_finished()

    assert isinstance(first, ProgressEvent)
    assert (first.index, first.status) == (1, ImageStatus.COMPLETED)
    assert job.status is JobStatus.CANCELED
    assert sorted(provider.remote_cancels) == [(job.job_id, 0), (job.job_id, 2)]


# --- capacity is never held while a report waits --------------------------------------------


async def test_no_capacity_token_is_held_while_a_report_waits_for_a_broken_store(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Image 0 completes and its job waits for the store to take it; images 1 and 2 keep failing
    # and report an attempt each time. The job's channel fills up; a worker that then waits to
    # report must not do so holding a token, or the capacity starves every other job.
    store = MemoryStore(resumable=True)
    provider = FakeProvider({0: Script(latency_s=1)}, default=Script(latency_s=1, fail_times=99))
    settings = SupervisorSettings(
        capacity=2, retry=RetryPolicy(attempts=50, base_delay_s=0.1, max_delay_s=0.5)
    )
    async with open_supervisor(
        provider, settings, now=fixed_now(), uniform=upper_jitter, store=store
    ) as supervisor:
        snapshot, _ = await supervisor.submit(owner="alice", prompt="a red fox", num_images=3)
        store.broken = "disk full"
        samples: list[tuple[int, int]] = []
        await trio.sleep(0.13)  # samples between the attempts' starts and ends (whole 0.1 s)
        for _ in range(60):
            await trio.sleep(0.5)
            samples.append((supervisor.capacity.statistics().in_use, provider.in_flight))
        calls_during_outage = len(provider.calls)

        assert all(in_use == in_flight for in_use, in_flight in samples), samples
        store.broken = None
        job = supervisor.get(snapshot.job_id, owner="alice")
        with trio.fail_after(600):
            await job.wait_finished()

    assert calls_during_outage > 3  # the failing images went on trying meanwhile
    assert [image.status for image in job.snapshot().images] == [
        ImageStatus.COMPLETED,
        ImageStatus.FAILED,
        ImageStatus.FAILED,
    ]


# --- one image's bug stays in that image ------------------------------------------------------


class FilesWithABug(ImageFiles):
    """Keeping image ``buggy`` raises (a bug in our code); the others are handed out as they
    are."""

    def __init__(self, tmp_path: Path, *, buggy: int) -> None:
        super().__init__(ImageFilesSettings(directory=tmp_path), httpx.AsyncClient())
        self.buggy = buggy

    def keep(self, job_id: str, index: int, url: str) -> KeptImage:
        if index == self.buggy:
            raise KeyError("a bug in the copy")
        return KeptImage(url=url)


async def test_a_bug_in_one_images_path_fails_that_image_only(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    provider = FakeProvider(default=Script(latency_s=1))
    context = attrs.evolve(
        make_context(provider, capacity=FairCapacity(trio.CapacityLimiter(3))),
        files=FilesWithABug(tmp_path, buggy=1),
    )
    job = JobActor(
        job_id=JOB_ID,
        owner="alice",
        prompt=context.prompt,
        num_images=3,
        context=context,
        store=MemoryStore(),
    )

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job.run)
            await job.wait_finished()

    # Image 1's copy raised: images 0 and 2 complete all the same.
    images = job.snapshot().images
    assert [(image.status, image.error) for image in images] == [
        (ImageStatus.COMPLETED, None),
        (ImageStatus.FAILED, "internal error"),
        (ImageStatus.COMPLETED, None),
    ]
    assert job.status is JobStatus.COMPLETED
    assert provider.remote_cancels == [(JOB_ID, 1)]
    assert "job-1 image 1: internal error" in caplog.text
    assert "KeyError: 'a bug in the copy'" in caplog.text


# --- a provider's own pacing is waited for without a token ----------------------------------


class PacedFake(FakeProvider):
    """A FakeProvider that lets one call start every ``spacing_s``, in the order turns were
    booked (as the Replicate provider paces its creates)."""

    def __init__(self, *, spacing_s: float, default: Script) -> None:
        super().__init__(default=default)
        self.spacing_s = spacing_s
        self.turns: dict[int, float] = {}
        self.next_turn = 0.0

    async def turn_delay(self, job_id: str, index: int, *, book: bool) -> float:
        now = trio.current_time()
        turn = self.turns.get(index)
        if turn is None:
            if not book:
                return 0.0
            turn = self.turns[index] = max(now, self.next_turn)
            self.next_turn = turn + self.spacing_s
        return max(0.0, turn - now)

    async def generate(self, request: ImageRequest) -> str:
        self.turns.pop(request.index, None)
        return await super().generate(request)


async def test_a_providers_pacing_is_waited_for_without_a_token_or_an_attempt(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    provider = PacedFake(spacing_s=2, default=Script(latency_s=1))
    capacity = FairCapacity(trio.CapacityLimiter(3))
    context = make_context(provider, capacity=capacity)
    reports_send, reports_recv = trio.open_memory_channel[WorkerReport](10)
    t0 = trio.current_time()
    with reports_send:
        for index in range(3):
            nursery.start_soon(
                partial(run_image_worker, index, context=context, reports_send=reports_send.clone())
            )
    await trio.sleep(1.5)  # image 0 done; 1 and 2 wait for their turns (2 s and 4 s)
    in_use_while_paced = capacity.statistics().in_use

    with trio.fail_after(60):
        reports = [report async for report in reports_recv]

    assert in_use_while_paced == 0
    # One call every 2 s (in whichever order the turns were booked), each its image's first
    # attempt, the turn's wait counted as waiting like capacity.
    assert [at - t0 for at in provider.start_times()] == [0, 2, 4]
    started = [r for r in reports if isinstance(r, AttemptStarted)]
    assert sorted(r.waited_s for r in started) == [0.0, 2.0, 4.0]
    assert {r.attempt for r in started} == {1}
    assert {r.status for r in reports if isinstance(r, ImageOutcome)} == {ImageStatus.COMPLETED}
