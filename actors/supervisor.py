"""Supervisor: admits jobs, runs them, keeps them for a while, and reports on them."""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial

import attrs
import trio

from actors.capacity import Capacity, FairCapacity
from actors.cluster.node import CANCEL_FINISHED, CANCEL_GONE, CANCEL_TAKEN, ClusterNode
from actors.errors import (
    IdempotencyConflict,
    JobNotFound,
    LimitExceeded,
    Overloaded,
    ShuttingDown,
    StoreUnavailable,
)
from actors.eventlog import EventLog
from actors.files import ImageFiles
from actors.job import STORE_RETRY_S, JobActor, JobCounters
from actors.messages import (
    ImageCopy,
    ImageStatus,
    JobEvent,
    JobSnapshot,
    JobStatus,
    SupervisorStatistics,
    Transport,
)
from actors.providers.base import Commit, ImageProvider, RemoteWork, ResumesRemoteWork
from actors.retry import Uniform
from actors.settings import SupervisorSettings
from actors.store.base import DeleteJob, JobStore, SetCopy, StoredJob
from actors.tasks import TaskFailures, keep_running
from actors.worker import WorkerContext

logger = logging.getLogger(__name__)

#: The fields of a job snapshot that its stored record holds as they are.
_RECORD_FIELDS = tuple(field.name for field in attrs.fields(JobSnapshot) if field.name != "images")
#: How long a stopping cluster node may take to hand one job over (store flush and release).
CLUSTER_RELEASE_S = 5.0
#: How often a cluster node looks for finished jobs to forget (any node's).
CLUSTER_EXPIRE_S = 5.0
#: A cluster node answers reads of a finished job (which never changes) from memory this long,
#: and keeps this many of them: polls of a finished job cost Redis nothing. A job forgotten by
#: retention elsewhere may be shown here that much longer.
FINISHED_CACHE_S = 10.0
FINISHED_CACHE_SIZE = 4096


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

    def __init__(
        self,
        supervisor: Supervisor,
        log: EventLog,
        *,
        owner: str,
        transport: Transport,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._supervisor = supervisor
        self.log = log
        self.owner = owner
        self.transport = transport
        self._on_close = on_close
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._supervisor._unsubscribe(self)
            if self._on_close is not None:
                self._on_close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def wait_events_after(self, cursor: int, *, timeout_s: float) -> Batch:
        """Wait up to ``timeout_s`` for events with ``id > cursor``; see :class:`Batch`."""
        stopping = self._supervisor.shutting_down
        log = self.log
        if stopping.is_set():
            # Events already published still go out (a job that ended as the service stopped
            # has its ``done`` delivered); then the stream is told to stop.
            await trio.lowlevel.checkpoint()
            pending = log.events_after(cursor)
            return Batch(events=pending) if pending else Batch(stopping=True)
        events: tuple[JobEvent, ...] = ()
        with trio.move_on_after(timeout_s) as cancel_scope:
            self._supervisor._wait_scopes.add(cancel_scope)
            try:
                events = await log.wait_events_after(cursor)
            finally:
                self._supervisor._wait_scopes.discard(cancel_scope)
        if events:
            return Batch(events=events)
        if not cancel_scope.cancelled_caught:
            return Batch(ended=True)
        # Cut short: what was published meanwhile (the wait's own answer may have been dropped
        # by the cancellation) comes first.
        events = log.events_after(cursor)
        if events:
            return Batch(events=events)
        return Batch(stopping=stopping.is_set())


class Supervisor:
    """Admits, runs, retains and reports on image-generation jobs.

    Args:
        provider: Where images come from.
        settings: Limits and timings.
        store: Where jobs are kept; on start, the jobs it holds are restored: finished ones
            readable, unfinished ones carried on from where they were.
        now: Wall clock for timestamps (``datetime.now(UTC)`` unless a test injects one).
        uniform: Jitter source for backoff (``random.uniform`` unless a test pins it).
        files: The image directory: copies of the providers' outputs are kept there, and a
            forgotten job's files are deleted with it; while it is over its budget, the oldest
            finished jobs are forgotten.
        capacity: The slots image attempts hold (``MAX_CONCURRENCY``): this process's own
            :class:`FairCapacity` of ``settings.capacity`` unless one shared with other
            processes is given (``actors.limits``).
        cluster: This process's node of a cluster sharing the store (Redis): jobs are then
            accepted into the cluster's queue and run by whichever node takes them, reads of
            any job come from the store, and retention is cluster-wide.

    Concurrency: started once per process by :func:`open_supervisor` (``await
    nursery.start(supervisor.run)``). ``run`` opens the jobs nursery and keeps it on ``self``:
    the documented "spawning tasks without becoming a parent" case, because
    :meth:`submit_nowait` is called from request handlers that must not own the job. Owns the one
    ``trio.CapacityLimiter`` (shared fairly through :class:`FairCapacity`), unless given a shared
    :class:`~actors.capacity.Capacity`, and the registry of jobs.
    Stops when its nursery is cancelled; every job then finalises synchronously.
    """

    def __init__(
        self,
        provider: ImageProvider,
        settings: SupervisorSettings,
        *,
        store: JobStore,
        now: Callable[[], datetime] = _utcnow,
        uniform: Uniform = random.uniform,
        files: ImageFiles | None = None,
        capacity: Capacity | None = None,
        cluster: ClusterNode | None = None,
    ) -> None:
        self.provider = provider
        self.cluster = cluster
        self.settings = settings
        self.store = store
        self.files = files
        self.capacity: Capacity = capacity or FairCapacity(trio.CapacityLimiter(settings.capacity))
        #: Set once the supervisor admits no more jobs (draining, then shutting down).
        self.draining = trio.Event()
        #: Set once every subscriber's wait is ended (after draining).
        self.shutting_down = trio.Event()
        self._job_ended = trio.Event()
        self._grace = trio.CancelScope()
        self._deleting: dict[str, Commit] = {}
        self._deletes_queued = trio.Event()
        #: The supervisor's background loops that failed (a bug) and were started again.
        self.failures = TaskFailures()
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
        self._subscribers_refused = dict.fromkeys(Transport, 0)
        self._streams_by_owner: dict[str, int] = {}
        #: Called (sync, on the Trio thread) with each job's final snapshot: metrics, audit logs.
        self.job_listeners: list[Callable[[JobSnapshot], None]] = []
        self._wait_scopes: set[trio.CancelScope] = set()
        #: A cluster node's finished jobs read lately: job id -> (good until, snapshot).
        self._finished_cache: OrderedDict[str, tuple[float, JobSnapshot]] = OrderedDict()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Restore the store's jobs, then run the jobs nursery until cancelled.

        Raises:
            StoreUnavailable: The store cannot be read (before ``started``).
        """
        self._started_at = trio.current_time()
        if self.cluster is not None:
            await self._run_cluster(self.cluster, started=task_status.started)
            return
        stored = await self.store.load()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._restore(stored)
                nursery.start_soon(self._keep_running, "deletion writer", self._see_deletes_stored)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def _context(self, job_id: str, prompt: str) -> WorkerContext:
        return WorkerContext(
            job_id=job_id,
            prompt=prompt,
            provider=self.provider,
            capacity=self.capacity,
            retry=self.settings.retry,
            attempt_timeout_s=self.settings.attempt_timeout_s,
            provider_cancel_s=self.settings.provider_cancel_s,
            now=self._now,
            uniform=self._uniform,
            files=self.files,
        )

    def _restore(self, stored: tuple[StoredJob, ...]) -> None:
        """Register the stored jobs; carry the unfinished ones on (their remote work resumed)."""
        assert self._nursery is not None
        if isinstance(self.provider, ResumesRemoteWork):
            self.provider.resume_remote_work(*_remote_work(stored))
        now, mono = self._now(), trio.current_time()
        finished: list[tuple[float, str]] = []
        for record in stored:
            try:
                job = JobActor.restore(
                    record,
                    context=self._context(record.job.job_id, record.job.prompt),
                    counters=self._counters,
                    store=self.store,
                )
            except Exception:
                logger.exception("job %s cannot be restored; left in the store", record.job.job_id)
                continue
            self._register(job)
            if job.finished_at is not None and job.status.finished:
                age_s = max(0.0, (now - job.finished_at).total_seconds())
                finished.append((mono - age_s, job.job_id))
            else:
                self._active[job.job_id] = job
                self._nursery.start_soon(self._run_job, job, name=f"job {job.job_id}")
        self._finished.extend(sorted(finished))
        if self.files is not None:
            # Files of jobs the store does not hold (lost with a memory store, or never stored)
            # are unreachable; a job that failed to restore keeps its files with its records.
            self.files.forget_all_but({record.job.job_id for record in stored})
        self._resume_copies(copy for record in stored for copy in record.copies)
        self._seq = itertools.count(max((job.job.seq for job in stored), default=0) + 1)
        if stored:
            logger.info(
                "supervisor: restored %d jobs (%d carried on)", len(stored), len(self._active)
            )
        self._expire()

    def _resume_copies(self, copies: Iterable[ImageCopy]) -> None:
        """Finish the copies a stop (or a dead node) cut short; failed ones are journaled as
        they fail."""
        if self.files is not None:
            self.files.resume_copies(copies, journal=lambda copy: self.store.write(SetCopy(copy)))

    async def locate_copy(self, name: str) -> ImageCopy | None:
        """The copy ``/files/{name}`` waits for (pending, or failed for good), or None: the file
        is on disk if it is anywhere. On a cluster, a copy another node makes (or made, or one a
        dead node left unmade) is found in the store.

        Raises:
            StoreUnavailable: On a cluster, the store cannot be read.
        """
        if self.files is None:
            return None
        copy = self.files.locate(name)
        if copy is not None or self.cluster is None or await self.files.on_disk(name):
            return copy
        job_id = self.files.job_of(name)
        stored = (
            await self.cluster.store.load_job(job_id, events=False) if job_id is not None else None
        )
        if stored is None:
            return None
        return next((copy for copy in stored.copies if copy.name == name), None)

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
        if self.cluster is not None:
            raise RuntimeError(
                "a cluster node admits jobs with submit(), which waits for the store"
            )
        self._expire()
        if self.draining.is_set() or self._nursery is None:
            raise ShuttingDown("The service is shutting down")
        if idempotency_key is not None:
            existing = self._replay(owner, idempotency_key, prompt, num_images)
            if existing is not None:
                return existing, False
        self._admit(owner, num_images)
        job = self._new_job(owner, prompt, num_images, idempotency_key, seq=next(self._seq))
        job_id = job.job_id
        self._register(job)
        self._active[job_id] = job
        job.admit()
        self._nursery.start_soon(self._run_job, job, name=f"job {job_id}")
        logger.info("job %s accepted: %d images for %s", job_id, num_images, owner)
        return job.snapshot(), True

    async def submit(
        self, *, owner: str, prompt: str, num_images: int, idempotency_key: str | None = None
    ) -> tuple[JobSnapshot, bool]:
        """:meth:`submit_nowait`, answered once the job is in the store.

        Raises:
            StoreUnavailable: The store refused the job; it does not exist.
            (and everything :meth:`submit_nowait` raises)
        """
        if self.cluster is not None:
            return await self._submit_cluster(
                self.cluster,
                owner=owner,
                prompt=prompt,
                num_images=num_images,
                idempotency_key=idempotency_key,
            )
        snapshot, created = self.submit_nowait(
            owner=owner, prompt=prompt, num_images=num_images, idempotency_key=idempotency_key
        )
        job = self._jobs[snapshot.job_id]
        await job.wait_stored()
        return job.snapshot(), created

    def _new_job(
        self, owner: str, prompt: str, num_images: int, idempotency_key: str | None, *, seq: int
    ) -> JobActor:
        job_id = str(uuid.uuid4())
        return JobActor(
            job_id=job_id,
            owner=owner,
            prompt=prompt,
            num_images=num_images,
            context=self._context(job_id, prompt),
            counters=self._counters,
            store=self.store,
            seq=seq,
            idempotency_key=idempotency_key,
        )

    def _register(self, job: JobActor) -> None:
        job_id = job.job_id
        self._jobs[job_id] = job
        self._seqs[job_id] = job.seq
        self._by_owner.setdefault(job.owner, {})[job_id] = None
        if job.idempotency_key is not None:
            key = (job.owner, job.idempotency_key)
            self._idempotency[key] = job_id
            self._keys[job_id] = key

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
            raise self._too_many_jobs()
        queued = sum(job.unfinished_images for job in active)
        if queued + num_images > settings.max_queued_images:
            raise self._busy()

    def _too_many_jobs(self) -> LimitExceeded:
        settings = self.settings
        return LimitExceeded(
            f"Too many active jobs: at most {settings.max_active_jobs_per_user} per user",
            retry_after_s=settings.retry_after_s,
        )

    def _busy(self) -> Overloaded:
        return Overloaded(
            "The service is busy; try again shortly", retry_after_s=self.settings.retry_after_s
        )

    def _ended(self, job: JobActor) -> None:
        del self._active[job.job_id]
        self._job_ended.set()
        self._job_ended = trio.Event()

    async def _run_job(self, job: JobActor) -> None:
        try:
            await job.run()
        finally:
            self._ended(job)
            if job.refused:
                # Deleted in the store too: a write that timed out may still land before this.
                self._forget(job.job_id)
            elif job.status.finished:
                self._tell_listeners(job.snapshot())
                self._finished.append((trio.current_time(), job.job_id))
                self._expire()
            # else: suspended as the process stops; the store keeps it for the next start.

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
        # A job is visible once stored: one the store then refused was never there.
        if job is None or job.owner != owner or not job.stored:
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
            job = self._jobs[job_id]
            if not job.stored:
                continue
            if len(page) == limit:
                return tuple(page), self._seqs[page[-1].job_id]
            page.append(job.snapshot())
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
            LimitExceeded: ``owner`` has as many streams open as a user may (counted).
        """
        job = self.get(job_id, owner=owner)
        self.check_subscriber(owner=owner, transport=transport)
        self._subscribers[transport] += 1
        self._streams_by_owner[owner] = self._streams_by_owner.get(owner, 0) + 1
        return Subscription(self, job.log, owner=owner, transport=transport)

    def check_subscriber(self, *, owner: str, transport: Transport) -> None:
        """Whether ``owner`` may open one more stream now (sync; :meth:`subscribe` asks too).

        Raises:
            LimitExceeded: ``owner`` has as many streams open as a user may; counted as refused.
        """
        limit = self.settings.max_streams_per_user
        if self._streams_by_owner.get(owner, 0) >= limit:
            self._subscribers_refused[transport] += 1
            raise LimitExceeded(
                f"Too many open streams: at most {limit} per user",
                retry_after_s=self.settings.retry_after_s,
            )

    def _unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers[subscription.transport] -= 1
        owner = subscription.owner
        left = self._streams_by_owner[owner] - 1
        if left:
            self._streams_by_owner[owner] = left
        else:
            del self._streams_by_owner[owner]  # bounded by the users streaming now

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
            jobs_crashed_total=counters.crashed,
            tasks_failed_total=sum(failures.total for failures in self._task_failures()),
            subscribers=tuple(self._subscribers.items()),
            subscribers_refused=tuple(self._subscribers_refused.items()),
        )

    def _task_failures(self) -> Iterator[TaskFailures]:
        yield self.failures
        if self.cluster is not None:
            yield self.cluster.failures
        shared = getattr(self.capacity, "failures", None)  # a capacity shared through Redis
        if isinstance(shared, TaskFailures):
            yield shared

    # --- lifecycle --------------------------------------------------------------------------

    def stop_admitting(self) -> None:
        """Admit no more jobs; running ones go on, and so do their subscribers (sync)."""
        if not self.draining.is_set():
            logger.info("supervisor: admitting no more jobs")
            self.draining.set()

    async def drain(self, grace_s: float) -> None:
        """Stop admitting, give running jobs up to ``grace_s`` to finish, then shut down
        (:meth:`begin_shutdown` cuts the grace short).

        Jobs still running afterwards are left to the caller's cancellation: with a resumable
        store they stay unfinished there, and the next start carries them on.
        """
        self.stop_admitting()
        if self.cluster is not None:
            # Hand every job over at once (their tasks release and requeue them as they end):
            # another node carries each on, so nothing waits for them to finish here.
            self.cluster.stop_taking()
            for job in list(self._active.values()):
                job.suspend()
        with trio.move_on_after(grace_s) as grace:
            self._grace = grace
            if self.shutting_down.is_set():
                # begin_shutdown() came first (a second signal handled before this task ran):
                # it cancelled the previous scope, so this one starts cancelled too.
                grace.cancel()
            while self._active:
                await self._job_ended.wait()
        if self._active:
            logger.info(
                "supervisor: %d jobs still running after the %g s grace period",
                len(self._active),
                grace_s,
            )
        self.begin_shutdown()

    def begin_shutdown(self) -> None:
        """Admit no more jobs and end every subscriber's wait (sync, idempotent)."""
        self.stop_admitting()
        self._grace.cancel()  # a drain in progress ends now
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
            finished[0][0] <= horizon
            or len(finished) > self.settings.max_retained_jobs
            # The newest finished job stays, even alone over budget: its client is reading it.
            or (len(finished) > 1 and self._finished_over_budget())
        ):
            _, job_id = finished.popleft()
            self._forget(job_id)

    async def _keep_running(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        await keep_running(f"supervisor's {name}", loop, self.failures, log=logger)

    async def _see_deletes_stored(self) -> None:
        """Write again every deletion that failed, until it is stored (else a forgotten job
        would come back at the next start)."""
        delay = STORE_RETRY_S[0]
        while True:
            while self._deleting:  # (first those left by a run of this loop that failed)
                job_id, commit = next(iter(self._deleting.items()))
                try:
                    await commit.wait()
                except StoreUnavailable as exc:
                    logger.warning(
                        "job %s: deletion not stored (again in %g s): %s", job_id, delay, exc
                    )
                    await trio.sleep(delay)
                    delay = min(delay * 2, STORE_RETRY_S[1])
                    if self._deleting.get(job_id) is commit:
                        self._deleting[job_id] = self._queue_delete(job_id)
                    continue
                delay = STORE_RETRY_S[0]
                if self._deleting.get(job_id) is commit:
                    del self._deleting[job_id]
            await self._deletes_queued.wait()
            self._deletes_queued = trio.Event()

    def _finished_over_budget(self) -> bool:
        """Whether finished jobs' images alone take the image directory over its budget (running
        jobs' images are never evicted, so they do not push finished jobs out either)."""
        files = self.files
        if files is None or not files.over_budget:
            return False
        finished_bytes = files.total_bytes - files.bytes_of(self._active)
        return finished_bytes > files.settings.max_total_bytes

    def _queue_delete(self, job_id: str) -> Commit:
        """Queue the job's deletion. A store that fails on it with a bug, not
        ``StoreUnavailable``, is asked again later, as one that cannot write is."""
        try:
            return self.store.write(DeleteJob(job_id))
        except Exception:
            logger.exception("job %s: the store failed to take its deletion", job_id)
            return Commit.settled_with(StoreUnavailable("the store failed to take the deletion"))

    def _forget(self, job_id: str) -> None:
        # Queued now, in order with the writes after it (a new job may take its key at once).
        self._deleting[job_id] = self._queue_delete(job_id)
        self._deletes_queued.set()
        if self.files is not None:
            self.files.forget(job_id)
        job = self._jobs.pop(job_id)
        del self._seqs[job_id]
        owned = self._by_owner[job.owner]
        del owned[job_id]
        if not owned:
            del self._by_owner[job.owner]
        key = self._keys.pop(job_id, None)
        if key is not None:
            del self._idempotency[key]

    # --- reads and writes that work on a cluster too (the web layer's) ----------------------

    async def find(self, job_id: str, *, owner: str) -> JobSnapshot:
        """The job ``job_id`` now, if ``owner`` may see it: from this process, or from the
        shared store when another node runs it (or none does).

        Raises:
            JobNotFound: Unknown, forgotten, or someone else's.
            StoreUnavailable: The shared store cannot be read.
        """
        cluster = self.cluster
        job = self._active.get(job_id) if cluster is not None else None
        if cluster is None or (job is not None and job.owner == owner and job.stored):
            await trio.lowlevel.checkpoint()
            return (job or self.get(job_id, owner=owner)).snapshot()
        cached = self._finished_cache.get(job_id)
        if cached is not None and cached[0] > trio.current_time():
            await trio.lowlevel.checkpoint()
            if cached[1].owner != owner:
                raise JobNotFound(job_id)
            return cached[1]
        stored = await cluster.store.load_job(job_id, events=False)
        if stored is None or stored.job.owner != owner:
            raise JobNotFound(job_id)
        snapshot = self._snapshot_of(stored)
        self._remember_finished(snapshot)
        return snapshot

    def _remember_finished(self, snapshot: JobSnapshot) -> None:
        if not snapshot.status.finished:
            return
        cache = self._finished_cache
        ttl_s = min(FINISHED_CACHE_S, self.settings.job_retention_s / 2)
        cache[snapshot.job_id] = (trio.current_time() + ttl_s, snapshot)
        cache.move_to_end(snapshot.job_id)
        while len(cache) > FINISHED_CACHE_SIZE:
            cache.popitem(last=False)

    async def find_page(
        self, *, owner: str, limit: int, before: int | None = None
    ) -> tuple[tuple[JobSnapshot, ...], int | None]:
        """:meth:`list_jobs`, from the shared store on a cluster.

        Raises:
            StoreUnavailable: The shared store cannot be read.
        """
        if self.cluster is None:
            await trio.lowlevel.checkpoint()
            return self.list_jobs(owner=owner, limit=limit, before=before)
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        stored, cursor = await self.cluster.store.load_page(owner, limit=limit, before=before)
        return tuple(self._snapshot_of(job) for job in stored), cursor

    async def cancel_and_wait(self, job_id: str, *, owner: str, timeout_s: float) -> JobSnapshot:
        """Cancel ``job_id`` wherever it runs and wait up to ``timeout_s`` for its end.

        Raises:
            JobNotFound: Unknown, forgotten, or someone else's.
            StoreUnavailable: The shared store cannot be reached.
        """
        cluster = self.cluster
        job = self._active.get(job_id) if cluster is not None else None
        if cluster is None or job is not None:
            if job is None:
                job = self.get(job_id, owner=owner)
            elif job.owner != owner:
                raise JobNotFound(job_id)
            job.cancel()
            with trio.move_on_after(timeout_s):
                await job.wait_finished()
            return job.snapshot()
        snapshot = await self.find(job_id, owner=owner)
        if snapshot.status.finished:
            return snapshot
        await cluster.cancel(job_id)
        follower = cluster.follower
        assert follower is not None
        # The job's node may have died: its lease lapses within a lease, and asking again then
        # takes the job here, to end it at once (not once a node claims it).
        with trio.move_on_after(timeout_s + cluster.lease_s):
            log = await follower.acquire(job_id)
            if log is not None:
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._cancel_until_taken, cluster, job_id)
                        cursor = 0
                        while events := await log.wait_events_after(cursor):
                            cursor = events[-1].id
                        nursery.cancel_scope.cancel()
                finally:
                    follower.release(job_id)
        return await self.find(job_id, owner=owner)

    @staticmethod
    async def _cancel_until_taken(cluster: ClusterNode, job_id: str) -> None:
        """Ask again, every third of a lease, until the job is ended or taken here to end."""
        while True:
            await trio.sleep(cluster.lease_s / 3)
            with contextlib.suppress(StoreUnavailable):
                if await cluster.cancel(job_id) in (CANCEL_GONE, CANCEL_FINISHED, CANCEL_TAKEN):
                    return

    async def subscribe_job(self, job_id: str, *, owner: str, transport: Transport) -> Subscription:
        """:meth:`subscribe`, for a job running on any node of a cluster too (its events come
        through this node's one reader of the shared store).

        Raises:
            JobNotFound: Unknown, forgotten, or someone else's.
            LimitExceeded: ``owner`` has as many streams open as a user may (counted).
            StoreUnavailable: The shared store cannot be read.
        """
        if self.cluster is None:
            await trio.lowlevel.checkpoint()
            return self.subscribe(job_id, owner=owner, transport=transport)
        await self.find(job_id, owner=owner)
        self.check_subscriber(owner=owner, transport=transport)
        follower = self.cluster.follower
        assert follower is not None
        # A job this node runs: its events so far are in its own log (and the ones it publishes
        # come through ``offer``), so following it needs no read of Redis.
        local = self._active.get(job_id)
        known = local.log.events_after(0) if local is not None else None
        log = await follower.acquire(job_id, known=known)
        if log is None:
            raise JobNotFound(job_id)
        self._subscribers[transport] += 1
        self._streams_by_owner[owner] = self._streams_by_owner.get(owner, 0) + 1
        return Subscription(
            self,
            log,
            owner=owner,
            transport=transport,
            on_close=partial(follower.release, job_id),
        )

    # --- a cluster node ---------------------------------------------------------------------

    async def _run_cluster(self, cluster: ClusterNode, *, started: Callable[[], None]) -> None:
        """The jobs nursery of a cluster node: jobs come from the cluster's queue, not from
        loading the store (any node may run any of them)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._resume_copies(())  # this node's failed copies are journaled
                if self.files is not None:  # the budget of the shared directory is counted in Redis
                    self.files.on_written = cluster.note_bytes
                    cluster.on_forgotten_files = self.files.forget
                await nursery.start(
                    partial(
                        cluster.run,
                        start_job=self._start_taken,
                        on_lost=self._lost,
                        on_cancel=self._cancel_here,
                    )
                )
                nursery.start_soon(
                    self._keep_running, "cluster retention", partial(self._expire_cluster, cluster)
                )
                nursery.start_soon(self._keep_running, "deletion writer", self._see_deletes_stored)
                started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def _submit_cluster(
        self,
        cluster: ClusterNode,
        *,
        owner: str,
        prompt: str,
        num_images: int,
        idempotency_key: str | None,
    ) -> tuple[JobSnapshot, bool]:
        """Accept a job into the cluster's queue: admitted, stored and queued in one script call."""
        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, not {num_images}")
        if self.draining.is_set() or self._nursery is None:
            raise ShuttingDown("The service is shutting down")
        # Its seq is given by the admission (0: the next, cluster-wide).
        job = self._new_job(owner, prompt, num_images, idempotency_key, seq=0)
        # Admitted in one step with the write (other nodes may be admitting at the same time),
        # and taken to run here when this node has room, no job waits in the queue, and this node
        # does not run far more jobs than another (ClusterNode.room_for_one).
        settings = self.settings
        with cluster.room_for_one() as take, trio.CancelScope(shield=take is not None):
            # Shielded when the job may be taken here (bounded by the store's call timeout): a
            # request cancelled on the way (its client gone) would lose an answer that made the
            # job this node's, and the job would wait for its lease to lapse.
            outcome, holder, job.seq = await cluster.store.admit(
                job.first_write(),
                max_active=settings.max_active_jobs_per_user,
                max_queued_images=settings.max_queued_images,
                take=take,
            )
            if outcome == "taken":
                assert holder is not None
                # No checkpoint before it is held and running: a cancel or a renewal finds it.
                cluster.hold_accepted(job.job_id, holder)
                if self.draining.is_set() or self._nursery is None:
                    # Stopping meanwhile: handed over, as a job taken from the queue would be.
                    with trio.CancelScope(shield=True), trio.move_on_after(CLUSTER_RELEASE_S):
                        await cluster.release(job.job_id, requeue=True)
                else:
                    job.stored_by_admission()
                    self._launch(cluster, job, cancelled=False)
                outcome = "admitted"
        if outcome == "held":
            assert holder is not None
            existing = await self._replay_stored(holder, prompt, num_images)
            if existing is None:
                raise StoreUnavailable("the job of this Idempotency-Key was deleted meanwhile")
            return existing, False
        if outcome == "limit":
            raise self._too_many_jobs()
        if outcome == "busy":
            raise self._busy()
        logger.info("job %s accepted: %d images for %s", job.job_id, num_images, owner)
        return job.snapshot(), True

    async def _replay_stored(self, job_id: str, prompt: str, num_images: int) -> JobSnapshot | None:
        assert self.cluster is not None
        stored = await self.cluster.store.load_job(job_id, events=False)
        if stored is None:
            return None
        if (stored.job.prompt, stored.job.num_images) != (prompt, num_images):
            raise IdempotencyConflict("Idempotency-Key was already used for a different request")
        return self._snapshot_of(stored)

    @staticmethod
    def _snapshot_of(stored: StoredJob) -> JobSnapshot:
        # Every field of a snapshot but its images is the record's field of the same name.
        record = attrs.asdict(stored.job, recurse=False)
        fields = {name: record[name] for name in _RECORD_FIELDS}
        return JobSnapshot(images=stored.images, **fields)

    async def _start_taken(self, job_id: str, cancelled: bool) -> bool:
        """Run a job this node took from the queue (its lease is ours): False if it cannot."""
        cluster = self.cluster
        assert cluster is not None
        if self.draining.is_set() or cluster.draining or self._nursery is None:
            await cluster.release(job_id, requeue=True)
            return True
        try:
            stored = await cluster.store.load_job(job_id)
        except StoreUnavailable as exc:
            logger.warning("job %s cannot be read to run it: %s", job_id, exc)
            return False
        if stored is None:
            return False
        if isinstance(self.provider, ResumesRemoteWork):
            self.provider.resume_remote_work(*_remote_work([stored]))
        self._resume_copies(stored.copies)
        try:
            job = JobActor.restore(
                stored,
                context=self._context(job_id, stored.job.prompt),
                counters=self._counters,
                store=self.store,
            )
        except Exception:
            logger.exception("job %s cannot be restored; left in the store", job_id)
            return False
        self._launch(cluster, job, cancelled=cancelled)
        return True

    def _launch(self, cluster: ClusterNode, job: JobActor, *, cancelled: bool) -> None:
        """Run ``job``, whose lease this node holds, here (sync)."""
        assert self._nursery is not None
        job_id = job.job_id
        if cluster.follower is not None:
            job.on_publish = partial(cluster.follower.offer, job_id)
        self._active[job_id] = job
        if cancelled:
            job.cancel()
        self._nursery.start_soon(self._run_cluster_job, cluster, job, name=f"job {job_id}")
        logger.info("job %s runs on node %s", job_id, cluster.node_id)

    async def _run_cluster_job(self, cluster: ClusterNode, job: JobActor) -> None:
        try:
            await job.run()
        finally:
            self._ended(job)
            ended = job.status.finished and not job.suspended
            if ended:
                self._remember_finished(job.snapshot())
                self._tell_listeners(job.snapshot())
            # Shielded and bounded: a node that stops hands its jobs over on its way out.
            with trio.CancelScope(shield=True), trio.move_on_after(CLUSTER_RELEASE_S):
                if job.job_id in cluster.held and not ended:
                    await cluster.store.flush()  # its last writes land before another takes it
                await cluster.release(job.job_id, requeue=not ended)

    def _lost(self, job_id: str) -> None:
        job = self._active.get(job_id)
        if job is not None:
            job.suspend()

    def _cancel_here(self, job_id: str) -> None:
        job = self._active.get(job_id)
        if job is not None:
            job.cancel()

    async def _expire_cluster(self, cluster: ClusterNode) -> None:
        """Forget finished jobs cluster-wide (any node may; deleting twice is harmless)."""
        settings = self.settings
        while True:
            await trio.sleep(CLUSTER_EXPIRE_S)
            try:
                job_ids = await cluster.expired(
                    retention_s=settings.job_retention_s,
                    keep=settings.max_retained_jobs,
                    max_bytes=None if self.files is None else self.files.settings.max_total_bytes,
                )
            except StoreUnavailable:
                continue  # the next pass
            for job_id in job_ids:
                self._finished_cache.pop(job_id, None)
                self._deleting[job_id] = self._queue_delete(job_id)
                self._deletes_queued.set()
                if self.files is not None:
                    self.files.forget(job_id)


def _remote_work(stored: Sequence[StoredJob]) -> tuple[list[RemoteWork], list[str]]:
    """The remote work of images still to be made, and the remote ids of all the others."""
    resume: list[RemoteWork] = []
    done: list[str] = []
    for job in stored:
        running = {
            image.index
            for image in job.images
            if image.status is ImageStatus.RUNNING and not job.job.status.finished
        }
        for work in job.remote:
            if work.index in running:
                resume.append(work)
            elif work.remote_id is not None:
                done.append(work.remote_id)
    return resume, done


@asynccontextmanager
async def open_supervisor(
    provider: ImageProvider,
    settings: SupervisorSettings,
    *,
    store: JobStore,
    now: Callable[[], datetime] = _utcnow,
    uniform: Uniform = random.uniform,
    files: ImageFiles | None = None,
    capacity: Capacity | None = None,
    cluster: ClusterNode | None = None,
) -> AsyncIterator[Supervisor]:
    """Run a :class:`Supervisor` for the body of the ``async with``; stop it on exit.

    On entry the store's jobs are restored. On exit the supervisor stops admitting, every
    subscriber's wait ends, and every unfinished job is cancelled: left unfinished in a
    resumable store for the next start, else finalised (its subscribers get ``done``).
    """
    supervisor = Supervisor(
        provider,
        settings,
        now=now,
        uniform=uniform,
        store=store,
        files=files,
        capacity=capacity,
        cluster=cluster,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        try:
            yield supervisor
        finally:
            supervisor.begin_shutdown()
            nursery.cancel_scope.cancel()
