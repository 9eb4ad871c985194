"""The seam between the actors and whatever makes the images.

A provider whose remote work outlives the process also declares here the small journal port it
writes to (:class:`RemoteJournal`, its :class:`Commit` and :class:`RemoteWork`); the job store
implements it (``actors.store.journal``), so providers never import the store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol, runtime_checkable

import attrs
import trio

from actors.errors import StoreUnavailable


@attrs.frozen(kw_only=True)
class ImageRequest:
    """One attempt at one image.

    Args:
        job_id: The job the image belongs to.
        index: The image's index in its job (0-based).
        prompt: The prompt, already trimmed and validated.
        attempt: 1 for the first attempt, 2 for the first retry, ...
        pending_since: Set on the image's first request when the job's admission journaled
            the image's remote work as pending from then on (stored before the job was
            accepted, on the wall clock): a provider that notes a create before sending it may
            take that note as its first create's, while no note of its own replaced it.
    """

    job_id: str
    index: int
    prompt: str
    attempt: int
    pending_since: datetime | None = None


#: What a provider reports about itself for ``GET /api/status`` (flat, JSON-ready).
ProviderStatistics = Mapping[str, int | float | str | None]


class ImageProvider(Protocol):
    """Makes one image per call.

    ``generate`` returns the image's URL: absolute (``https://...``) or a path the service
    itself serves (``/files/...``). It raises ``TransientProviderError`` for failures worth
    another attempt and ``PermanentProviderError`` for the rest. A later attempt at the same
    ``(job_id, index)`` continues remote work an earlier one started, where the provider can
    (an image is never paid for twice), so cancelling a ``generate`` call (an attempt timeout)
    leaves remote work running; ``cancel`` is what stops it.
    """

    @property
    def name(self) -> str: ...

    async def generate(self, request: ImageRequest) -> str: ...

    async def cancel(self, job_id: str, index: int) -> None:
        """Stop any remote work for this image (best effort; callers bound it in time)."""
        ...

    def statistics(self) -> ProviderStatistics: ...


@runtime_checkable
class WebhookReceiver(Protocol):
    """A provider that is told about finished work by signed webhooks."""

    @property
    def webhooks_enabled(self) -> bool:
        """Whether webhooks are configured (else the route answers 404)."""
        ...

    def receive_webhook(self, headers: Mapping[str, str], body: bytes) -> None:
        """Check the signature and act on the payload.

        Raises:
            WebhookRejected: Bad signature, stale timestamp or malformed body; nothing changed.
        """
        ...


@attrs.frozen(kw_only=True)
class RemoteWork:
    """What a provider journaled about an image's remote work (a prediction).

    ``remote_id`` is the provider's id for the work once known; ``pending_since`` is set while a
    create is in flight whose answer is not known yet (the work may exist without an id).
    """

    job_id: str
    index: int
    prompt: str
    remote_id: str | None
    pending_since: datetime | None


class Commit:
    """One queued write: await :meth:`wait` to know it is stored.

    Concurrency: created by whoever queues the write (a journal's ``note``, the job store's
    ``write``) and settled once by the task that stores it.
    Any number of tasks may wait; cancelling a wait does not cancel the write.
    """

    __slots__ = ("_done", "_error")

    def __init__(self) -> None:
        self._done = trio.Event()
        self._error: StoreUnavailable | None = None

    @classmethod
    def settled_with(cls, error: StoreUnavailable | None = None) -> Commit:
        """A write that is over before anyone waits: stored (no ``error``) or failed."""
        commit = cls()
        commit.settle(error)
        return commit

    @property
    def settled(self) -> bool:
        return self._done.is_set()

    def settle(self, error: StoreUnavailable | None = None) -> None:
        self._error = error
        self._done.set()

    def raise_error(self) -> None:
        """Raise the write's error if it failed (call once settled)."""
        if self._error is not None:
            raise self._error

    async def wait(self) -> None:
        """Return once the write is stored.

        Raises:
            StoreUnavailable: The write failed; nothing of it was stored.
        """
        await self._done.wait()
        if self._error is not None:
            raise self._error


class RemoteJournal(Protocol):
    """Where a provider notes an image's remote work, so that the next start can resume it."""

    def note(
        self,
        job_id: str,
        index: int,
        *,
        remote_id: str | None,
        pending_since: datetime | None,
        with_image: bool = False,
    ) -> Commit:
        """Record (queued; await the commit to know it is stored) what the image's work is:
        ``remote_id`` once known, ``pending_since`` while a create is unanswered.

        ``with_image``: the work is over and the image is about to be reported: the note is
        stored in the same transaction as the image's own write (not before it), so that an
        image whose provider answered with it at once waits for one transaction, not two.
        Until then a restart finds the work as the note before said (a create pending)."""
        ...

    async def claim(self, remote_id: str, job_id: str, index: int) -> bool:
        """Take ``remote_id`` for the image among every process that shares the journal:
        ``True`` if it is the image's (now, or already), ``False`` if another image has it.
        The provider asks before it takes a prediction (one found by reconciling, or one its
        create answered with, which another process may have found in the list first); it
        keeps the claims of its own process itself.

        Raises:
            StoreUnavailable: It cannot be told now.
        """
        ...


@runtime_checkable
class ResumesRemoteWork(Protocol):
    """A provider whose remote work outlives the process (Replicate's predictions)."""

    def resume_remote_work(self, work: Sequence[RemoteWork], finished: Sequence[str]) -> None:
        """Take up ``work`` an earlier process journaled for images still to be made, before
        any of them is generated; ``finished`` are the remote ids of images already made (never
        to be taken for another image)."""
        ...


class NullJournal:
    """Remembers nothing: for a provider whose process is the only one that could resume."""

    def note(
        self,
        job_id: str,  # noqa: ARG002 (the protocol's)
        index: int,  # noqa: ARG002
        *,
        remote_id: str | None,  # noqa: ARG002
        pending_since: datetime | None,  # noqa: ARG002
        with_image: bool = False,  # noqa: ARG002
    ) -> Commit:
        return Commit.settled_with()

    async def claim(self, remote_id: str, job_id: str, index: int) -> bool:  # noqa: ARG002
        await trio.lowlevel.checkpoint()
        return True  # the only process


class CreatePace(Protocol):
    """When the provider's creates may go: a token bucket whose rate halves on a 429 (and every
    create pauses for its ``Retry-After``) and grows back with accepted creates (AIMD), up to
    ``max_rate`` per second.

    ``actors.providers.pacing.LocalPace`` paces one process; ``actors.limits.redis_pace`` every
    process sharing a Redis prefix (one Replicate account's rate is shared by all of them).
    Creates are booked, not waited for: :meth:`book` hands out a time and takes its token, so
    the caller waits elsewhere. A 429 voids every booking made before it; :attr:`throttles`
    (the count of 429s, as of the latest answer) tells them apart. No method raises: a pace
    kept elsewhere that cannot be reached is waited for (:meth:`book`) or skipped (the rest).
    """

    max_rate: float

    @property
    def throttles(self) -> int:
        """The 429s counted so far (as of this process's latest call)."""
        ...

    @property
    def rate(self) -> float:
        """Creates per second now (as of this process's latest call)."""
        ...

    async def book(self) -> tuple[float, int]:
        """Book one create: the (Trio clock) time it may be sent, and :attr:`throttles` then."""
        ...

    async def paused_until(self) -> float:
        """When the pause of the latest 429 ends (Trio clock; in the past when none runs)."""
        ...

    async def throttled(self, retry_after_s: float) -> None:
        """The provider answered 429: halve the rate, pause every create ``retry_after_s``."""
        ...

    async def accepted(self) -> None:
        """A create was accepted: the rate grows back a step."""
        ...


@runtime_checkable
class PacedProvider(Protocol):
    """A provider that paces its calls (Replicate's rate of creates). A worker waits for its
    image's turn before it takes capacity and again once it holds a token, so that the wait
    spends neither a capacity token nor the attempt's time limit nor an attempt."""

    async def turn_delay(self, job_id: str, index: int, *, book: bool) -> float:
        """Seconds until the image's next call may start (0: now). With ``book``, an image
        that needs a turn and has none gets one, booked in the order asked; without, only a
        turn already booked (or a pause every call is under) is waited for."""
        ...
