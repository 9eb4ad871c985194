"""Supervisor: admits jobs, runs them, keeps them for a while, and reports on them."""

from __future__ import annotations

import itertools
import logging
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import attrs
import trio

from actors.capacity import FairCapacity
from actors.errors import (
    IdempotencyConflict,
    JobNotFound,
    LimitExceeded,
    Overloaded,
    ShuttingDown,
)
from actors.job import JobActor, JobCounters
from actors.messages import (
    JobEvent,
    JobSnapshot,
    JobStatus,
    SupervisorStatistics,
    Transport,
)
from actors.providers.base import ImageProvider
from actors.retry import Uniform
from actors.settings import SupervisorSettings
from actors.worker import WorkerContext

logger = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@attrs.frozen(kw_only=True)
class Batch:
    """What a subscriber's wait brought.

    ``events`` holds every new event in order. When it is empty, ``ended`` says the job's log is
    complete, ``stopping`` says the service is shutting down, and neither means the heartbeat
    interval passed with nothing new.
    """

    events: tuple[JobEvent, ...] = ()
    ended: bool = False
    stopping: bool = False


class Subscription:
    """One subscriber of one job's events (an SSE stream or a WebSocket).

    Concurrency: created by :meth:`Supervisor.subscribe` for the subscriber's own task and closed
    by it (sync, idempotent; also a context manager). Holds no buffer, only the job's log. Its
    waits are cut short by the supervisor's shutdown.
    """

    def __init__(self, supervisor: Supervisor, job: JobActor, transport: Transport) -> None:
        self._supervisor = supervisor
        self.job = job
        self.transport = transport
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._supervisor._subscribers[self.transport] -= 1

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def wait_events_after(self, cursor: int, *, timeout_s: float) -> Batch:
        """Wait up to ``timeout_s`` for events with ``id > cursor``; see :class:`Batch`."""
        stopping = self._supervisor.shutting_down
        if stopping.is_set():
            await trio.lowlevel.checkpoint()
            return Batch(stopping=True)
        events: tuple[JobEvent, ...] = ()
        with trio.move_on_after(timeout_s) as cancel_scope:
            self._supervisor._wait_scopes.add(cancel_scope)
            try:
                events = await self.job.log.wait_events_after(cursor)
            finally:
                self._supervisor._wait_scopes.discard(cancel_scope)
        if events:
            return Batch(events=events)
        if not cancel_scope.cancelled_caught:
            return Batch(ended=True)
        return Batch(stopping=stopping.is_set())


class Supervisor:
    """Admits, runs, retains and reports on image-generation jobs.

    Args:
        provider: Where images come from.
        settings: Limits and timings.
        now: Wall clock for timestamps (``datetime.now(UTC)`` unless a test injects one).
        uniform: Jitter source for backoff (``random.uniform`` unless a test pins it).

    Concurrency: started once per process by :func:`open_supervisor` (``await
    nursery.start(supervisor.run)``). ``run`` opens the jobs nursery and keeps it on ``self``:
    the documented "spawning tasks without becoming a parent" case, because
    :meth:`submit_nowait` is called from request handlers that must not own the job. Owns the one
    ``trio.CapacityLimiter`` (shared fairly through :class:`FairCapacity`) and the registry of jobs.
    Stops when its nursery is cancelled; every job then finalises synchronously.
    """

    def __init__(
        self,
        provider: ImageProvider,
        settings: SupervisorSettings,
        *,
        now: Callable[[], datetime] = _utcnow,
        uniform: Uniform = random.uniform,
    ) -> None:
        self.provider = provider
        self.settings = settings
        self.capacity = FairCapacity(trio.CapacityLimiter(settings.capacity))
        self.shutting_down = trio.Event()
        self._now = now
        self._uniform = uniform
        self._nursery: trio.Nursery | None = None
        self._started_at = 0.0
        self._jobs: dict[str, JobActor] = {}
        self._active: dict[str, JobActor] = {}
        self._by_owner: dict[str, dict[str, None]] = {}
        self._idempotency: dict[tuple[str, str], str] = {}
        self._keys: dict[str, tuple[str, str]] = {}
        self._finished: deque[tuple[float, str]] = deque()
        self._seq = itertools.count(1)
        self._seqs: dict[str, int] = {}
        self._counters = JobCounters()
        self._subscribers = dict.fromkeys(Transport, 0)
        #: Called (sync, on the Trio thread) with each job's final snapshot: metrics, audit logs.
        self.job_listeners: list[Callable[[JobSnapshot], None]] = []
        self._wait_scopes: set[trio.CancelScope] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the jobs nursery until cancelled."""
        self._started_at = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    # --- admission --------------------------------------------------------------------------

    def submit_nowait(
        self, *, owner: str, prompt: str, num_images: int, idempotency_key: str | None = None
    ) -> tuple[JobSnapshot, bool]:
        """Admit a job and start it; returns its snapshot and whether it was created now.

        Raises:
            ShuttingDown: The supervisor admits no more work.
            IdempotencyConflict: ``idempotency_key`` was used for a different request.
            LimitExceeded: ``owner`` has too many unfinished jobs.
            Overloaded: Too many images are queued service-wide.
            ValueError: ``num_images`` is below 1 (the web layer validates it first).
        """
        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, not {num_images}")
        self._expire()
        if self.shutting_down.is_set() or self._nursery is None:
            raise ShuttingDown("The service is shutting down")
        if idempotency_key is not None:
            existing = self._replay(owner, idempotency_key, prompt, num_images)
            if existing is not None:
                return existing, False
        self._admit(owner, num_images)
        job_id = str(uuid.uuid4())
        context = WorkerContext(
            job_id=job_id,
            prompt=prompt,
            provider=self.provider,
            capacity=self.capacity,
            retry=self.settings.retry,
            attempt_timeout_s=self.settings.attempt_timeout_s,
            provider_cancel_s=self.settings.provider_cancel_s,
            now=self._now,
            uniform=self._uniform,
        )
        job = JobActor(
            job_id=job_id,
            owner=owner,
            prompt=prompt,
            num_images=num_images,
            context=context,
            counters=self._counters,
        )
        self._jobs[job_id] = job
        self._active[job_id] = job
        self._seqs[job_id] = next(self._seq)
        self._by_owner.setdefault(owner, {})[job_id] = None
        if idempotency_key is not None:
            self._idempotency[owner, idempotency_key] = job_id
            self._keys[job_id] = (owner, idempotency_key)
        self._nursery.start_soon(self._run_job, job, name=f"job {job_id}")
        logger.info("job %s accepted: %d images for %s", job_id, num_images, owner)
        return job.snapshot(), True

    def _replay(self, owner: str, key: str, prompt: str, num_images: int) -> JobSnapshot | None:
        job_id = self._idempotency.get((owner, key))
        if job_id is None:
            return None
        job = self._jobs[job_id]
        if (job.prompt, job.num_images) != (prompt, num_images):
            raise IdempotencyConflict("Idempotency-Key was already used for a different request")
        return job.snapshot()

    def _admit(self, owner: str, num_images: int) -> None:
        settings = self.settings
        active = self._active.values()
        mine = sum(1 for job in active if job.owner == owner)
        if mine >= settings.max_active_jobs_per_user:
            raise LimitExceeded(
                f"Too many active jobs: at most {settings.max_active_jobs_per_user} per user",
                retry_after_s=settings.retry_after_s,
            )
        queued = sum(job.unfinished_images for job in active)
        if queued + num_images > settings.max_queued_images:
            raise Overloaded(
                "The service is busy; try again shortly", retry_after_s=settings.retry_after_s
            )

    async def _run_job(self, job: JobActor) -> None:
        try:
            await job.run()
        finally:
            del self._active[job.job_id]
            self._tell_listeners(job.snapshot())
            self._finished.append((trio.current_time(), job.job_id))
            self._expire()

    def _tell_listeners(self, snapshot: JobSnapshot) -> None:
        for listener in self.job_listeners:
            try:
                listener(snapshot)
            except Exception:
                logger.exception("job listener %r failed", listener)

    # --- reading ----------------------------------------------------------------------------

    def get(self, job_id: str, *, owner: str) -> JobActor:
        """The job ``job_id`` if ``owner`` may see it.

        Raises:
            JobNotFound: Unknown, forgotten, or someone else's.
        """
        self._expire()
        job = self._jobs.get(job_id)
        if job is None or job.owner != owner:
            raise JobNotFound(job_id)
        return job

    def list_jobs(
        self, *, owner: str, limit: int, before: int | None = None
    ) -> tuple[tuple[JobSnapshot, ...], int | None]:
        """``owner``'s jobs, newest first: up to ``limit`` of them older than cursor ``before``.

        Returns the page and the cursor of the next page (``None`` on the last page).
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self._expire()
        page: list[JobSnapshot] = []
        for job_id in reversed(self._by_owner.get(owner, {})):
            seq = self._seqs[job_id]
            if before is not None and seq >= before:
                continue
            if len(page) == limit:
                return tuple(page), self._seqs[page[-1].job_id]
            page.append(self._jobs[job_id].snapshot())
        return tuple(page), None

    def cancel(self, job_id: str, *, owner: str) -> JobActor:
        """Cancel ``job_id`` (no effect on a finished job) and return it.

        Raises:
            JobNotFound: Unknown, forgotten, or someone else's.
        """
        job = self.get(job_id, owner=owner)
        job.cancel()
        return job

    def subscribe(self, job_id: str, *, owner: str, transport: Transport) -> Subscription:
        """Follow ``job_id``'s events until the returned subscription is closed.

        Raises:
            JobNotFound: Unknown, forgotten, or someone else's.
        """
        job = self.get(job_id, owner=owner)
        self._subscribers[transport] += 1
        return Subscription(self, job, transport)

    def statistics(self) -> SupervisorStatistics:
        self._expire()
        by_status = dict.fromkeys(JobStatus, 0)
        for job in self._jobs.values():
            by_status[job.status] += 1
        counters = self._counters
        return SupervisorStatistics(
            uptime_s=trio.current_time() - self._started_at,
            shutting_down=self.shutting_down.is_set(),
            jobs_by_status=tuple(by_status.items()),
            jobs_retained=len(self._jobs),
            images_queued=sum(job.unfinished_images for job in self._active.values()),
            capacity=self.capacity.statistics(),
            attempts_total=counters.attempts,
            retries_total=counters.retries,
            images_completed_total=counters.completed,
            images_failed_total=counters.failed,
            subscribers=tuple(self._subscribers.items()),
        )

    # --- lifecycle --------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Admit no more jobs and end every subscriber's wait (sync, idempotent)."""
        if self.shutting_down.is_set():
            return
        logger.info("supervisor: shutting down")
        self.shutting_down.set()
        for cancel_scope in self._wait_scopes:
            cancel_scope.cancel()

    def _expire(self) -> None:
        horizon = trio.current_time() - self.settings.job_retention_s
        finished = self._finished
        while finished and (
            finished[0][0] <= horizon or len(finished) > self.settings.max_retained_jobs
        ):
            _, job_id = finished.popleft()
            self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        job = self._jobs.pop(job_id)
        del self._seqs[job_id]
        owned = self._by_owner[job.owner]
        del owned[job_id]
        if not owned:
            del self._by_owner[job.owner]
        key = self._keys.pop(job_id, None)
        if key is not None:
            del self._idempotency[key]


@asynccontextmanager
async def open_supervisor(
    provider: ImageProvider,
    settings: SupervisorSettings,
    *,
    now: Callable[[], datetime] = _utcnow,
    uniform: Uniform = random.uniform,
) -> AsyncIterator[Supervisor]:
    """Run a :class:`Supervisor` for the body of the ``async with``; stop it on exit.

    On exit the supervisor stops admitting, every subscriber's wait ends, and every unfinished
    job is cancelled and finalised (its subscribers get ``done``).
    """
    supervisor = Supervisor(provider, settings, now=now, uniform=uniform)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        try:
            yield supervisor
        finally:
            supervisor.begin_shutdown()
            nursery.cancel_scope.cancel()
