"""JobActor: one image-generation job."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial

import attrs
import trio

from actors.errors import StoreUnavailable
from actors.eventlog import EventLog
from actors.messages import (
    AttemptStarted,
    DoneEvent,
    ImageOutcome,
    ImageSnapshot,
    ImageStatus,
    JobEvent,
    JobSnapshot,
    JobStatus,
    ProgressEvent,
    WorkerReport,
)
from actors.providers.base import Commit
from actors.store.base import (
    AppendEvent,
    JobRecord,
    JobStore,
    Operation,
    PutImages,
    PutJob,
    SetCopy,
    SetRemote,
    StoredJob,
)
from actors.worker import WorkerContext, run_image_worker

logger = logging.getLogger(__name__)


@attrs.define(eq=False)
class _Image:
    index: int
    status: ImageStatus = ImageStatus.RUNNING
    url: str | None = None
    error: str | None = None
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    wait_s: float = 0.0
    provider_s: float = 0.0


@attrs.define(eq=False)
class JobCounters:
    """Service-wide running totals, owned by the Supervisor and bumped by job actors (sync)."""

    attempts: int = 0
    retries: int = 0
    completed: int = 0
    failed: int = 0
    #: Jobs ended by a bug of their own (logged with its traceback), not by their images.
    crashed: int = 0


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


#: While its store cannot write, a job waits (its events unpublished) and tries again this often.
STORE_RETRY_S = (0.1, 5.0)


def _restored_image(record: ImageSnapshot) -> _Image:
    return _Image(
        index=record.index,
        status=record.status,
        url=record.url,
        error=record.error,
        attempts=record.attempts,
        started_at=record.started_at,
        finished_at=record.finished_at,
        wait_s=record.wait_ms / 1000,
        provider_s=record.provider_ms / 1000,
    )


class JobActor:
    """One image-generation job: ``num_images`` workers, their state and the job's event log.

    Args:
        job_id: The job's id.
        owner: The user who submitted it.
        prompt: What to draw.
        num_images: How many images (one worker each).
        context: What the workers share (provider, capacity, retry policy, clocks).
        counters: Service-wide totals to bump (the Supervisor's).
        store: Where the job is kept.
        seq: The job's place in its owner's list (newest largest).
        idempotency_key: The client's key for this job, if it sent one.

    Concurrency: created and started by the Supervisor (``start_soon(job.run)``; its state and
    log exist from construction, so others may read them at once). Owns a nursery of image
    workers and the cancel scope that :meth:`cancel` trips; is the only writer of its state,
    its EventLog and its records in the store, folding worker reports in with the sync
    :meth:`_fold`. Write-ahead: a batch of reports is stored first and published to the log
    after (readers see the state from before the batch meanwhile), so a subscriber never sees an
    event a restart could lose; while the store cannot write, the job waits and tries again.
    Ends after every worker has finished or been cancelled, then stores and publishes ``done``.
    Cancelled from outside (the process stopping), it leaves a resumable store untouched, so the
    next start carries the job on, and with any other store it finalises synchronously. A bug
    anywhere in :meth:`run` ends this job alone (see there), never the supervisor's nursery.
    """

    def __init__(
        self,
        *,
        job_id: str,
        owner: str,
        prompt: str,
        num_images: int,
        context: WorkerContext,
        store: JobStore,
        counters: JobCounters | None = None,
        seq: int = 0,
        idempotency_key: str | None = None,
    ) -> None:
        self.job_id = job_id
        self.owner = owner
        self.prompt = prompt
        self.num_images = num_images
        self.seq = seq
        self.idempotency_key = idempotency_key
        self.log = EventLog()
        self._store = store
        self._context = context
        self._counters = counters or JobCounters()
        self._created_at = context.now()
        self._finished_at: datetime | None = None
        self._accepted = trio.current_time()
        self._ttfi_s: float | None = None
        self._total_s: float | None = None
        self._status = JobStatus.PENDING
        self._images = [_Image(index) for index in range(num_images)]
        self._dirty: set[int] = set()
        self._unpublished: list[JobEvent] = []
        #: Copies of completed images' outputs, stored with the images that name them.
        self._copies: list[SetCopy] = []
        self._frozen: JobSnapshot | None = None
        self._cancel_scope = trio.CancelScope()
        self._crashed = False
        self._stored = trio.Event()
        self._admission: Commit | None = None
        #: When the admission noted the first ``_admission_noted`` images' remote work as
        #: pending (a job this process admitted; None for one restored or taken over).
        self._pending_since: datetime | None = None
        #: How many images (the first ones) the admission noted.
        self._admission_noted = 0
        self._refused: StoreUnavailable | None = None
        self._finished = trio.Event()
        self._suspended = False
        #: Called (sync) with each event as it is published (a cluster node's event reader).
        self.on_publish: Callable[[JobEvent], None] | None = None

    @classmethod
    def restore(
        cls,
        stored: StoredJob,
        *,
        context: WorkerContext,
        store: JobStore,
        counters: JobCounters | None = None,
    ) -> JobActor:
        """The job as ``stored``: finished (read-only) or ready to :meth:`run` on from there."""
        record = stored.job
        job = cls(
            job_id=record.job_id,
            owner=record.owner,
            prompt=record.prompt,
            num_images=record.num_images,
            context=context,
            counters=counters,
            store=store,
            seq=record.seq,
            idempotency_key=record.idempotency_key,
        )
        job._created_at = record.created_at
        age_s = max(0.0, (context.now() - record.created_at).total_seconds())
        job._accepted = trio.current_time() - age_s
        job._status = record.status
        job._finished_at = record.finished_at
        job._ttfi_s = None if record.ttfi_ms is None else record.ttfi_ms / 1000
        job._total_s = None if record.total_ms is None else record.total_ms / 1000
        for image in stored.images:
            job._images[image.index] = _restored_image(image)
        for event in stored.events:
            job.log.append(event)
        job._stored.set()
        if record.status.finished:
            job.log.close()
            job._finished.set()
        return job

    # --- sync API ---------------------------------------------------------------------------

    @property
    def status(self) -> JobStatus:
        return self._status

    @property
    def finished_at(self) -> datetime | None:
        return self._finished_at

    @property
    def stored(self) -> bool:
        """Whether the job is in the store (new jobs are not until their first write lands)."""
        return self._stored.is_set() and self._refused is None

    @property
    def refused(self) -> bool:
        """Whether the store refused the new job (it never ran and is to be forgotten)."""
        return self._refused is not None

    @property
    def unfinished_images(self) -> int:
        return sum(1 for image in self._images if image.status is ImageStatus.RUNNING)

    def cancel(self) -> None:
        """Stop the job: unfinished images end ``canceled``. No effect on a finished job."""
        self._cancel_scope.cancel()

    @property
    def suspended(self) -> bool:
        """Whether the job stopped here unfinished, to be carried on elsewhere (or later)."""
        return self._suspended

    def suspend(self) -> None:
        """Stop running the job here without ending it: nothing more of it is written or
        published, and its images' remote work goes on, for the node that carries it on (a
        cluster handing it over, or another node that took its lease). No effect once finished.
        """
        if not self._status.finished:
            self._suspended = True
            self._cancel_scope.cancel()

    def snapshot(self) -> JobSnapshot:
        """The job as stored: while a write is pending, the state from before it."""
        if self._frozen is not None:
            return self._frozen
        return self._build_snapshot()

    async def wait_stored(self) -> None:
        """Return once the new job is in the store.

        Raises:
            StoreUnavailable: The store refused it; the job never ran.
        """
        await self._stored.wait()
        if self._refused is not None:
            raise self._refused

    async def wait_finished(self) -> None:
        await self._finished.wait()

    # --- the actor --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the job to its end: every worker finished, ``done`` stored and published.

        The job's actor boundary: a bug anywhere in here (its first write, a fold, a store write,
        the tail) ends this job, logged and counted, with its unfinished images failed and
        ``done`` published, and never reaches the supervisor. Only cancellation leaves: from
        outside (the process stopping) the job stays as stored in a resumable store, and any
        other store is told its end synchronously.
        """
        task_status.started()  # its state and log exist from construction: readable at once
        settled = False
        try:
            try:
                await self._work()
            except Exception:
                logger.exception("job %s crashed", self.job_id, extra={"job_id": self.job_id})
                self._crashed = True
                if not self._stored.is_set():
                    self._refuse(StoreUnavailable("the job could not be stored"))
            if self._suspended:
                return  # handed over: the job is carried on elsewhere, from what is stored
            if self._refused is None:
                self._conclude()
                await self._flush()
            settled = True
        except Exception:
            # The tail itself failed (a store write, or ending the job): end it without the store.
            logger.exception("job %s could not end cleanly", self.job_id)
            self._crashed = True
            self._end_now()
            settled = True
        finally:
            # Unsettled: cancelled from outside (the job's own scope ends at its ``with``), so
            # the process is stopping. A resumable store keeps the job as it is for the next
            # start; any other store is told the end now, synchronously.
            if not settled and not self._store.resumable:
                self._end_now()

    async def _work(self) -> None:
        """Store the new job, then run its workers and fold their reports in until they end."""
        if not self._stored.is_set():
            await self._store_new()
        if self._refused is not None:
            return
        running = [image for image in self._images if image.status is ImageStatus.RUNNING]
        # Room for every worker's report: a worker never waits while the job stores a batch.
        reports_send, reports_recv = trio.open_memory_channel[WorkerReport](len(running) + 1)
        with self._cancel_scope:
            async with trio.open_nursery() as nursery:
                with reports_send:
                    for image in running:
                        worker = partial(
                            run_image_worker,
                            image.index,
                            context=self._context,
                            reports_send=reports_send.clone(),
                            attempts_before=image.attempts,
                            keep_remote=self._keeps_remote_work,
                            pending_since=(
                                self._pending_since if image.index < self._admission_noted else None
                            ),
                        )
                        name = f"image {self.job_id}/{image.index}"
                        nursery.start_soon(self._crashes_noted, worker, name=name)
                with reports_recv:
                    await self._crashes_noted(partial(self._fold_reports, reports_recv))

    async def _fold_reports(self, reports_recv: trio.MemoryReceiveChannel[WorkerReport]) -> None:
        async for report in reports_recv:
            await self._take(report, reports_recv)

    async def _crashes_noted(self, task: Callable[[], Awaitable[None]]) -> None:
        """Run ``task``, noting a crash before the nursery cancels the other workers (so that
        they stop their remote work rather than leave it for the next start)."""
        try:
            await task()
        except Exception:
            self._crashed = True
            raise

    def _keeps_remote_work(self) -> bool:
        """Whether a cancelled worker leaves its remote work running (for the next start): only
        when the process stops, not when the job is cancelled or has crashed."""
        if self._suspended:
            return True
        return self._store.resumable and not self._cancel_scope.cancel_called and not self._crashed

    def _end_now(self) -> None:
        """Sync and never raising: end the job, queue its last write (not waited for: the store
        may be what failed) and publish ``done``."""
        try:
            try:
                self._conclude()
            except Exception:
                logger.exception("job %s could not conclude", self.job_id)
                self._crashed = True
                self._force_end()
            try:
                self._store.write(*self._operations())
            except Exception:
                logger.exception("job %s: its last write failed", self.job_id)
            self._publish()
        except Exception:
            # Nothing more can be done right; at least no follower waits for an end forever.
            logger.exception("job %s could not publish its end", self.job_id)
            if not self._status.finished:
                self._status = JobStatus.FAILED
            self.log.close()
            self._finished.set()

    def admit(self) -> None:
        """Queue the new job's first write (sync; the supervisor calls it as it admits the job).

        A store that writes at once (memory) has the job stored before this returns. A store
        that fails on it with a bug, not ``StoreUnavailable``, refuses the job as one that cannot
        write does (logged and counted as a crash): the job never runs.
        """
        # The images that can start at once (the capacity free now; a job's images take it in
        # index order) may have remote work from now on: noted with the job itself, so that a
        # provider that notes a create before sending it need not for their first (see
        # ``ImageRequest.pending_since``) and the first image is made sooner. Only those: a
        # restart reconciles every pending note against the provider's list. On the wall
        # clock, as the provider's own notes are.
        capacity = self._context.capacity.statistics()
        room = max(0, capacity.total - capacity.in_use - capacity.waiting)
        self._pending_since = datetime.now(UTC)
        self._admission_noted = min(room, self.num_images)
        notes = (
            SetRemote(self.job_id, index, None, self._pending_since)
            for index in range(self._admission_noted)
        )
        try:
            self._admission = self._store.write(*self.first_write(), *notes)
        except Exception:
            logger.exception("job %s: its first write crashed", self.job_id)
            self._counters.crashed += 1
            self._admission = Commit.settled_with(
                StoreUnavailable("the store failed to take the job")
            )
        if self._admission.settled:
            self._settle_admission()

    def stored_by_admission(self) -> None:
        """The new job's :meth:`first_write` landed through its admission (a cluster node's
        script call, not this actor's write): it runs on from there as if restored (sync)."""
        self._stored.set()

    def first_write(self) -> tuple[Operation, ...]:
        """The new job's first write: its record and its images (sync)."""
        images = tuple(self._image_snapshot(image) for image in self._images)
        return (PutJob(self._job_record()), PutImages(self.job_id, images))

    def _settle_admission(self) -> None:
        commit = self._admission
        assert commit is not None
        if not commit.settled:
            self._refuse(StoreUnavailable("the store did not answer in time"))
            return
        try:
            commit.raise_error()
        except StoreUnavailable as exc:
            self._refuse(exc)
            return
        self._stored.set()

    def _refuse(self, error: StoreUnavailable) -> None:
        """The new job is not in the store: it never runs, and is to be forgotten."""
        self._refused = error
        self.log.close()  # anyone following it is told it ended
        self._stored.set()

    async def _store_new(self) -> None:
        """Wait for the new job's first write (answering :meth:`wait_stored`)."""
        if self._admission is None:
            self.admit()
        assert self._admission is not None
        if not self._stored.is_set():
            # Shielded: the request that submitted the job must learn how it went.
            with trio.move_on_after(STORE_RETRY_S[1] * 2, shield=True):
                with contextlib.suppress(StoreUnavailable):
                    await self._admission.wait()
            self._settle_admission()

    async def _take(
        self, first: WorkerReport, reports_recv: trio.MemoryReceiveChannel[WorkerReport]
    ) -> None:
        """Fold ``first`` and every report already waiting, store them, then publish."""
        self._fold(first)
        while True:
            try:
                report = reports_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            self._fold(report)
        if self._unpublished:
            await self._flush()
        elif self._dirty:
            # Attempt bookkeeping only: stored without waiting, nothing to publish (the images
            # stay dirty, so the next write that is waited for carries them too).
            self._store.write(*self._operations())

    def _fold(self, report: WorkerReport) -> None:
        image = self._images[report.index]
        if image.status is not ImageStatus.RUNNING:
            return
        if isinstance(report, AttemptStarted):
            self._counters.attempts += 1
            self._counters.retries += report.attempt > 1
            image.attempts = report.attempt
            image.wait_s += report.waited_s
            if image.started_at is None:
                image.started_at = report.at
            if self._status is JobStatus.PENDING:
                self._status = JobStatus.RUNNING
            self._dirty.add(image.index)
            return
        self._settle(image, report)
        self._counters.completed += report.status is ImageStatus.COMPLETED
        self._counters.failed += report.status is ImageStatus.FAILED
        if report.status is ImageStatus.COMPLETED and self._ttfi_s is None:
            self._ttfi_s = trio.current_time() - self._accepted

    def _settle(self, image: _Image, outcome: ImageOutcome) -> None:
        if self._frozen is None:
            self._frozen = self._build_snapshot()
        logger.info(
            "job %s image %d %s after %d attempts",
            self.job_id,
            image.index,
            outcome.status.value,
            outcome.attempts,
            extra={
                "job_id": self.job_id,
                "index": image.index,
                "status": outcome.status.value,
                "attempts": outcome.attempts,
                "provider_ms": _ms(outcome.provider_s),
                "wait_ms": _ms(image.wait_s),
                "error": outcome.error,
            },
        )
        image.status = outcome.status
        image.url = outcome.url
        image.error = outcome.error
        image.attempts = outcome.attempts
        image.finished_at = outcome.finished_at
        image.provider_s = outcome.provider_s
        self._dirty.add(image.index)
        if outcome.copy is not None:
            self._copies.append(SetCopy(outcome.copy))
        self._unpublished.append(self._progress_event(image, outcome.finished_at))

    def _progress_event(self, image: _Image, finished_at: datetime) -> ProgressEvent:
        return ProgressEvent(
            id=self._new_event_id(),
            index=image.index,
            status=image.status,
            url=image.url,
            error=image.error,
            attempts=image.attempts,
            started_at=image.started_at,
            finished_at=finished_at,
        )

    def _new_event_id(self) -> int:
        """The id after every event published or waiting to be."""
        return self.log.next_id + len(self._unpublished)

    def _operations(self) -> list[Operation]:
        """Everything changed since the last write (upserts: writing twice is harmless)."""
        images = tuple(self._image_snapshot(self._images[index]) for index in sorted(self._dirty))
        operations: list[Operation] = [PutJob(self._job_record()), PutImages(self.job_id, images)]
        operations.extend(self._copies)
        operations.extend(AppendEvent(self.job_id, event) for event in self._unpublished)
        return operations

    async def _flush(self) -> None:
        """Store what changed, trying again while the store fails; then publish its events."""
        operations = self._operations()
        delay = STORE_RETRY_S[0]
        while True:
            try:
                await self._store.write(*operations).wait()
                break
            except StoreUnavailable as exc:
                if exc.fenced:
                    # Another node took the job over: stop here, writing and publishing nothing.
                    logger.warning("job %s: %s; stopping here", self.job_id, exc)
                    self._suspended = True
                    self._cancel_scope.cancel()
                    return
                if exc.refused:
                    # The store works but will never take this write (a bug): the job goes
                    # on unstored rather than stall, and says so.
                    logger.error("job %s: the store refused its write: %s", self.job_id, exc)
                    break
                logger.warning(
                    "job %s waits for its store (again in %g s): %s",
                    self.job_id,
                    delay,
                    exc,
                    extra={"job_id": self.job_id, "error": str(exc)},
                )
            await trio.sleep(delay)
            delay = min(delay * 2, STORE_RETRY_S[1])
        self._dirty.clear()
        self._publish()

    def _publish(self) -> None:
        self._frozen = None
        for event in self._unpublished:
            self.log.append(event)
            if self.on_publish is not None:
                self.on_publish(event)
        self._unpublished.clear()
        # Behind the events that hand their names out: a copy's download, write and fsync
        # never delay the event.
        files = self._context.files
        for operation in self._copies:
            if files is not None:
                files.copy_behind(operation.copy)
        self._copies.clear()
        if self._status.finished and not self._finished.is_set():
            self.log.close()
            self._finished.set()
            self._counters.crashed += self._crashed
            snapshot = self._build_snapshot()
            logger.info(
                "job %s %s: %d completed, %d failed in %d ms",
                self.job_id,
                self._status.value,
                snapshot.count(ImageStatus.COMPLETED),
                snapshot.count(ImageStatus.FAILED),
                snapshot.total_ms or 0,
                extra={
                    "job_id": self.job_id,
                    "status": self._status.value,
                    "ttfi_ms": snapshot.ttfi_ms,
                    "total_ms": snapshot.total_ms,
                },
            )

    def _conclude(self) -> None:
        """Sync and idempotent: settle unfinished images, end the job, queue ``done``."""
        if self._status.finished:
            return
        end = self._context.now()
        leftover = ImageStatus.FAILED if self._crashed else ImageStatus.CANCELED
        reason = "internal error" if self._crashed else "canceled"
        for image in self._images:
            if image.status is ImageStatus.RUNNING:
                outcome = ImageOutcome(
                    index=image.index,
                    status=leftover,
                    url=None,
                    error=reason,
                    attempts=image.attempts,
                    finished_at=end,
                    provider_s=image.provider_s,
                )
                self._settle(image, outcome)
        if self._frozen is None:
            self._frozen = self._build_snapshot()
        self._end(end)

    def _force_end(self) -> None:
        """The least that ends a job whose :meth:`_conclude` failed (sync): its unfinished
        images fail and ``done`` is queued, from the job's own state only (no injected clock)."""
        end = self._created_at + timedelta(seconds=trio.current_time() - self._accepted)
        for image in self._images:
            if image.status is ImageStatus.RUNNING:
                image.status = ImageStatus.FAILED
                image.error = "internal error"
                image.finished_at = end
                self._dirty.add(image.index)
                self._unpublished.append(self._progress_event(image, end))
        self._end(end)

    def _end(self, end: datetime) -> None:
        """Every image has finished: the job's status, timings and ``done``."""
        self._status = self._final_status()
        self._total_s = trio.current_time() - self._accepted
        self._finished_at = end
        self._unpublished.append(
            DoneEvent(
                id=self._new_event_id(),
                status=self._status,
                total_ms=_ms(self._total_s),
                ttfi_ms=None if self._ttfi_s is None else _ms(self._ttfi_s),
                completed_count=self._count(ImageStatus.COMPLETED),
                failed_count=self._count(ImageStatus.FAILED),
            )
        )

    def _count(self, status: ImageStatus) -> int:
        return sum(1 for image in self._images if image.status is status)

    def _final_status(self) -> JobStatus:
        statuses = {image.status for image in self._images}
        if ImageStatus.CANCELED in statuses:
            return JobStatus.CANCELED
        if ImageStatus.COMPLETED in statuses:
            return JobStatus.COMPLETED
        return JobStatus.FAILED

    def _job_record(self) -> JobRecord:
        return JobRecord(
            job_id=self.job_id,
            seq=self.seq,
            owner=self.owner,
            prompt=self.prompt,
            num_images=self.num_images,
            idempotency_key=self.idempotency_key,
            status=self._status,
            created_at=self._created_at,
            finished_at=self._finished_at,
            ttfi_ms=None if self._ttfi_s is None else _ms(self._ttfi_s),
            total_ms=None if self._total_s is None else _ms(self._total_s),
        )

    def _build_snapshot(self) -> JobSnapshot:
        return JobSnapshot(
            job_id=self.job_id,
            owner=self.owner,
            prompt=self.prompt,
            num_images=self.num_images,
            status=self._status,
            created_at=self._created_at,
            ttfi_ms=None if self._ttfi_s is None else _ms(self._ttfi_s),
            total_ms=None if self._total_s is None else _ms(self._total_s),
            images=tuple(self._image_snapshot(image) for image in self._images),
        )

    def _image_snapshot(self, image: _Image) -> ImageSnapshot:
        return ImageSnapshot(
            id=f"{self.job_id}-{image.index}",
            index=image.index,
            status=image.status,
            url=image.url,
            error=image.error,
            attempts=image.attempts,
            started_at=image.started_at,
            finished_at=image.finished_at,
            wait_ms=_ms(image.wait_s),
            provider_ms=_ms(image.provider_s),
        )
