"""ImageWorker: one image, from the first attempt to its outcome."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

import attrs
import trio

from actors.capacity import FairCapacity
from actors.errors import ProviderError, TransientProviderError
from actors.files import ImageFiles
from actors.messages import AttemptStarted, ImageOutcome, ImageStatus, WorkerReport
from actors.providers.base import ImageProvider, ImageRequest
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
    capacity: FairCapacity
    retry: RetryPolicy
    attempt_timeout_s: float
    provider_cancel_s: float
    now: Callable[[], datetime]
    uniform: Uniform
    #: Keeps a copy of each image the provider hands out by URL (which may expire).
    files: ImageFiles | None = None


def _never() -> bool:
    return False


async def run_image_worker(
    index: int,
    *,
    context: WorkerContext,
    reports_send: trio.MemorySendChannel[WorkerReport],
    attempts_before: int = 0,
    keep_remote: Callable[[], bool] = _never,
) -> None:
    """Make image ``index`` of ``context.job_id`` and report how it went.

    Each attempt takes one token of the shared capacity (in the job's fair turn) and calls the
    provider under ``attempt_timeout_s``; time spent waiting for the token does not count.
    Transient failures and timeouts are retried after a backoff taken *without* holding a token;
    a permanent failure ends the image at once.

    A resumed image (after a restart) numbers its attempts on from ``attempts_before`` with a
    fresh retry budget.

    Concurrency: started with ``start_soon`` by its JobActor, whose state it never touches: it
    sends one ``AttemptStarted`` per attempt and a final ``ImageOutcome`` over its own clone of
    ``reports_send``, which it closes when it returns. Cancellation propagates, after asking the
    provider to stop remote work for the image (shielded, bounded by ``provider_cancel_s``)
    unless ``keep_remote()`` says the work is to be resumed by the next start of the service.
    """
    with reports_send:
        try:
            outcome = await _make_image(index, context, reports_send, attempts_before)
        except trio.Cancelled:
            if not keep_remote():
                with trio.move_on_after(context.provider_cancel_s, shield=True):
                    await _stop_remote_work(context, index)
            raise
        await reports_send.send(outcome)


async def _stop_remote_work(context: WorkerContext, index: int) -> None:
    """Best effort; callers shield it and bound it with ``provider_cancel_s``."""
    try:
        await context.provider.cancel(context.job_id, index)
    except Exception:
        logger.exception("job %s image %d: provider cancel failed", context.job_id, index)


async def _make_image(
    index: int,
    context: WorkerContext,
    reports_send: trio.MemorySendChannel[WorkerReport],
    attempts_before: int,
) -> ImageOutcome:
    retry = context.retry
    provider_s = 0.0
    failure: Exception = TransientProviderError("no attempt was made")
    attempt = tries = 0
    for tries in range(1, retry.attempts + 1):
        attempt = attempts_before + tries
        waited_from = trio.current_time()
        async with context.capacity.slot(context.job_id, priority=index):
            started = trio.current_time()
            report = AttemptStarted(
                index=index, attempt=attempt, at=context.now(), waited_s=started - waited_from
            )
            await reports_send.send(report)
            request = ImageRequest(
                job_id=context.job_id, index=index, prompt=context.prompt, attempt=attempt
            )
            result = await _call_provider(context, request)
            provider_s += trio.current_time() - started
        if isinstance(result, str):
            if context.files is not None:
                result = await context.files.keep(context.job_id, index, result)
            return ImageOutcome(
                index=index,
                status=ImageStatus.COMPLETED,
                url=result,
                error=None,
                attempts=attempt,
                finished_at=context.now(),
                provider_s=provider_s,
            )
        failure = result
        message = describe_failure(failure, context.attempt_timeout_s)
        if not is_retryable(failure):
            return _failed(index, attempt, context, message, provider_s)
        logger.info(
            "job %s image %d attempt %d failed: %s",
            context.job_id,
            index,
            attempt,
            message,
            extra={"job_id": context.job_id, "index": index, "attempt": attempt, "error": message},
        )
        if tries < retry.attempts:
            await trio.sleep(retry.delay(tries, failure, uniform=context.uniform))
    # Giving up: whatever the provider may still be doing for this image is not wanted.
    with trio.move_on_after(context.provider_cancel_s, shield=True):
        await _stop_remote_work(context, index)
    message = describe_failure(failure, context.attempt_timeout_s)
    return _failed(
        index, attempt, context, f"{message} (gave up after {tries} attempts)", provider_s
    )


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


def _failed(
    index: int, attempts: int, context: WorkerContext, error: str, provider_s: float
) -> ImageOutcome:
    return ImageOutcome(
        index=index,
        status=ImageStatus.FAILED,
        url=None,
        error=error or "provider error",
        attempts=attempts,
        finished_at=context.now(),
        provider_s=provider_s,
    )


def describe_failure(exc: BaseException, attempt_timeout_s: float) -> str:
    """Words for a user about why an attempt failed."""
    if isinstance(exc, trio.TooSlowError):
        return f"the provider did not answer within {attempt_timeout_s:g} s"
    return str(exc) or type(exc).__name__
