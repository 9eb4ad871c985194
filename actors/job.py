"""JobActor: one image-generation job."""

from __future__ import annotations

import logging
from datetime import datetime
from functools import partial

import attrs
import trio

from actors.eventlog import EventLog
from actors.messages import (
    AttemptStarted,
    DoneEvent,
    ImageOutcome,
    ImageSnapshot,
    ImageStatus,
    JobSnapshot,
    JobStatus,
    ProgressEvent,
    WorkerReport,
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


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


class JobActor:
    """One image-generation job: ``num_images`` workers, their state and the job's event log.

    Args:
        job_id: The job's id.
        owner: The user who submitted it.
        prompt: What to draw.
        num_images: How many images (one worker each).
        context: What the workers share (provider, capacity, retry policy, clocks).
        counters: Service-wide totals to bump (the Supervisor's).

    Concurrency: created and started by the Supervisor (``start_soon(job.run)``; its state and
    log exist from construction, so others may read them at once). Owns a nursery of image
    workers and the cancel scope that :meth:`cancel` trips; is the only writer of its state and
    its EventLog, folding worker reports in with the sync :meth:`_apply`. Ends after every worker
    has finished or been cancelled, then publishes ``done`` synchronously in ``finally`` (so also
    when an outer scope cancels it) and closes the log.
    """

    def __init__(
        self,
        *,
        job_id: str,
        owner: str,
        prompt: str,
        num_images: int,
        context: WorkerContext,
        counters: JobCounters | None = None,
    ) -> None:
        self.job_id = job_id
        self.owner = owner
        self.prompt = prompt
        self.num_images = num_images
        self.log = EventLog()
        self._context = context
        self._counters = counters or JobCounters()
        self._created_at = context.now()
        self._accepted = trio.current_time()
        self._ttfi_s: float | None = None
        self._total_s: float | None = None
        self._status = JobStatus.PENDING
        self._images = [_Image(index) for index in range(num_images)]
        self._cancel_scope = trio.CancelScope()
        self._crashed = False
        self._finished = trio.Event()

    # --- sync API ---------------------------------------------------------------------------

    @property
    def status(self) -> JobStatus:
        return self._status

    @property
    def unfinished_images(self) -> int:
        return sum(1 for image in self._images if image.status is ImageStatus.RUNNING)

    def cancel(self) -> None:
        """Stop the job: unfinished images end ``canceled``. No effect on a finished job."""
        self._cancel_scope.cancel()

    def snapshot(self) -> JobSnapshot:
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

    async def wait_finished(self) -> None:
        await self._finished.wait()

    # --- the actor --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        reports_send, reports_recv = trio.open_memory_channel[WorkerReport](0)
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    with reports_send:
                        for index in range(self.num_images):
                            worker = partial(
                                run_image_worker,
                                index,
                                context=self._context,
                                reports_send=reports_send.clone(),
                            )
                            nursery.start_soon(worker, name=f"image {self.job_id}/{index}")
                    task_status.started()
                    with reports_recv:
                        async for report in reports_recv:
                            self._apply(report)
        except Exception:
            # Actor boundary: a bug in one job must not take the supervisor (and server) down.
            logger.exception("job %s crashed", self.job_id)
            self._crashed = True
        finally:
            self._finish()

    def _apply(self, report: WorkerReport) -> None:
        image = self._images[report.index]
        if image.status is not ImageStatus.RUNNING:
            return
        now = trio.current_time()
        if isinstance(report, AttemptStarted):
            self._counters.attempts += 1
            self._counters.retries += report.attempt > 1
            image.attempts = report.attempt
            image.wait_s += report.waited_s
            if image.started_at is None:
                image.started_at = report.at
            if self._status is JobStatus.PENDING:
                self._status = JobStatus.RUNNING
            return
        self._record(image, report)
        self._counters.completed += report.status is ImageStatus.COMPLETED
        self._counters.failed += report.status is ImageStatus.FAILED
        if report.status is ImageStatus.COMPLETED and self._ttfi_s is None:
            self._ttfi_s = now - self._accepted

    def _record(self, image: _Image, outcome: ImageOutcome) -> None:
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
        self.log.append(
            ProgressEvent(
                id=self.log.next_id,
                index=image.index,
                status=image.status,
                url=image.url,
                error=image.error,
                attempts=image.attempts,
                started_at=image.started_at,
                finished_at=outcome.finished_at,
            )
        )

    def _finish(self) -> None:
        """Sync and idempotent: settle unfinished images, publish ``done``, close the log."""
        if self._finished.is_set():
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
                self._record(image, outcome)
        self._status = self._final_status()
        self._total_s = trio.current_time() - self._accepted
        counts = self.snapshot()
        self.log.append(
            DoneEvent(
                id=self.log.next_id,
                status=self._status,
                total_ms=_ms(self._total_s),
                ttfi_ms=counts.ttfi_ms,
                completed_count=counts.count(ImageStatus.COMPLETED),
                failed_count=counts.count(ImageStatus.FAILED),
            )
        )
        self.log.close()
        self._finished.set()
        logger.info(
            "job %s %s: %d completed, %d failed in %d ms",
            self.job_id,
            self._status.value,
            counts.count(ImageStatus.COMPLETED),
            counts.count(ImageStatus.FAILED),
            _ms(self._total_s),
            extra={
                "job_id": self.job_id,
                "status": self._status.value,
                "ttfi_ms": counts.ttfi_ms,
                "total_ms": _ms(self._total_s),
            },
        )

    def _final_status(self) -> JobStatus:
        statuses = {image.status for image in self._images}
        if ImageStatus.CANCELED in statuses:
            return JobStatus.CANCELED
        if ImageStatus.COMPLETED in statuses:
            return JobStatus.COMPLETED
        return JobStatus.FAILED

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
