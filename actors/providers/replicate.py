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
nor a ``kill -9`` in the middle of a create leads to a second prediction for an image. When the
create's own answer is the finished image (``Prefer: wait``), its id is noted in the same
transaction as the image itself (the journal's ``with_image``): until that is stored, the
pending note stands, and a restart finds the prediction by reconciling, as after any create
whose answer was lost.

Rate: creates pass a pace (:class:`~actors.providers.base.CreatePace`: the process's own, or one
shared by every process on a Redis) that stays under ``REPLICATE_MAX_CREATES_PER_MIN``
(Replicate's documented 600 creates per minute by default), halves its rate and pauses for
``Retry-After`` when Replicate answers 429, and recovers additively with every accepted create
(AIMD).

Waiting: an attempt holds one of the service's capacity tokens (``MAX_CONCURRENCY``) and runs
under the attempt timeout, so what it waits for decides what the token is spent on. Every wait
for a prediction that does not exist yet happens *outside* the attempt. The create pacer's turn
is waited for before the attempt starts (:meth:`ReplicateProvider.turn_delay`, booked in
order).
Otherwise the attempt raises ``NotStartedError`` with how long to wait, and the worker waits it
out without a token and without using an attempt: a 429 (and the pause it puts on every
create), a create that answered 5xx and created nothing, Replicate being unreachable, a store
that cannot note the pending create, a turn a 429 voided. The waits that remain inside are
for a prediction that exists at Replicate: polling it (and backing off when a poll fails) and
storing its id before it is polled. That prediction is real work in flight, which is what
``MAX_CONCURRENCY`` bounds: giving the token back would let another image start a prediction
beyond it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import attrs
import httpx
import trio
from replicate.webhook import Webhooks, WebhookSigningSecret

from actors.errors import (
    NotStartedError,
    PermanentProviderError,
    StoreUnavailable,
    TransientProviderError,
    WebhookRejected,
)
from actors.providers.base import (
    Commit,
    CreatePace,
    ImageRequest,
    NullJournal,
    ProviderStatistics,
    RemoteJournal,
    RemoteWork,
)
from actors.providers.pacing import CreatePacer, LocalPace
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
#: A job's admission note (the images that can start at once, pending from then on) stands for
#: an image's first create within this long of it; later, a create notes itself, so that a
#: restart's reconcile never looks back further than for a create of its own.
ADMITTED_NOTE_FRESH = timedelta(seconds=10)
#: Prediction ids this process has given to an image, remembered so that reconciling never
#: hands one prediction to two images (bounded: reconciling only looks at recent predictions).
MAX_REMEMBERED_PREDICTIONS = 10_000
#: Terminal webhooks that arrive before their create's answer (``Prefer: wait`` races them).
MAX_EARLY_WEBHOOKS = 1_000


#: Booked create times closer than this count as due (float rounding of the pacer's sums).
_DUE_EPSILON_S = 1e-6


@attrs.define(eq=False)
class _Image:
    """What this process holds for one image's remote work, owned by ``ReplicateProvider._work``
    and released with the entry (:meth:`ReplicateProvider._forget`)."""

    #: The image's prediction, once Replicate gave it (or it was adopted from the list).
    prediction_id: str | None = None
    #: A create that may have created a prediction (its body and when it was sent): looked up
    #: in the list of recent predictions before anything is created again.
    unsure: tuple[dict[str, object], datetime] | None = None
    #: What this image's own create answered with, while it is not yet taken for the image
    #: (its claim was cut short or failed): the next attempt claims it first, before it looks
    #: in the list or creates.
    answered: Mapping[str, Any] | None = None
    #: The note of ``prediction_id`` in the journal, until it is stored.
    note: Commit | None = None
    #: The pending note the job's admission stored (``ImageRequest.pending_since``), while no
    #: note of this process has replaced it: the first create may go without one of its own.
    admitted: datetime | None = None
    #: Whether ``admitted`` was taken from the image's first request.
    requested: bool = False
    #: When this image's next create may go, as booked with the pacer, and the pacer's 429 count
    #: at booking (a later 429 voids the booking).
    turn: tuple[float, int] | None = None


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
    once. Each image's state (its prediction, an unsure create, a pending note, its booked create
    time) is one ``_Image`` entry of ``_work``, touched only on the Trio thread and released in
    one place, :meth:`_forget`, on every ending that will not be resumed: :meth:`generate`
    returning or failing permanently with no prediction left running, or :meth:`cancel` (which
    the worker calls after every other ending: a permanent failure that may leave a prediction
    running, giving up, a cancelled job). Transient failures keep the entry for the next
    attempt. The same state is noted in ``journal``: a create is sent only once its pending note
    is stored, and an image waits for its prediction id's note before it polls (a finished
    answer's note is stored with the image instead).
    """

    name = "replicate"

    def __init__(
        self,
        settings: ReplicateSettings,
        client: httpx.AsyncClient,
        *,
        journal: RemoteJournal | None = None,
        pace: CreatePace | None = None,
    ) -> None:
        self.settings = settings
        self.pace: CreatePace = pace or LocalPace(max_rate=settings.max_creates_per_min / 60)
        self._client = client
        self._journal: RemoteJournal = journal or NullJournal()
        self._work: dict[tuple[str, int], _Image] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._claimed: dict[str, None] = {}  # insertion-ordered, bounded
        self._early: dict[str, Mapping[str, Any]] = {}  # insertion-ordered, bounded
        self._counters = _Counters()
        self._multi_output_warned = False

    # --- the ImageProvider protocol ---------------------------------------------------------

    async def generate(self, request: ImageRequest) -> str:
        """The image's URL.

        Raises:
            NotStartedError: No prediction was started (throttled, not this image's turn to
                create yet, a create that created nothing, Replicate unreachable); retry after
                ``retry_after_s``.
            TransientProviderError: Worth another attempt, which continues this one's work.
            PermanentProviderError: Replicate refused, or the prediction failed.
        """
        key = (request.job_id, request.index)
        image = self._work.get(key)
        if image is None:
            image = self._work[key] = _Image()
        if not image.requested:
            image.requested = True
            image.admitted = request.pending_since
        try:
            prediction = await self._finished_prediction(key, image, request.prompt)
        except PermanentProviderError:
            # A refused poll (401, 403, 404, ...) may leave the prediction running: the entry
            # stays for the worker's cancel, which stops it and releases the entry.
            if image.prediction_id is None:
                self._forget(key)
            raise
        self._forget(key)  # the prediction is over, whatever it came to
        return self._result(prediction)

    async def cancel(self, job_id: str, index: int) -> None:
        """Stop the image's prediction at Replicate, if it has one, and forget the image."""
        key = (job_id, index)
        image = self._forget(key)
        if image is None:
            await trio.lowlevel.checkpoint()
            return
        if image.prediction_id is None:
            try:
                await self._recover(key, image)
            except TransientProviderError as exc:
                logger.warning("replicate: cannot find a prediction to cancel: %s", exc)
        prediction_id = image.prediction_id
        if prediction_id is None:
            await trio.lowlevel.checkpoint()
            return
        self._tracked.pop(prediction_id, None)
        self._counters.cancels += 1
        try:
            await self._call("POST", f"/v1/predictions/{prediction_id}/cancel")
        except (Answer, httpx.TransportError) as exc:
            logger.warning("replicate: cancel of %s failed: %s", prediction_id, exc)

    async def turn_delay(self, job_id: str, index: int, *, book: bool) -> float:
        """Seconds until the image's next call may start: none if it will not create (it has a
        prediction, or an unsure create to look up first and no turn yet), else until its
        create turn (or, without ``book`` and without a turn, until a 429's pause ends)."""
        key = (job_id, index)
        image = self._work.get(key)
        if image is not None and image.prediction_id is not None:
            return 0.0
        now = trio.current_time()
        if image is None or not self._has_turn(image):
            if image is not None and image.unsure is not None:
                return 0.0  # the list first: it may show the prediction, and no create is due
            if not book:
                return max(0.0, await self.pace.paused_until() - now)
            if image is None:
                # Released by generate or by the worker's cancel, as any other entry.
                image = self._work[key] = _Image()
        wait = await self._book_turn(image) - now
        return wait if wait > _DUE_EPSILON_S else 0.0

    def _forget(self, key: tuple[str, int]) -> _Image | None:
        """Release the image's entry: the only place one is released."""
        return self._work.pop(key, None)

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
            "throttled": self.pace.throttles,
            "create_rate_per_s": round(self.pace.rate, 3),
            "in_flight": sum(image.prediction_id is not None for image in self._work.values()),
            "tracked": len(self._work),
        }

    def resume_remote_work(self, work: Sequence[RemoteWork], finished: Sequence[str]) -> None:
        """Take up predictions (and unanswered creates) an earlier process journaled; the
        ``finished`` predictions served their images and are never adopted by reconciling."""
        for prediction_id in finished:
            self._remember(prediction_id)
        for item in work:
            key = (item.job_id, item.index)
            if item.remote_id is not None:
                self._work[key] = _Image(prediction_id=item.remote_id)
                self._remember(item.remote_id)
            elif item.pending_since is not None:
                self._work[key] = _Image(
                    unsure=(self._create_body(item.prompt), item.pending_since)
                )
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

    async def _finished_prediction(
        self, key: tuple[str, int], image: _Image, prompt: str
    ) -> Mapping[str, Any]:
        """The image's prediction once it has finished (created first if it has none)."""
        if image.prediction_id is None:
            prediction, answered = await self._create_once(key, image, prompt)
            if answered and finished(prediction, sync_answer=True):
                # The create's own answer is the finished image: its id is noted with the
                # image's own write (``_adopt``), so nothing is waited for here.
                image.note = None
                return prediction
            await self._noted(key, image)
            # A create's own answer is fresh; a prediction adopted from the list is checked now.
            check_now = not answered
        else:
            self._counters.resumed += 1
            await self._noted(key, image)
            check_now = True
        assert image.prediction_id is not None
        return await self._wait_untilfinished(image.prediction_id, check_now=check_now)

    async def _create_once(
        self, key: tuple[str, int], image: _Image, prompt: str
    ) -> tuple[Mapping[str, Any], bool]:
        """The image's prediction, and whether it is the create's own answer (else adopted)."""
        body = self._create_body(prompt)
        recovered = await self._recover(key, image)
        if recovered is not None:
            return recovered, False
        while True:
            await self._take_turn(image)
            since = datetime.now(UTC)
            # Until Replicate answers, this image may or may not have a prediction: an attempt
            # timeout, a cancel or a restart in the middle of the create must not lead to a
            # second one. So the pending create is in the journal before it is sent: the note
            # the job's admission stored if it is recent and still stands, else one of its own.
            admitted = image.admitted
            if admitted is not None and timedelta(0) <= since - admitted <= ADMITTED_NOTE_FRESH:
                image.unsure = (body, admitted)
                image.admitted = None
            else:
                image.unsure = (body, since)
                try:
                    await self._note(key, None, since).wait()
                except StoreUnavailable as exc:
                    image.unsure = None
                    raise NotStartedError(f"cannot note the create first: {exc}") from None
            pending = image.unsure
            prediction, answered = await self._try_create(key, image, body, since)
            if not answered:
                return prediction, False
            # Made by this create, not yet taken for the image: an attempt cut short from here
            # on, or a claim that fails, leaves the next attempt to take it first.
            image.answered, image.unsure = prediction, pending
            await self.pace.accepted()
            prediction_id = prediction.get("id")
            if prediction_id not in self._claimed and (
                not isinstance(prediction_id, str) or await self._claim(key, prediction_id)
            ):
                image.answered = image.unsure = None
                made = finished(prediction, sync_answer=True)
                return self._adopt(key, image, prediction, with_image=made), True
            image.answered = None
            # While this create was held open (Prefer: wait), another image reconciling an
            # unsure create of the same input (here or in another process sharing the
            # journal) took its prediction. Inputs being equal, the images are
            # interchangeable: take that image's orphan if it made one, else create again.
            # Either way every prediction serves exactly one image.
            self._counters.swapped += 1
            try:
                orphan = await self._reconcile(key, body, since)
            except TransientProviderError:
                orphan = None
            if orphan is not None:
                image.unsure = None
                return self._adopt(key, image, orphan), False

    def _has_turn(self, image: _Image) -> bool:
        """Whether the image holds a create turn that no 429 has voided since it was booked."""
        return image.turn is not None and image.turn[1] == self.pace.throttles

    async def _book_turn(self, image: _Image) -> float:
        """The image's create turn: booked with the pace unless it has a valid one."""
        if image.turn is None or not self._has_turn(image):
            image.turn = await self.pace.book()
        return image.turn[0]

    async def _take_turn(self, image: _Image) -> None:
        """Go ahead if the image's create turn has come; else raise ``NotStartedError`` with
        the time left, so that the wait happens outside the attempt. The worker has waited for
        the turn before the attempt (:meth:`turn_delay`), so this raises only when the turn
        was not due then (after a create the list showed nothing for, say)."""
        wait = await self._book_turn(image) - trio.current_time()
        if wait > _DUE_EPSILON_S:
            raise NotStartedError(
                "waiting for a turn to create a prediction (Replicate's rate limit)",
                retry_after_s=wait,
            )
        image.turn = None

    async def _try_create(
        self, key: tuple[str, int], image: _Image, body: dict[str, object], since: datetime
    ) -> tuple[Mapping[str, Any], bool]:
        """One create: its own answer (``True``), or a prediction it made that was found in
        the list after an unsure answer (``False``).

        Raises:
            NotStartedError: Nothing was created (429, a 5xx or a lost answer with nothing to
                show for it in the list, Replicate unreachable).
            PermanentProviderError: Replicate refused (nothing was created).
            TransientProviderError: The answer was lost and the list cannot be read to check
                (the image stays unsure: the next attempt looks again before creating).
        """
        unsure: Answer | httpx.TransportError
        try:
            prediction = await self._post_create(body)
        except Answer as exc:
            if exc.status < 500:
                self._settle_nothing(key, image)  # Replicate said no: nothing was created
                if exc.status != 429:
                    raise permanent(exc) from None
                # Backpressure, not a failure of the image: slow every create, then try again.
                pause = min(exc.retry_after_s or 1.0, MAX_RETRY_AFTER_S)
                await self._throttled(pause)
            unsure = exc
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self._settle_nothing(key, image)  # the request never left
            raise NotStartedError(f"cannot reach Replicate ({exc!r})") from None
        except httpx.TransportError as exc:
            unsure = exc
        else:
            image.unsure = None
            return prediction, True
        return await self._after_unsure_create(key, image, body, since, unsure), False

    async def _throttled(self, pause_s: float) -> NoReturn:
        """A 429 answered a create: every create pauses, and this one was not started."""
        await self.pace.throttled(pause_s)
        raise NotStartedError("Replicate is throttling creates (429)", retry_after_s=pause_s)

    def _create_body(self, prompt: str) -> dict[str, object]:
        settings = self.settings
        body = settings.model.create_body({**settings.model_input, "prompt": prompt})
        if settings.webhooks:
            body["webhook"] = settings.webhook_url
            body["webhook_events_filter"] = ["completed"]
        return body

    def _note(
        self,
        key: tuple[str, int],
        remote_id: str | None,
        pending_since: datetime | None,
        *,
        with_image: bool = False,
    ) -> Commit:
        image = self._work.get(key)
        if image is not None:
            image.admitted = None  # replaced
        return self._journal.note(
            key[0], key[1], remote_id=remote_id, pending_since=pending_since, with_image=with_image
        )

    async def _noted(self, key: tuple[str, int], image: _Image) -> None:
        """Wait until the image's prediction id is stored, noting it again while the store
        fails: until then a restart could only find the prediction by reconciling.

        Inside the attempt (holding its capacity token) on purpose: the prediction is running
        at Replicate, which is the work ``MAX_CONCURRENCY`` bounds. An attempt cut meanwhile
        leaves the note for the next attempt to wait for.
        """
        delay = 0.1
        while (commit := image.note) is not None:
            try:
                await commit.wait()
            except StoreUnavailable as exc:
                logger.warning("replicate: cannot note the prediction of %s yet: %s", key, exc)
                if exc.refused or image.prediction_id is None:
                    image.note = None
                    return
                await trio.sleep(delay)
                delay = min(delay * 2, MAX_POLL_BACKOFF_S)
                image.note = self._note(key, image.prediction_id, None)
            else:
                image.note = None

    def _settle_nothing(self, key: tuple[str, int], image: _Image) -> None:
        """The image's pending create certainly created nothing."""
        image.unsure = None
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
        self,
        key: tuple[str, int],
        image: _Image,
        body: dict[str, object],
        since: datetime,
        exc: Answer | httpx.TransportError,
    ) -> Mapping[str, Any]:
        """The prediction an unsure create made, found in the list of recent predictions.

        Raises:
            NotStartedError: The list shows none: nothing was started. The image stays unsure
                all the same, so the next attempt looks again before it creates.
            TransientProviderError: The list cannot be read.
        """
        adopted = await self._reconcile(key, body, since)
        if adopted is not None:
            image.unsure = None
            return self._adopt(key, image, adopted)
        await self._book_turn(image)  # the create to come waits for its turn before the attempt
        if isinstance(exc, Answer):
            raise NotStartedError(
                f"Replicate failed to create the prediction: {exc.detail}",
                retry_after_s=exc.retry_after_s,
            )
        raise NotStartedError(f"Replicate failed to create the prediction: {exc!r}")

    async def _recover(self, key: tuple[str, int], image: _Image) -> Mapping[str, Any] | None:
        """The prediction an earlier attempt of the image made, or may have made, taken for it:
        the one its create answered with, unless another image took that meanwhile; else one
        the list shows for its unsure create. ``None``: there is none.

        Raises:
            TransientProviderError: The list cannot be read, or the claim made (the image keeps
                what it knows for the next attempt).
        """
        answered = image.answered
        if answered is not None:
            prediction_id = answered.get("id")
            if (
                isinstance(prediction_id, str)
                and prediction_id not in self._claimed
                and await self._claim(key, prediction_id)
            ):
                image.answered = image.unsure = None
                return self._adopt(key, image, answered)
            image.answered = None  # another image's: this image's own may be its orphan
        if image.unsure is not None:
            # An earlier create may have created a prediction: find it before making another.
            adopted = await self._reconcile(key, *image.unsure)
            image.unsure = None
            if adopted is not None:
                return self._adopt(key, image, adopted)
        return None

    async def _reconcile(
        self, key: tuple[str, int], body: Mapping[str, object], since: datetime
    ) -> Mapping[str, Any] | None:
        """A recent prediction for exactly this input that no image has claimed yet, here or
        in another process sharing the journal; claimed for the image ``key``.

        Raises:
            TransientProviderError: The list cannot be read now, or the claim cannot be made
                (the image stays unsure).
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
                prediction_id = prediction.get("id")
                if prediction_id not in claimed and prediction.get("input") == body["input"]:
                    if isinstance(prediction_id, str) and not await self._claim(key, prediction_id):
                        continue  # another process's image has it
                    self._counters.reconciled += 1
                    logger.info("replicate: adopted %s after an unsure create", prediction_id)
                    return prediction
            path = page.get("next")
        return None

    def _adopt(
        self,
        key: tuple[str, int],
        image: _Image,
        prediction: Mapping[str, Any],
        *,
        with_image: bool = False,
    ) -> Mapping[str, Any]:
        """Take ``prediction`` as the image's and note its id; ``with_image`` when it is the
        finished image (the note is then stored with the image's own write)."""
        prediction_id = prediction.get("id")
        if not isinstance(prediction_id, str):
            raise TransientProviderError("Replicate answered without a prediction id")
        self._counters.predictions += 1
        image.prediction_id = prediction_id
        image.note = self._note(key, prediction_id, None, with_image=with_image)
        logger.info(
            "job %s image %d: prediction %s",
            key[0],
            key[1],
            prediction_id,
            extra={"job_id": key[0], "index": key[1], "prediction_id": prediction_id},
        )
        self._remember(prediction_id)
        return prediction

    def _remember(self, prediction_id: str) -> None:
        self._claimed[prediction_id] = None
        if len(self._claimed) > MAX_REMEMBERED_PREDICTIONS:
            del self._claimed[next(iter(self._claimed))]

    async def _claim(self, key: tuple[str, int], prediction_id: str) -> bool:
        """Take ``prediction_id`` for the image ``key``: in this process at once (no other
        image of it takes the prediction meanwhile), then in the journal, for every process
        sharing it. ``False``: another process's image has it (it stays remembered here).

        Raises:
            TransientProviderError: The journal cannot tell now (nothing is taken).
        """
        self._remember(prediction_id)
        try:
            return await self._journal.claim(prediction_id, key[0], key[1])
        except StoreUnavailable as exc:
            self._claimed.pop(prediction_id, None)
            raise TransientProviderError(
                f"cannot claim prediction {prediction_id} for the image: {exc}"
            ) from None
        except BaseException:
            self._claimed.pop(prediction_id, None)  # cut short: the next attempt asks again
            raise

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
        """The prediction now; retries 429, 5xx and network errors with a bounded backoff.

        The backoff stays inside the attempt: the prediction is running at Replicate whether
        or not it is polled (see the module's note on waiting)."""
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

    def _result(self, prediction: Mapping[str, Any]) -> str:
        status = prediction.get("status")
        url = first_url(prediction.get("output"))
        if status in ("succeeded", "processing") and url is not None:
            self._counters.images += 1
            self._warn_if_multiple(prediction.get("output"))
            return url
        if status == "succeeded":
            raise PermanentProviderError("Replicate returned no image (it may have been filtered)")
        if status == "aborted":
            raise NotStartedError("Replicate aborted the prediction before it started")
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
    pace: CreatePace | None = None,
) -> AsyncIterator[ReplicateProvider]:
    """A :class:`ReplicateProvider` with its connection pool, closed on exit; its creates paced
    by ``pace`` (shared with other processes), else by a pace of its own."""
    headers = {
        "Authorization": f"Bearer {settings.api_token}",
        "User-Agent": "imagegen-trio",
    }
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
    async with httpx.AsyncClient(
        base_url=settings.base_url, headers=headers, limits=limits, transport=transport
    ) as client:
        provider = ReplicateProvider(settings, client, journal=journal, pace=pace)
        logger.info(
            "replicate: model %s via POST %s%s (webhooks %s)",
            settings.model,
            settings.base_url,
            settings.model.create_path,
            "on" if settings.webhooks else "off",
        )
        yield provider
