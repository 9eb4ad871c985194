"""Images from Replicate's predictions API, Trio-safe, frugal under faults.

Calls the HTTP API with our own ``httpx.AsyncClient`` (one connection pool per process) and
waits with Trio: the ``replicate`` package's async helpers sleep with asyncio and crash under
Trio (replicate 1.0.7 calls ``asyncio.sleep``), so only its webhook signature check is used here.

Latency: a prediction is created with ``Prefer: wait=N``, so Replicate answers the create the
moment the image exists; past that window it is polled at a short, fixed interval, or, with
webhooks configured, woken by Replicate's ``completed`` webhook (polling then stays as a slow
fallback so a lost webhook never strands an image).

Billing: every image is remembered with its prediction id from the moment Replicate gives one,
so a retry (after an attempt timeout, a poll failure, a restart of the attempt) continues that
prediction instead of creating another. A create that may have created something (5xx, a
connection lost after sending) is reconciled against Replicate's list of recent predictions
before anything is created again; only a create that certainly created nothing is repeated.

Restarts: with a journal (the job store), every image's prediction id is noted the moment it
is known, and a create is noted as pending *before* it is sent; the next start of the service
resumes the first by polling and reconciles the second against the list, so neither a restart
nor a ``kill -9`` in the middle of a create leads to a second prediction for an image.

Rate: creates pass a process-wide pacer that stays under Replicate's documented 600 creates per
minute, halves its rate and pauses for ``Retry-After`` when Replicate answers 429, and recovers
additively with every accepted create (AIMD).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import httpx
import trio
from replicate.webhook import Webhooks, WebhookSigningSecret

from actors.errors import (
    PermanentProviderError,
    StoreUnavailable,
    TransientProviderError,
    WebhookRejected,
)
from actors.providers.base import ImageRequest, ProviderStatistics, RemoteJournal
from actors.providers.pacing import CreatePacer
from actors.providers.replicate_api import (
    TERMINAL,
    Answer,
    call,
    finished,
    first_url,
    parse_time,
    permanent,
)
from actors.providers.replicate_settings import (
    DEFAULT_BASE_URL,
    DEFAULT_MODEL,
    ModelRef,
    ReplicateSettings,
    SettingsProblem,
)
from actors.store.base import Commit, RemoteWork
from actors.store.journal import NullJournal

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MODEL",
    "CreatePacer",
    "ModelRef",
    "ReplicateProvider",
    "ReplicateSettings",
    "SettingsProblem",
    "open_replicate_provider",
]

logger = logging.getLogger(__name__)

#: A Retry-After longer than this is capped: the attempt timeout bounds the wait anyway.
MAX_RETRY_AFTER_S = 60.0
#: Polls that fail (5xx, 429, network) back off up to this long between tries.
MAX_POLL_BACKOFF_S = 5.0
#: How far back (against Replicate's clock) a reconciled prediction may have been created.
RECONCILE_SKEW = timedelta(seconds=30)
RECONCILE_PAGES = 5
#: Prediction ids this process has given to an image, remembered so that reconciling never
#: hands one prediction to two images (bounded: reconciling only looks at recent predictions).
MAX_REMEMBERED_PREDICTIONS = 10_000
#: Terminal webhooks that arrive before their create's answer (``Prefer: wait`` races them).
MAX_EARLY_WEBHOOKS = 1_000


@attrs.define(eq=False)
class _Tracked:
    """A prediction some image is waiting for; a webhook may complete it."""

    prediction_id: str
    changed: trio.Event = attrs.Factory(trio.Event)
    latest: Mapping[str, Any] | None = None


@attrs.define(eq=False)
class _Counters:
    creates: int = 0
    predictions: int = 0
    images: int = 0
    resumed: int = 0
    reconciled: int = 0
    swapped: int = 0
    polls: int = 0
    webhooks: int = 0
    failed_predictions: int = 0
    cancels: int = 0


class ReplicateProvider:
    """Images from Replicate, one prediction per image.

    Concurrency: opened once per process with :func:`open_replicate_provider`, which owns the
    ``httpx.AsyncClient``; any number of workers call :meth:`generate` and :meth:`cancel` at
    once. State (which image waits for which prediction) lives here and is touched only on the
    Trio thread; entries are dropped when an image finishes or is cancelled. The same state is
    noted in ``journal``: a create is sent only once its pending note is stored, and an image
    waits for its prediction id's note before it polls.
    """

    name = "replicate"

    def __init__(
        self,
        settings: ReplicateSettings,
        client: httpx.AsyncClient,
        *,
        journal: RemoteJournal | None = None,
    ) -> None:
        self.settings = settings
        self.pacer = CreatePacer()
        self._client = client
        self._journal: RemoteJournal = journal or NullJournal()
        self._images: dict[tuple[str, int], str] = {}
        self._unsure: dict[tuple[str, int], tuple[dict[str, object], datetime]] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._claimed: dict[str, None] = {}  # insertion-ordered, bounded
        self._early: dict[str, Mapping[str, Any]] = {}  # insertion-ordered, bounded
        self._notes: dict[tuple[str, int], Commit] = {}  # prediction ids being stored
        self._counters = _Counters()
        self._multi_output_warned = False

    # --- the ImageProvider protocol ---------------------------------------------------------

    async def generate(self, request: ImageRequest) -> str:
        key = (request.job_id, request.index)
        prediction_id = self._images.get(key)
        check_now = True
        if prediction_id is None:
            prediction, answered = await self._create_once(key, request.prompt)
            prediction_id = str(prediction["id"])
            await self._noted(key)
            if answered and finished(prediction, sync_answer=True):
                return self._result(key, prediction)
            # A create's own answer is fresh; a prediction adopted from the list is checked now.
            check_now = not answered
        else:
            self._counters.resumed += 1
        prediction = await self._wait_untilfinished(prediction_id, check_now=check_now)
        return self._result(key, prediction)

    async def cancel(self, job_id: str, index: int) -> None:
        key = (job_id, index)
        unsure = self._unsure.pop(key, None)
        if unsure is not None and key not in self._images:
            try:
                adopted = await self._reconcile(*unsure)
            except TransientProviderError as exc:
                logger.warning("replicate: cannot find a prediction to cancel: %s", exc)
                adopted = None
            if adopted is not None:
                self._adopt(key, adopted)
        self._notes.pop(key, None)  # stored or not, the cancel is what matters now
        prediction_id = self._images.pop(key, None)
        if prediction_id is None:
            await trio.lowlevel.checkpoint()
            return
        self._tracked.pop(prediction_id, None)
        self._counters.cancels += 1
        try:
            await self._call("POST", f"/v1/predictions/{prediction_id}/cancel")
        except (Answer, httpx.TransportError) as exc:
            logger.warning("replicate: cancel of %s failed: %s", prediction_id, exc)

    def statistics(self) -> ProviderStatistics:
        counters = self._counters
        return {
            "model": str(self.settings.model),
            "webhooks": self.settings.webhooks,
            "creates": counters.creates,
            "predictions": counters.predictions,
            "images": counters.images,
            "resumed": counters.resumed,
            "reconciled": counters.reconciled,
            "swapped": counters.swapped,
            "polls": counters.polls,
            "webhooks_received": counters.webhooks,
            "failed_predictions": counters.failed_predictions,
            "cancels": counters.cancels,
            "throttled": self.pacer.throttles,
            "create_rate_per_s": round(self.pacer.rate, 3),
            "in_flight": len(self._images),
        }

    def resume_remote_work(self, work: Sequence[RemoteWork], finished: Sequence[str]) -> None:
        """Take up predictions (and unanswered creates) an earlier process journaled; the
        ``finished`` predictions served their images and are never adopted by reconciling."""
        for prediction_id in finished:
            self._claim(prediction_id)
        for item in work:
            key = (item.job_id, item.index)
            if item.remote_id is not None:
                self._images[key] = item.remote_id
                self._claim(item.remote_id)
            elif item.pending_since is not None:
                self._unsure[key] = (self._create_body(item.prompt), item.pending_since)
        if work:
            logger.info("replicate: resuming %d images of an earlier run", len(work))

    # --- webhooks ---------------------------------------------------------------------------

    @property
    def webhooks_enabled(self) -> bool:
        return self.settings.webhooks

    def receive_webhook(self, headers: Mapping[str, str], body: bytes) -> None:
        """Check a webhook's signature and wake the image waiting for its prediction.

        Raises:
            WebhookRejected: Bad signature, stale timestamp, or malformed; nothing changed.
        """
        secret = self.settings.webhook_secret
        if secret is None:
            raise WebhookRejected("webhooks are not configured")
        try:
            text = body.decode("utf-8")
            Webhooks.validate(
                headers=dict(headers),
                body=text,
                secret=WebhookSigningSecret(key=secret),
                tolerance=self.settings.webhook_tolerance_s,
            )
            prediction = json.loads(text)
        except ValueError as exc:  # every validation error, bad base64 and bad JSON included
            raise WebhookRejected(str(exc) or type(exc).__name__) from None
        if not isinstance(prediction, dict) or not isinstance(prediction.get("id"), str):
            raise WebhookRejected("the body is not a prediction")
        self._counters.webhooks += 1
        if prediction.get("status") not in TERMINAL:
            return
        tracked = self._tracked.get(prediction["id"])
        if tracked is None:
            # Perhaps its create has not answered yet: keep it for a while, bounded.
            self._early[prediction["id"]] = prediction
            if len(self._early) > MAX_EARLY_WEBHOOKS:
                del self._early[next(iter(self._early))]
        elif tracked.latest is None:  # else a duplicate after the terminal one
            tracked.latest = prediction
            tracked.changed.set()

    # --- creating ---------------------------------------------------------------------------

    async def _create_once(
        self, key: tuple[str, int], prompt: str
    ) -> tuple[Mapping[str, Any], bool]:
        """The image's prediction, and whether it is the create's own answer (else adopted)."""
        body = self._create_body(prompt)
        unsure = self._unsure.get(key)
        if unsure is not None:
            # An earlier create may have created a prediction: find it before making another.
            adopted = await self._reconcile(*unsure)
            del self._unsure[key]
            if adopted is not None:
                return self._adopt(key, adopted), False
        while True:
            await self.pacer.acquire()
            since = datetime.now(UTC)
            # Until Replicate answers, this image may or may not have a prediction: an attempt
            # timeout, a cancel or a restart in the middle of the create must not lead to a
            # second one. So the pending create is in the journal before it is sent.
            self._unsure[key] = (body, since)
            try:
                await self._note(key, None, since).wait()
            except StoreUnavailable as exc:
                del self._unsure[key]
                raise TransientProviderError(f"cannot note the create first: {exc}") from None
            prediction, unsure_why = await self._try_create(key, body)
            if unsure_why is not None:
                return await self._after_unsure_create(key, body, since, unsure_why), False
            if prediction is None:
                continue  # throttled: the pacer now waits out Retry-After for every create
            self.pacer.accepted()
            if prediction.get("id") not in self._claimed:
                return self._adopt(key, prediction), True
            # While this create was held open (Prefer: wait), another image reconciling an
            # unsure create of the same input took its prediction. Inputs being equal, the
            # images are interchangeable: take that image's orphan if it made one, else create
            # again. Either way every prediction serves exactly one image.
            self._counters.swapped += 1
            try:
                orphan = await self._reconcile(body, since)
            except TransientProviderError:
                orphan = None
            if orphan is not None:
                return self._adopt(key, orphan), False

    async def _try_create(
        self, key: tuple[str, int], body: dict[str, object]
    ) -> tuple[Mapping[str, Any] | None, str | None]:
        """One create: its prediction, or ``None`` when throttled, or why it is unsure.

        Raises:
            PermanentProviderError: Replicate refused (nothing was created).
            TransientProviderError: Replicate could not be reached (nothing was sent).
        """
        try:
            prediction = await self._post_create(body)
        except Answer as exc:
            if exc.status >= 500:
                return None, exc.detail
            self._settle_nothing(key)  # Replicate said no: nothing was created
            if exc.status != 429:
                raise permanent(exc) from None
            # Backpressure, not a failure of the image: slow every create, then go on.
            self.pacer.throttled(min(exc.retry_after_s or 1.0, MAX_RETRY_AFTER_S))
            return None, None
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self._settle_nothing(key)  # the request never left
            raise TransientProviderError(f"cannot reach Replicate ({exc!r})") from None
        except httpx.TransportError as exc:
            return None, repr(exc)
        del self._unsure[key]
        return prediction, None

    def _create_body(self, prompt: str) -> dict[str, object]:
        settings = self.settings
        body = settings.model.create_body({**settings.model_input, "prompt": prompt})
        if settings.webhooks:
            body["webhook"] = settings.webhook_url
            body["webhook_events_filter"] = ["completed"]
        return body

    def _note(
        self, key: tuple[str, int], remote_id: str | None, pending_since: datetime | None
    ) -> Commit:
        return self._journal.note(key[0], key[1], remote_id=remote_id, pending_since=pending_since)

    async def _noted(self, key: tuple[str, int]) -> None:
        """Wait until the image's prediction id is stored, noting it again while the store
        fails: until then a restart could only find the prediction by reconciling."""
        delay = 0.1
        while (commit := self._notes.pop(key, None)) is not None:
            try:
                await commit.wait()
            except StoreUnavailable as exc:
                logger.warning("replicate: cannot note the prediction of %s yet: %s", key, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, MAX_POLL_BACKOFF_S)
                prediction_id = self._images.get(key)
                if prediction_id is not None and not exc.refused:
                    self._notes[key] = self._note(key, prediction_id, None)

    def _settle_nothing(self, key: tuple[str, int]) -> None:
        """The image's pending create certainly created nothing."""
        del self._unsure[key]
        self._note(key, None, None)

    async def _post_create(self, body: dict[str, object]) -> Mapping[str, Any]:
        self._counters.creates += 1
        wait_s = self.settings.wait_s
        return await self._call(
            "POST",
            self.settings.model.create_path,
            json_body=body,
            headers={"Prefer": f"wait={wait_s}"},
            read_timeout_s=wait_s + self.settings.request_timeout_s,
        )

    async def _after_unsure_create(
        self, key: tuple[str, int], body: dict[str, object], since: datetime, detail: str
    ) -> Mapping[str, Any]:
        adopted = await self._reconcile(body, since)
        if adopted is not None:
            del self._unsure[key]
            return self._adopt(key, adopted)
        raise TransientProviderError(f"Replicate failed to create the prediction: {detail}")

    async def _reconcile(
        self, body: Mapping[str, object], since: datetime
    ) -> Mapping[str, Any] | None:
        """A recent prediction for exactly this input that no image has claimed yet.

        Raises:
            TransientProviderError: The list cannot be read now (the image stays unsure).
        """
        claimed = self._claimed
        path: str | None = "/v1/predictions"
        horizon = since - RECONCILE_SKEW
        for _ in range(RECONCILE_PAGES):
            if path is None:
                break
            try:
                page = await self._call("GET", path)
            except (Answer, httpx.TransportError) as exc:
                raise TransientProviderError(
                    f"Replicate failed to create the prediction, and its list cannot be read "
                    f"to check ({exc})"
                ) from None
            results: list[Mapping[str, Any]] = page.get("results") or []
            for prediction in results:
                created = parse_time(prediction.get("created_at"))
                if created is not None and created < horizon:
                    return None
                if prediction.get("id") not in claimed and prediction.get("input") == body["input"]:
                    # Taken as listed, with no await before the caller claims it: two images
                    # reconciling at once must not both take it.
                    self._counters.reconciled += 1
                    logger.info("replicate: adopted %s after an unsure create", prediction["id"])
                    return prediction
            path = page.get("next")
        return None

    def _adopt(self, key: tuple[str, int], prediction: Mapping[str, Any]) -> Mapping[str, Any]:
        prediction_id = prediction.get("id")
        if not isinstance(prediction_id, str):
            raise TransientProviderError("Replicate answered without a prediction id")
        self._counters.predictions += 1
        self._images[key] = prediction_id
        self._notes[key] = self._note(key, prediction_id, None)
        logger.info(
            "job %s image %d: prediction %s",
            key[0],
            key[1],
            prediction_id,
            extra={"job_id": key[0], "index": key[1], "prediction_id": prediction_id},
        )
        self._claim(prediction_id)
        return prediction

    def _claim(self, prediction_id: str) -> None:
        self._claimed[prediction_id] = None
        if len(self._claimed) > MAX_REMEMBERED_PREDICTIONS:
            del self._claimed[next(iter(self._claimed))]

    # --- waiting ----------------------------------------------------------------------------

    async def _wait_untilfinished(
        self, prediction_id: str, *, check_now: bool
    ) -> Mapping[str, Any]:
        if check_now:
            prediction = await self._get(prediction_id)
            if finished(prediction, sync_answer=False):
                return prediction
        tracked = self._tracked.setdefault(prediction_id, _Tracked(prediction_id))
        tracked.latest = self._early.pop(prediction_id, None)
        interval = (
            self.settings.webhook_poll_interval_s
            if self.settings.webhooks
            else self.settings.poll_interval_s
        )
        try:
            while (latest := tracked.latest) is None:
                with trio.move_on_after(interval):
                    await tracked.changed.wait()
                if tracked.changed.is_set():
                    continue  # a webhook brought the result
                prediction = await self._get(prediction_id)
                if finished(prediction, sync_answer=False):
                    return prediction
            await trio.lowlevel.checkpoint()
            return latest
        finally:
            self._tracked.pop(prediction_id, None)

    async def _get(self, prediction_id: str) -> Mapping[str, Any]:
        """The prediction now; retries 429, 5xx and network errors with a bounded backoff."""
        delay = self.settings.poll_interval_s
        while True:
            self._counters.polls += 1
            try:
                return await self._call("GET", f"/v1/predictions/{prediction_id}")
            except Answer as exc:
                if exc.status != 429 and exc.status < 500:
                    raise permanent(exc) from None
                wait = exc.retry_after_s if exc.retry_after_s is not None else delay
            except httpx.TransportError as exc:
                logger.info("replicate: polling %s failed: %r", prediction_id, exc)
                wait = delay
            await trio.sleep(min(wait, MAX_RETRY_AFTER_S))
            delay = min(delay * 2, MAX_POLL_BACKOFF_S)

    # --- results ----------------------------------------------------------------------------

    def _result(self, key: tuple[str, int], prediction: Mapping[str, Any]) -> str:
        status = prediction.get("status")
        del self._images[key]
        url = first_url(prediction.get("output"))
        if status in ("succeeded", "processing") and url is not None:
            self._counters.images += 1
            self._warn_if_multiple(prediction.get("output"))
            return url
        if status == "succeeded":
            raise PermanentProviderError("Replicate returned no image (it may have been filtered)")
        if status == "aborted":
            raise TransientProviderError("Replicate aborted the prediction before it started")
        if status == "canceled":
            raise PermanentProviderError("the prediction was canceled at Replicate")
        self._counters.failed_predictions += 1
        error = prediction.get("error")
        raise PermanentProviderError(str(error) if error else "the prediction failed at Replicate")

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: object = None,
        headers: Mapping[str, str] | None = None,
        read_timeout_s: float | None = None,
    ) -> Mapping[str, Any]:
        return await call(
            self._client,
            method,
            path,
            json_body=json_body,
            headers=headers,
            request_timeout_s=self.settings.request_timeout_s,
            read_timeout_s=read_timeout_s,
        )

    def _warn_if_multiple(self, output: object) -> None:
        if isinstance(output, list) and len(output) > 1 and not self._multi_output_warned:
            self._multi_output_warned = True
            logger.warning(
                "replicate: the model returned %d images per prediction; one is used per image. "
                "Set num_outputs to 1 in REPLICATE_INPUT to stop paying for the others.",
                len(output),
            )

    # --- HTTP -------------------------------------------------------------------------------


@asynccontextmanager
async def open_replicate_provider(
    settings: ReplicateSettings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    journal: RemoteJournal | None = None,
) -> AsyncIterator[ReplicateProvider]:
    """A :class:`ReplicateProvider` with its connection pool, closed on exit."""
    headers = {
        "Authorization": f"Bearer {settings.api_token}",
        "User-Agent": "imagegen-trio",
    }
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
    async with httpx.AsyncClient(
        base_url=settings.base_url, headers=headers, limits=limits, transport=transport
    ) as client:
        provider = ReplicateProvider(settings, client, journal=journal)
        logger.info(
            "replicate: model %s via POST %s%s (webhooks %s)",
            settings.model,
            settings.base_url,
            settings.model.create_path,
            "on" if settings.webhooks else "off",
        )
        yield provider
