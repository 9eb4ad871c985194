"""ImageWorker: one image, from the first attempt to its outcome."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

import attrs
import trio

from actors.capacity import Capacity
from actors.errors import NotStartedError, ProviderError
from actors.files import ImageFiles, KeptImage
from actors.messages import AttemptStarted, ImageOutcome, ImageStatus, WorkerReport
from actors.providers.base import ImageProvider, ImageRequest, PacedProvider
from actors.retry import RetryPolicy, Uniform, is_retryable

logger = logging.getLogger(__name__)


class InternalProviderError(ProviderError):
    """A provider raised something it should not have (a bug); the image fails with this."""


@attrs.frozen(kw_only=True)
class WorkerContext:
    """What every worker of a job shares."""

    job_id: str
    prompt: str
    provider: ImageProvider
    capacity: Capacity
    retry: RetryPolicy
    attempt_timeout_s: float
    provider_cancel_s: float
    now: Callable[[], datetime]
    uniform: Uniform
    #: Keeps a copy of each image the provider hands out by URL (which may expire).
    files: ImageFiles | None = None


def _never() -> bool:
    return False


@attrs.define(eq=False)
class _Progress:
    """How far an image's attempts have come: enough for an outcome whatever ends them."""

    attempt: int
    provider_s: float = 0.0


async def run_image_worker(
    index: int,
    *,
    context: WorkerContext,
    reports_send: trio.MemorySendChannel[WorkerReport],
    attempts_before: int = 0,
    keep_remote: Callable[[], bool] = _never,
    pending_since: datetime | None = None,
) -> None:
    """Make image ``index`` of ``context.job_id`` and report how it went.

    Each attempt takes one token of the shared capacity (in the job's fair turn) and calls the
    provider under ``attempt_timeout_s``; time spent waiting for the token does not count. A
    provider that paces its calls (:class:`~actors.providers.base.PacedProvider`) has its turn
    waited for the same way, before the attempt: no token held, no attempt used. Transient
    failures and timeouts are retried after a backoff taken *without* holding a token; a failure
    that started nothing at the provider (``NotStartedError``: a 429, a create that created
    nothing) is waited out the same way but uses no attempt, within a budget of its own
    (:class:`~actors.retry.RetryPolicy`); a permanent failure ends the image at once.

    A resumed image (after a restart) numbers its attempts on from ``attempts_before`` with a
    fresh retry budget. ``pending_since`` (set when the job's admission noted this image's
    remote work as pending) goes with the first request only: see
    :class:`~actors.providers.base.ImageRequest`.

    Concurrency: started with ``start_soon`` by its JobActor, whose state it never touches: it
    sends one ``AttemptStarted`` per attempt and a final ``ImageOutcome`` over its own clone of
    ``reports_send``, which it closes when it returns. No send that can block happens while it
    holds a capacity token: an ``AttemptStarted`` goes out in the slot only if the channel takes
    it at once, else after the token is released (its job may be waiting for its store, and the
    token is other jobs' capacity). It is an actor boundary: a bug in this image's path (the
    provider, the copy of its output, a report) fails this image as an "internal error", logged,
    and never its siblings. Every ending that will not be resumed, other than a completed image,
    asks the provider to stop and forget the image's remote work (shielded, bounded by
    ``provider_cancel_s``): a permanent failure, giving up, an internal error, and cancellation
    unless ``keep_remote()`` says the work is to be resumed by the next start of the service.
    """
    progress = _Progress(attempt=attempts_before)
    with reports_send:
        try:
            outcome = await _make_image(index, context, reports_send, progress, pending_since)
        except trio.Cancelled:
            if not keep_remote():
                with trio.move_on_after(context.provider_cancel_s, shield=True):
                    await _stop_remote_work(context, index)
            raise
        except Exception:
            # Actor boundary: whatever this image's path raised ends this image only.
            logger.exception(
                "job %s image %d: internal error",
                context.job_id,
                index,
                extra={"job_id": context.job_id, "index": index, "attempt": progress.attempt},
            )
            outcome = _failed(index, progress, context, "internal error")
        if outcome.status is not ImageStatus.COMPLETED:
            with trio.move_on_after(context.provider_cancel_s, shield=True):
                await _stop_remote_work(context, index)
        await reports_send.send(outcome)


async def _stop_remote_work(context: WorkerContext, index: int) -> None:
    """Ask the provider to stop (and forget) the image's remote work, best effort; callers
    shield it (a cancelled worker still asks) and bound it with ``provider_cancel_s``."""
    try:
        await context.provider.cancel(context.job_id, index)
    except Exception:
        logger.exception("job %s image %d: provider cancel failed", context.job_id, index)


async def _make_image(
    index: int,
    context: WorkerContext,
    reports_send: trio.MemorySendChannel[WorkerReport],
    progress: _Progress,
    pending_since: datetime | None,
) -> ImageOutcome:
    retry = context.retry
    counted = free = 0
    first_free_at: float | None = None
    while True:
        result = await _attempt(index, context, reports_send, progress, pending_since)
        # Only the first call may go on the admission's note: after it, the provider's own
        # notes (or its having forgotten the image) say what stands.
        pending_since = None
        if isinstance(result, str):
            kept = KeptImage(url=result)
            if context.files is not None:
                # Named at once, copied behind: the image is published without waiting for it.
                kept = context.files.keep(context.job_id, index, result)
            return ImageOutcome(
                index=index,
                status=ImageStatus.COMPLETED,
                url=kept.url,
                error=None,
                attempts=progress.attempt,
                finished_at=context.now(),
                provider_s=progress.provider_s,
                copy=kept.copy,
            )
        message = describe_failure(result, context.attempt_timeout_s)
        if not is_retryable(result):
            return _failed(index, progress, context, message)
        delay: float | None = None
        if isinstance(result, NotStartedError):
            now = trio.current_time()
            if first_free_at is None:
                first_free_at = now
            delay = retry.free_retry_delay(
                free + 1, now - first_free_at, result, uniform=context.uniform
            )
            free += delay is not None
        if delay is None:
            counted += 1
            if counted >= retry.attempts:
                spent = _count(counted, "attempt", "attempts")
                if free:
                    spent += " and " + _count(free, "free retry", "free retries")
                return _failed(index, progress, context, f"{message} (gave up after {spent})")
            delay = retry.delay(counted, result, uniform=context.uniform)
        logger.info(
            "job %s image %d attempt %d failed (%s): %s",
            context.job_id,
            index,
            progress.attempt,
            "nothing started" if isinstance(result, NotStartedError) else "counted",
            message,
            extra={
                "job_id": context.job_id,
                "index": index,
                "attempt": progress.attempt,
                "error": message,
            },
        )
        await trio.sleep(delay)


async def _attempt(
    index: int,
    context: WorkerContext,
    reports_send: trio.MemorySendChannel[WorkerReport],
    progress: _Progress,
    pending_since: datetime | None,
) -> str | Exception:
    """One provider call in a capacity slot: its URL, or the exception that ended it."""
    paced = context.provider if isinstance(context.provider, PacedProvider) else None
    waited_from = trio.current_time()
    while True:
        if paced is not None:
            # The provider's own pacing is waited for like capacity: without a token.
            await trio.sleep(await paced.turn_delay(context.job_id, index, book=False))
        async with context.capacity.slot(context.job_id, priority=index):
            if paced is not None and await paced.turn_delay(context.job_id, index, book=True) > 0:
                continue  # a turn is booked, not due yet: waited for without the token
            progress.attempt += 1
            started = trio.current_time()
            report = AttemptStarted(
                index=index,
                attempt=progress.attempt,
                at=context.now(),
                waited_s=started - waited_from,
            )
            late: AttemptStarted | None = None
            try:
                reports_send.send_nowait(report)
            except trio.WouldBlock:
                late = report  # the job is busy (storing a batch): not worth a token's wait
            request = ImageRequest(
                job_id=context.job_id,
                index=index,
                prompt=context.prompt,
                attempt=progress.attempt,
                pending_since=pending_since,
            )
            try:
                result = await _call_provider(context, request)
            finally:
                progress.provider_s += trio.current_time() - started
        if late is not None:
            await reports_send.send(late)
        return result


async def _call_provider(context: WorkerContext, request: ImageRequest) -> str | Exception:
    """The provider's URL, or the exception that ended the attempt (cancellation propagates)."""
    try:
        with trio.fail_after(context.attempt_timeout_s):
            return await context.provider.generate(request)
    except (ProviderError, trio.TooSlowError) as exc:
        return exc
    except Exception as exc:
        # The worker is an actor boundary: a provider bug fails this image, not the job.
        logger.exception("job %s image %d: provider raised", request.job_id, request.index)
        return InternalProviderError(f"internal error ({type(exc).__name__})")


def _failed(index: int, progress: _Progress, context: WorkerContext, error: str) -> ImageOutcome:
    return ImageOutcome(
        index=index,
        status=ImageStatus.FAILED,
        url=None,
        error=error or "provider error",
        attempts=progress.attempt,
        finished_at=context.now(),
        provider_s=progress.provider_s,
    )


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


def describe_failure(exc: BaseException, attempt_timeout_s: float) -> str:
    """Words for a user about why an attempt failed."""
    if isinstance(exc, trio.TooSlowError):
        return f"the provider did not answer within {attempt_timeout_s:g} s"
    return str(exc) or type(exc).__name__
