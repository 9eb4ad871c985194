"""Generated images kept on our own disk and served under ``/files/<name>``.

Replicate deletes a prediction's output files an hour after it finishes, so a job's image URLs
would break while the job is still listed. Each remote output is therefore copied once, checked
(size, ``Content-Type`` and the bytes' own signature) and stored as ``{job_id}-{index}.{ext}`` in
``IMAGES_DIR``, which the web layer serves with long cache headers. The built-in local provider
renders its PNGs into the same directory (see :mod:`actors.providers.local`).

Publish first, copy behind: :meth:`ImageFiles.keep` names the file at once (the extension from
the provider's URL, see :func:`file_extension`), so the image's event goes out with its final
``/files/...`` URL without waiting for the download; the job starts the copy
(:meth:`ImageFiles.copy_behind`) once that event is stored and published, so that no download,
file write or fsync runs ahead of the event it follows, and it is made in the background (a few
at a time). Until it exists, :meth:`ImageFiles.locate` gives the provider's URL, which
``/files/<name>`` redirects to. The pending copy (:class:`~actors.messages.ImageCopy`) is stored
with the image that hands its name out, so the next start finishes it
(:meth:`ImageFiles.resume_copies`). A copy that fails in the end is not an image failure: the
image still exists at the provider for an hour and has been paid for, so ``/files/<name>``
keeps redirecting there (and a warning is logged).

The directory's size is accounted per job so that the owner of retention can evict old jobs when
:attr:`ImageFiles.over_budget`; :meth:`ImageFiles.forget` deletes a job's files in the background.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import stat
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import attrs
import httpx
import trio

from actors.messages import ImageCopy

logger = logging.getLogger(__name__)

#: ``Content-Type`` values accepted for a download (parameters such as ``; charset`` ignored).
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif"})
#: A job id becomes part of a file name: no separators, no leading dot.
_JOB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
#: A copy's file name: ``{job_id}-{index}.{ext}``.
_COPY_NAME = re.compile(r"(?P<job>[A-Za-z0-9_][A-Za-z0-9_-]*)-[0-9]+\.[A-Za-z0-9]+")
#: File extensions taken from a provider's URL as they are (``jpeg`` becomes ``jpg``).
URL_EXTENSIONS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp", "gif": "gif"}
#: The extension of a copy whose URL names no image type: served with the type of its bytes.
UNKNOWN_EXTENSION = "img"


def _positive(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value!r}")


#: How long stopping may spend deleting the files of jobs forgotten just before.
SHUTDOWN_DELETE_S = 5.0
#: A temporary file (``.*.tmp``) untouched for this long is a stray of a process that died
#: mid-write, removed at start-up; a younger one may be another live process's write in
#: progress (a cluster's nodes share the directory).
STRAY_TEMPORARY_S = 3600.0


@attrs.frozen(kw_only=True)
class ImageFilesSettings:
    """Args:
    directory: Where images are stored (``IMAGES_DIR``), served under ``/files/``.
    store_remote: Download absolute http(s) outputs (``STORE_IMAGES``); if false, the
        provider's URL is handed out as it is.
    max_image_bytes: One download's cap (``IMAGE_MAX_BYTES``).
    max_total_bytes: The directory's budget (``IMAGES_MAX_BYTES``); see
        :attr:`ImageFiles.over_budget`.
    download_timeout_s: Bounds one download attempt as a whole (headers and body).
    download_attempts: Attempts per image when the failure is transient.
    backoff_base_s: The wait after the first failed attempt; it doubles after each one.
    backoff_max_s: Cap of every wait, a server's ``Retry-After`` included.
    copy_concurrency: Copies downloaded at once; the others wait their turn.
    copy_delay_s: How long after its image is published a copy starts, so that its download
        and write never compete with the sending of the event to the image's subscribers.
    """

    directory: Path
    store_remote: bool = True
    max_image_bytes: int = attrs.field(default=20 * 1024 * 1024, validator=attrs.validators.ge(1))
    max_total_bytes: int = attrs.field(default=5 * 1024**3, validator=attrs.validators.ge(1))
    download_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    download_attempts: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    backoff_base_s: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    backoff_max_s: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    copy_concurrency: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    copy_delay_s: float = attrs.field(default=0.05, validator=attrs.validators.ge(0))

    def backoff_s(self, attempt: int, retry_after_s: float | None = None) -> float:
        """The wait after failed attempt ``attempt`` (1-based): 0.5 s, 1 s, 2 s ... capped, or
        the server's ``Retry-After`` when that is longer (capped too)."""
        wait = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        if retry_after_s is not None:
            wait = max(wait, min(self.backoff_max_s, retry_after_s))
        return float(wait)


class _DownloadFailed(Exception):
    """One attempt failed; ``transient`` says whether another may succeed."""

    def __init__(
        self, message: str, *, transient: bool, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after_s = retry_after_s


@attrs.define(eq=False)
class _JobUsage:
    """The bytes one job holds, by file name."""

    sizes: dict[str, int] = attrs.Factory(dict)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())

    @property
    def nfiles(self) -> int:
        return len(self.sizes)


@attrs.frozen(kw_only=True)
class KeptImage:
    """What :meth:`ImageFiles.keep` hands out: the image's URL, and the copy it waits for."""

    url: str
    #: The copy being made (to be stored with the image, so a restart finishes it), if any.
    copy: ImageCopy | None = None


#: How a failed copy is journaled (a queued store write, not waited for).
CopyJournal = Callable[[ImageCopy], object]


class ImageFiles:
    """The image directory: copies into it, its size per job, and deletion of old jobs' files.

    Concurrency: opened once per process with :func:`open_image_files`, which starts
    :meth:`run` in its own nursery. :meth:`keep` is sync: it names the file;
    :meth:`copy_behind` queues its copy (a deque plus a parking lot, so it never blocks);
    :meth:`run` owns ``copy_concurrency`` copier tasks that download (the ``httpx.AsyncClient``
    is shared) and write the files in worker threads, and the deletion queue (a deduplicated set
    plus a wake-up Event, so :meth:`forget` never blocks). The accounting and the copies are
    touched only on the Trio thread: :meth:`keep`, :meth:`copy_behind`, :meth:`locate`,
    :meth:`added`, :meth:`forget` and the properties are sync. :meth:`run` stops when cancelled
    (a copy cut short is finished by the next start),
    after deleting whatever was already queued.
    """

    def __init__(self, settings: ImageFilesSettings, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self._client = client
        self._jobs: dict[str, _JobUsage] = {}
        self._total_bytes = 0
        self._to_delete: set[str] = set()
        self._wake = trio.Event()
        self._queued = 0  # forget() calls so far
        self._deleted = 0  # forget() calls whose files are gone
        self._deleted_changed = trio.Event()
        #: Copies not made: pending (queued or downloading) or failed, by file name.
        self._copies: dict[str, ImageCopy] = {}
        #: Copies to make, by name, each with the (Trio) time it may start.
        self._copy_queue: deque[tuple[str, float]] = deque()
        self._copiers = trio.lowlevel.ParkingLot()
        self._copies_changed = trio.Event()
        self._journal: CopyJournal | None = None
        self._copying = 0  # copies being made now
        self._downloads = 0
        self._download_failures = 0
        self._skipped = 0
        #: Told (sync) of the bytes each file this process writes adds to its job's: a cluster
        #: node counts them in the store, where the budget holds for every node's files.
        self.on_written: Callable[[str, int], None] | None = None

    # --- copies -----------------------------------------------------------------------------

    def keep(self, job_id: str, index: int, url: str) -> KeptImage:
        """The URL to hand out for image ``index`` of ``job_id`` at ``url``, named at once (the
        copy is started with :meth:`copy_behind`).

        Returns:
            ``/files/{job_id}-{index}.{ext}`` at once with the ``copy`` to make (to be started
            with :meth:`copy_behind` once the image that names it is stored), unless one was
            stored before (a restart cut the job short); ``url`` itself when it is not an
            absolute http(s) URL, or when storing is off.

        Raises:
            ValueError: ``job_id`` cannot be part of a file name, or ``index`` is negative.
        """
        if not _is_remote(url):
            return KeptImage(url=url)
        if not self.settings.store_remote:
            self._skipped += 1
            return KeptImage(url=url)
        if not _JOB_ID.fullmatch(job_id) or index < 0:
            raise ValueError(f"not a job id and image index: {job_id!r}, {index!r}")
        kept = self._kept(job_id, index)
        if kept is not None:
            # Stored before a restart cut the job short: the provider's URL may be gone by now.
            return KeptImage(url=f"/files/{kept}")
        name = f"{job_id}-{index}.{file_extension(url)}"
        return KeptImage(
            url=f"/files/{name}", copy=ImageCopy(job_id=job_id, index=index, name=name, source=url)
        )

    def copy_behind(self, copy: ImageCopy) -> None:
        """Make ``copy`` in the background (:meth:`keep` named it), starting ``copy_delay_s``
        from now; from now on ``/files/{name}`` redirects to its source until it exists."""
        self._queue_copy(copy, not_before=trio.current_time() + self.settings.copy_delay_s)

    def locate(self, name: str) -> ImageCopy | None:
        """The copy ``/files/{name}`` waits for (pending, or ``failed`` for good), or None: the
        file is on disk if it is anywhere."""
        return self._copies.get(name)

    async def on_disk(self, name: str) -> bool:
        """Whether the file ``name`` is in the images directory (a copy any node made)."""
        return await trio.to_thread.run_sync((self.settings.directory / name).is_file)

    @staticmethod
    def job_of(name: str) -> str | None:
        """The job a copy's file name belongs to, or None if ``name`` is not a copy's."""
        match = _COPY_NAME.fullmatch(name)
        return match["job"] if match else None

    def resume_copies(self, copies: Iterable[ImageCopy], *, journal: CopyJournal) -> None:
        """Carry on the copies a previous process journaled (those not on disk by now), and
        journal this process's failed copies with ``journal``."""
        self._journal = journal
        for copy in copies:
            if self._kept(copy.job_id, copy.index) is not None:
                continue  # made before the restart
            if copy.failed:
                self._copies[copy.name] = copy  # the provider's URL keeps being handed out
            else:
                self._queue_copy(copy)

    async def wait_copies(self) -> None:
        """Wait until no copy is pending or on its way (each made, failed for good, or dropped
        with its job)."""
        await trio.lowlevel.checkpoint()
        while self._pending_copies() or self._copying:
            await self._copies_changed.wait()

    def _pending_copies(self) -> int:
        return sum(1 for copy in self._copies.values() if not copy.failed)

    def _queue_copy(self, copy: ImageCopy, *, not_before: float = 0.0) -> None:
        if copy.name in self._copies and not self._copies[copy.name].failed:
            return  # already on its way
        self._copies[copy.name] = copy
        self._copy_queue.append((copy.name, not_before))
        self._copiers.unpark()

    def _copy_settled(self) -> None:
        self._copies_changed.set()
        self._copies_changed = trio.Event()

    async def _copier(self) -> None:
        """Make queued copies, one at a time, until cancelled."""
        while True:
            copy = self._next_copy()
            if copy is None:
                await self._copiers.park()
                continue
            self._copying += 1
            try:
                await trio.sleep_until(copy[1])
                if self._copies.get(copy[0].name) is copy[0]:  # else forgotten meanwhile
                    await self._copy(copy[0])
            finally:
                self._copying -= 1
                self._copy_settled()

    def _next_copy(self) -> tuple[ImageCopy, float] | None:
        """The next copy to make, and when it may start."""
        while self._copy_queue:
            name, not_before = self._copy_queue.popleft()
            copy = self._copies.get(name)
            if copy is not None and not copy.failed:  # else forgotten meanwhile
                return copy, not_before
        return None

    async def _copy(self, copy: ImageCopy) -> None:
        on_disk = await trio.to_thread.run_sync(_size_of, self.settings.directory / copy.name)
        if on_disk is not None:
            # Made already, by another process (a job taken over on a cluster): counted there.
            if self._copies.get(copy.name) is copy:
                del self._copies[copy.name]
                self._account(copy.job_id, copy.name, on_disk)
            return
        try:
            data, _ = await self._download(copy.source)
            replaced = await trio.to_thread.run_sync(
                _write_atomically, self.settings.directory, copy.name, data
            )
        except (_DownloadFailed, OSError) as exc:
            self._copy_failed(copy, str(exc) or type(exc).__name__)
            return
        if self._copies.get(copy.name) is not copy:
            # Its job was forgotten while the copy was made: the file is garbage already.
            await trio.to_thread.run_sync(_unlink, self.settings.directory / copy.name)
            return
        del self._copies[copy.name]
        self._written(copy.job_id, copy.name, len(data), replaced=replaced)
        self._downloads += 1

    def _copy_failed(self, copy: ImageCopy, error: str) -> None:
        self._download_failures += 1
        if self._copies.get(copy.name) is not copy:
            return  # forgotten meanwhile
        logger.warning(
            "image %d of job %s not stored (%s); its /files/ URL redirects to the provider's",
            copy.index,
            copy.job_id,
            error,
            extra={"job_id": copy.job_id, "index": copy.index, "error": error},
        )
        failed = attrs.evolve(copy, failed=True)
        self._copies[copy.name] = failed
        if self._journal is not None:
            self._journal(failed)

    async def _download(self, url: str) -> tuple[bytes, str]:
        """The image's bytes and extension, retrying transient failures with backoff."""
        settings = self.settings
        attempt = 1
        while True:
            try:
                with trio.fail_after(settings.download_timeout_s):
                    return await self._download_once(url)
            except trio.TooSlowError:
                error = _DownloadFailed(
                    f"no complete answer within {settings.download_timeout_s} s", transient=True
                )
            except _DownloadFailed as exc:
                error = exc
            if not error.transient or attempt >= settings.download_attempts:
                raise error
            await trio.sleep(settings.backoff_s(attempt, error.retry_after_s))
            attempt += 1

    async def _download_once(self, url: str) -> tuple[bytes, str]:
        limit = self.settings.max_image_bytes
        body = bytearray()
        try:
            async with self._client.stream("GET", url) as response:
                _check_answer(response, limit)
                with trio.CancelScope() as cut_off:
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > limit:
                            # Stop inside httpcore's next read rather than with ``break``: a
                            # ``break`` leaves httpcore's body generator to the garbage collector
                            # (a ResourceWarning from trio), a Cancelled ends it and the response.
                            cut_off.cancel()
        except httpx.TransportError as exc:  # connection, protocol and httpx's own timeouts
            raise _DownloadFailed(f"{type(exc).__name__}: {exc}", transient=True) from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # too many redirects, bad encoding
            raise _DownloadFailed(f"{type(exc).__name__}: {exc}", transient=False) from exc
        if len(body) > limit:  # the loop may also end before its next read
            raise _DownloadFailed(f"more than {limit} bytes", transient=False)
        ext = sniff_image(body)
        if ext is None:
            raise _DownloadFailed("the body is not a PNG, JPEG, GIF or WebP image", transient=False)
        return bytes(body), ext

    # --- accounting -------------------------------------------------------------------------

    def added(self, job_id: str, name: str, nbytes: int) -> None:
        """Account the file ``name`` of ``nbytes`` that someone else wrote for ``job_id`` (the
        local provider); writing the same name again replaces its size."""
        self._written(job_id, name, nbytes)

    def forget_all_but(self, job_ids: Collection[str]) -> None:
        """Forget every job with files here that is not in ``job_ids`` (a store that lost them,
        or files left by a job that was never stored): their files are unreachable garbage."""
        for job_id in [job_id for job_id in self._jobs if job_id not in job_ids]:
            self.forget(job_id)

    def forget(self, job_id: str) -> None:
        """Drop the job's bytes from the accounting now, and delete its files soon (:meth:`run`).

        Deletes every file whose name is ``{job_id}-{anything without "-"}``.
        """
        usage = self._jobs.pop(job_id, None)
        if usage is not None:
            self._total_bytes -= usage.nbytes
        for name in [name for name in self._copies if _job_of(name) == job_id]:
            del self._copies[name]  # a copy on its way is dropped when it arrives
        self._copy_settled()
        self._to_delete.add(job_id)
        self._queued += 1
        self._wake.set()

    async def wait_forgotten(self) -> None:
        """Wait until the files of every job forgotten so far have been deleted (or tried).

        Only returns while :meth:`run` is running.
        """
        target = self._queued
        await trio.lowlevel.checkpoint()
        while self._deleted < target:
            await self._deleted_changed.wait()

    @property
    def total_bytes(self) -> int:
        """Bytes in the directory as accounted (stored, reported and found at start-up)."""
        return self._total_bytes

    def bytes_of(self, job_ids: Iterable[str]) -> int:
        """Bytes accounted to these jobs."""
        return sum(usage.nbytes for job_id in job_ids if (usage := self._jobs.get(job_id)))

    @property
    def over_budget(self) -> bool:
        """Whether the directory holds more than ``max_total_bytes``: evict old jobs."""
        return self._total_bytes > self.settings.max_total_bytes

    def statistics(self) -> dict[str, int]:
        """Files and bytes accounted, copies stored, attempts failed in the end and skipped,
        copies pending and copies failed for good (their ``/files/`` URLs redirect)."""
        pending = self._pending_copies()
        return {
            "files": sum(usage.nfiles for usage in self._jobs.values()),
            "bytes": self._total_bytes,
            "downloads": self._downloads,
            "download_failures": self._download_failures,
            "skipped": self._skipped,
            "copies_pending": pending,
            "copies_failed": len(self._copies) - pending,
        }

    def _kept(self, job_id: str, index: int) -> str | None:
        usage = self._jobs.get(job_id)
        prefix = f"{job_id}-{index}."
        return (
            next((name for name in usage.sizes if name.startswith(prefix)), None) if usage else None
        )

    def _account(self, job_id: str, name: str, nbytes: int) -> int:
        """Count ``name``'s bytes; returns the change."""
        usage = self._jobs.setdefault(job_id, _JobUsage())
        change = nbytes - usage.sizes.get(name, 0)
        self._total_bytes += change
        usage.sizes[name] = nbytes
        return change

    def _written(self, job_id: str, name: str, nbytes: int, *, replaced: int | None = None) -> None:
        """A file this process wrote: counted, and the change on disk told to
        :attr:`on_written`. ``replaced``: the size of the file it replaced, which another
        process may have written (a copy taken over); else this process's own count of it."""
        change = self._account(job_id, name, nbytes)
        if replaced is not None:
            change = nbytes - replaced
        if self.on_written is not None and change:
            self.on_written(job_id, change)

    # --- the actor ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Account the files already there, then make copies and delete forgotten jobs' files as
        they come.

        Stray temporary files (``.*.tmp``, untouched for :data:`STRAY_TEMPORARY_S`) of a
        process that died mid-write are removed first.
        """
        found = await trio.to_thread.run_sync(_scan, self.settings.directory, STRAY_TEMPORARY_S)
        for job_id, name, nbytes in found:
            self._account(job_id, name, nbytes)
        if found:
            logger.info("images: %d files, %d bytes found", len(found), self._total_bytes)
        try:
            async with trio.open_nursery() as nursery:
                for number in range(self.settings.copy_concurrency):
                    nursery.start_soon(self._copier, name=f"image copier {number}")
                task_status.started()
                while True:
                    await self._wake.wait()
                    await self._delete_queued()
        finally:
            # Jobs forgotten just before shutdown would otherwise leave orphan files behind
            # (bounded: a hung file system must not hold the stop up).
            with trio.move_on_after(SHUTDOWN_DELETE_S, shield=True):
                await self._delete_queued()

    async def _delete_queued(self) -> None:
        self._wake = trio.Event()
        batch, self._to_delete = frozenset(self._to_delete), set()
        done = self._queued
        if batch:
            try:
                await trio.to_thread.run_sync(_delete_jobs_files, self.settings.directory, batch)
            except trio.Cancelled:
                # Raised before the thread started (a started one is waited for): requeue, so
                # that the shielded call in ``run``'s ``finally`` still deletes these files.
                self._to_delete |= batch
                raise
        self._deleted = done
        self._deleted_changed.set()
        self._deleted_changed = trio.Event()


@asynccontextmanager
async def open_image_files(
    settings: ImageFilesSettings, *, client: httpx.AsyncClient | None = None
) -> AsyncIterator[ImageFiles]:
    """:class:`ImageFiles` with :meth:`ImageFiles.run` started; stopped on exit.

    Args:
        settings: The directory and the download limits.
        client: The client downloads go through; by default one of its own (following
            redirects), closed on exit. A client passed in is left open.
    """
    async with AsyncExitStack() as stack:
        if client is None:
            client = await stack.enter_async_context(
                httpx.AsyncClient(
                    follow_redirects=True,
                    timeout=httpx.Timeout(settings.download_timeout_s),
                    headers={"User-Agent": "imagegen-trio"},
                )
            )
        files = ImageFiles(settings, client)
        async with trio.open_nursery() as nursery:
            await nursery.start(files.run)
            try:
                yield files
            finally:
                nursery.cancel_scope.cancel()


# --- pure helpers ---------------------------------------------------------------------------------


def sniff_image(data: bytes | bytearray) -> str | None:
    """The extension for ``data`` judged by its signature (png, jpg, gif, webp), else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    return None


#: The ``Content-Type`` of each extension :func:`sniff_image` gives.
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "gif": "image/gif", "webp": "image/webp"}


def image_type(path: Path) -> str | None:
    """The media type of the image file at ``path`` by its signature; None if it is none of ours
    or cannot be read (blocking)."""
    try:
        with path.open("rb") as file:
            head = file.read(12)
    except OSError:
        return None
    ext = sniff_image(head)
    return None if ext is None else MEDIA_TYPES[ext]


def _is_remote(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme.lower() in {"http", "https"} and bool(parts.netloc)


def _check_answer(response: httpx.Response, limit: int) -> None:
    """Refuse a response by its status and headers, before reading its body."""
    status = response.status_code
    if status == 429 or status >= 500:
        raise _DownloadFailed(
            f"answered {status}", transient=True, retry_after_s=_retry_after(response)
        )
    if not response.is_success:
        raise _DownloadFailed(f"answered {status}", transient=False)
    content_type = response.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if content_type not in IMAGE_TYPES:
        raise _DownloadFailed(f"Content-Type {content_type!r} is not an image", transient=False)
    length = response.headers.get("Content-Length", "").strip()
    if length.isdigit() and int(length) > limit:
        raise _DownloadFailed(f"Content-Length {length} is over {limit} bytes", transient=False)


def _retry_after(response: httpx.Response) -> float | None:
    header = response.headers.get("Retry-After", "").strip()
    return float(header) if header.isdigit() else None


def _size_of(path: Path) -> int | None:
    """The size of the file at ``path``; ``None``: there is no file there (worker thread)."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_size if stat.S_ISREG(status.st_mode) else None


def _write_atomically(directory: Path, name: str, data: bytes) -> int:
    """Write ``directory / name`` so that no reader ever sees half a file (worker thread).

    Returns the size of the file it replaced (0: there was none).
    """
    directory.mkdir(parents=True, exist_ok=True)
    # Unique to this write: the directory may be shared by processes of several hosts.
    partial = directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with partial.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # on disk before the job's record can point at it
        replaced = _size_of(directory / name) or 0
        partial.replace(directory / name)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return replaced


def file_extension(url: str) -> str:
    """The extension of the copy of ``url``: its path's when that names an image type (Replicate's
    outputs do: ``.../out-0.webp``), else :data:`UNKNOWN_EXTENSION`. Decided before the download,
    so that the name handed out never changes; ``/files/`` serves the bytes' own type."""
    ext = urlsplit(url).path.rpartition("/")[2].rpartition(".")[2].lower()
    return URL_EXTENSIONS.get(ext, UNKNOWN_EXTENSION)


def _job_of(name: str) -> str | None:
    """The job id in ``{job_id}-{index}.{ext}`` (job ids are UUIDs: they contain hyphens)."""
    stem, dot, ext = name.partition(".")
    job_id, dash, index = stem.rpartition("-")
    if not (dot and ext and dash and job_id and index.isdigit()):
        return None
    return job_id


def _scan(directory: Path, stray_after_s: float) -> list[tuple[str, str, int]]:
    """Remove temporary files untouched for ``stray_after_s``; ``(job_id, name, size)`` of every
    image (worker thread)."""
    found: list[tuple[str, str, int]] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return found
    strays_before = time.time() - stray_after_s
    for entry in entries:
        if not entry.is_file(follow_symlinks=False):
            continue
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):  # renamed since the listing
                if entry.stat(follow_symlinks=False).st_mtime < strays_before:
                    _unlink(Path(entry.path))
            continue
        job_id = _job_of(entry.name)
        if job_id is None:
            continue
        try:
            found.append((job_id, entry.name, entry.stat(follow_symlinks=False).st_size))
        except FileNotFoundError:  # deleted since the listing
            continue
    return found


def _delete_jobs_files(directory: Path, job_ids: frozenset[str]) -> None:
    """Delete every ``{job_id}-{rest}`` file of these jobs; log failures (worker thread)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    except OSError:
        logger.exception("images: cannot list %s to delete old jobs' files", directory)
        return
    for name in names:
        # Up to the last "-": job "a" must not take the files of a job "a-b".
        if name.rpartition("-")[0] in job_ids:
            _unlink(directory / name)


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        logger.exception("images: cannot delete %s", path)
