"""Publish first, copy behind: an image's event does not wait for the copy of its output.

The provider's outputs are downloaded through ``httpx.MockTransport`` (no socket), so the whole
path runs on virtual time: the event's exact time shows that it did not wait for the copy.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trio.testing
from quart_trio import QuartTrio

from actors.files import ImageFiles, ImageFilesSettings, open_image_files
from actors.messages import ImageCopy, ImageStatus, JobStatus, ProgressEvent
from actors.providers.base import Commit
from actors.settings import SupervisorSettings
from actors.store import MemoryStore, Operation, SetCopy
from actors.supervisor import Supervisor, open_supervisor
from tests.fake_replicate import PNG
from tests.fakes import FakeProvider, Script, upper_jitter
from tests.web.helpers import SECRET
from web.app import FILE_CACHE_CONTROL, create_app
from web.auth import Authenticator
from web.settings import Settings

URL = "https://cdn.test/{job_id}/out-{index}.png"
#: The clock jumps once every task has been idle this long (real time), not at once: files are
#: written and read in worker threads, during which an immediate jump would fire timeouts.
AUTOJUMP_S = 0.05


@attrs.define(eq=False)
class Origin:
    """The provider's file server: answers with ``status`` once ``hold`` is set (if any)."""

    status: int = 200
    hold: trio.Event | None = None
    requests: list[str] = attrs.Factory(list)
    #: When (Trio time) each request came.
    times: list[float] = attrs.Factory(list)
    in_flight: int = 0
    peak_in_flight: int = 0

    def release(self) -> None:
        if self.hold is not None:
            self.hold.set()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(str(request.url))
        self.times.append(trio.current_time())
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.hold is not None:
                await self.hold.wait()
            await trio.sleep(0.1)
        finally:
            self.in_flight -= 1
        if self.status != 200:
            return httpx.Response(self.status, content=b"gone")
        return httpx.Response(200, content=PNG, headers={"Content-Type": "image/png"})


@asynccontextmanager
async def service(
    tmp_path: Path, origin: Origin, store: MemoryStore, copy_concurrency: int = 8
) -> AsyncIterator[Supervisor]:
    """One run of the service: the image directory, then the supervisor on ``store``."""
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock)  # the test asked for ``mock_clock``
    clock.autojump_threshold = AUTOJUMP_S
    settings = ImageFilesSettings(
        directory=tmp_path / "images", download_attempts=2, copy_concurrency=copy_concurrency
    )
    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(origin.handle)) as client,
        open_image_files(settings, client=client) as files,
        open_supervisor(
            FakeProvider(default=Script(latency_s=1, url=URL)),
            SupervisorSettings(),
            store=store,
            uniform=upper_jitter,
            files=files,
        ) as supervisor,
    ):
        yield supervisor


async def submit(supervisor: Supervisor, n: int = 1) -> str:
    snapshot, _ = await supervisor.submit(owner="alice", prompt="a red fox", num_images=n)
    return snapshot.job_id


async def finished(supervisor: Supervisor, n: int = 1) -> str:
    """A job of ``n`` images, submitted and finished."""
    job_id = await submit(supervisor, n)
    await supervisor.get(job_id, owner="alice").wait_finished()
    return job_id


def files_of(supervisor: Supervisor) -> ImageFiles:
    assert supervisor.files is not None
    return supervisor.files


def on_disk(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


async def test_an_image_is_published_with_its_files_url_before_its_copy_is_made(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    origin = Origin(hold=trio.Event())
    async with service(tmp_path, origin, MemoryStore()) as supervisor:
        job_id = await submit(supervisor)
        job = supervisor.get(job_id, owner="alice")
        start = trio.current_time()
        (event,) = await job.log.wait_events_after(0)
        assert isinstance(event, ProgressEvent)

        assert trio.current_time() - start == 1  # the provider's latency, nothing more
        name = f"{job_id}-0.png"
        assert event.url == f"/files/{name}"
        assert files_of(supervisor).locate(name) == ImageCopy(
            job_id=job_id, index=0, name=name, source=URL.format(job_id=job_id, index=0)
        )
        assert on_disk(tmp_path / "images") == []

        origin.release()
        await files_of(supervisor).wait_copies()

        assert files_of(supervisor).locate(name) is None
        assert on_disk(tmp_path / "images") == [name]
        assert job.snapshot().images[0].url == f"/files/{name}"  # the URL never changed


class CopyWritesHeld(MemoryStore):
    """A memory store that stores a write naming a copy only once :attr:`release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = trio.Event()
        self.held = 0

    def write(self, *operations: Operation) -> Commit:
        if not any(isinstance(operation, SetCopy) for operation in operations):
            return super().write(*operations)
        self.held += 1
        commit = Commit()

        async def store_when_released() -> None:
            await self.release.wait()
            super(CopyWritesHeld, self).write(*operations).raise_error()
            commit.settle()

        trio.lowlevel.spawn_system_task(store_when_released)
        return commit


async def test_a_copy_starts_only_once_its_image_is_stored_and_published(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    store = CopyWritesHeld()
    origin = Origin()
    async with service(tmp_path, origin, store) as supervisor:
        job_id = await submit(supervisor)
        job = supervisor.get(job_id, owner="alice")
        await trio.sleep(5)  # the image was made long ago; its write waits

        assert store.held == 1
        assert job.log.next_id == 1  # nothing published
        assert origin.requests == []  # and no copy begun: it would run ahead of the event

        store.release.set()
        (event,) = await job.log.wait_events_after(0)
        published = trio.current_time()
        assert isinstance(event, ProgressEvent)
        await files_of(supervisor).wait_copies()

        assert origin.requests == [URL.format(job_id=job_id, index=0)]
        # Not at once either: the event's sending to its subscribers goes first.
        delay = files_of(supervisor).settings.copy_delay_s
        assert delay > 0
        assert origin.times == [pytest.approx(published + delay)]
        assert on_disk(tmp_path / "images") == [f"{job_id}-0.png"]


async def test_the_pending_copy_is_stored_with_the_image_that_names_it(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    store = MemoryStore()
    origin = Origin(hold=trio.Event())
    async with service(tmp_path, origin, store) as supervisor:
        job_id = await finished(supervisor, n=2)

        (stored,) = await store.load()

        assert [image.url for image in stored.images] == [
            f"/files/{job_id}-0.png",
            f"/files/{job_id}-1.png",
        ]
        assert [(copy.name, copy.failed) for copy in stored.copies] == [
            (f"{job_id}-0.png", False),
            (f"{job_id}-1.png", False),
        ]
        origin.release()


async def test_copies_are_made_a_few_at_a_time(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    origin = Origin()
    async with service(tmp_path, origin, MemoryStore(), copy_concurrency=3) as supervisor:
        await finished(supervisor, n=10)
        await files_of(supervisor).wait_copies()

        assert origin.peak_in_flight == 3
        assert len(on_disk(tmp_path / "images")) == 10


async def test_a_copy_that_fails_for_good_keeps_the_provider_url_and_is_journaled(
    mock_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore(resumable=True)
    origin = Origin(status=404)
    async with service(tmp_path, origin, store) as supervisor:
        job_id = await finished(supervisor)
        await files_of(supervisor).wait_copies()

        name = f"{job_id}-0.png"
        copy = files_of(supervisor).locate(name)
        assert copy is not None
        assert copy.failed
        assert files_of(supervisor).statistics()["copies_failed"] == 1
        (stored,) = await store.load()
        assert stored.copies == (copy,)
        assert supervisor.get(job_id, owner="alice").status is JobStatus.COMPLETED
    assert len(origin.requests) == 1  # a 404 is not tried again
    assert "its /files/ URL redirects to the provider's" in caplog.text
    assert [r.levelno for r in caplog.records if r.name == "actors.files"] == [logging.WARNING]

    async with service(tmp_path, origin, store) as supervisor:  # the next start
        assert files_of(supervisor).locate(name) == copy  # not tried again
    assert len(origin.requests) == 1


async def test_a_restart_finishes_the_copies_a_stop_cut_short(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    store = MemoryStore(resumable=True)
    origin = Origin(hold=trio.Event())
    async with service(tmp_path, origin, store) as supervisor:
        job_id = await finished(supervisor, n=2)
        assert files_of(supervisor).statistics()["copies_pending"] == 2
    assert on_disk(tmp_path / "images") == []

    origin.hold = None
    async with service(tmp_path, origin, store) as supervisor:
        await files_of(supervisor).wait_copies()

        assert on_disk(tmp_path / "images") == [f"{job_id}-0.png", f"{job_id}-1.png"]
        snapshot = supervisor.get(job_id, owner="alice").snapshot()
        assert [image.status for image in snapshot.images] == [ImageStatus.COMPLETED] * 2
        assert files_of(supervisor).statistics()["copies_pending"] == 0

    requests = len(origin.requests)
    async with service(tmp_path, origin, store) as supervisor:  # the copies are on disk now
        await trio.sleep(1)
        assert files_of(supervisor).statistics()["downloads"] == 0
    assert len(origin.requests) == requests


async def test_a_forgotten_jobs_copy_leaves_no_file(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    origin = Origin(hold=trio.Event())
    store = MemoryStore()
    async with service(tmp_path, origin, store) as supervisor:
        job_id = await finished(supervisor)
        files = files_of(supervisor)

        files.forget(job_id)
        origin.release()
        await files.wait_copies()  # the download ends, and is dropped

        assert files.locate(f"{job_id}-0.png") is None
        assert on_disk(tmp_path / "images") == []


# --- /files/<name> ----------------------------------------------------------------------------


def app_for(supervisor: Supervisor, tmp_path: Path) -> QuartTrio:
    settings = Settings(auth_secret=SECRET)
    local = attrs.evolve(settings.local, images_dir=tmp_path / "images")
    return create_app(supervisor, attrs.evolve(settings, local=local), Authenticator(settings))


async def test_files_redirects_to_the_provider_until_the_copy_is_there(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    origin = Origin(hold=trio.Event())
    async with service(tmp_path, origin, MemoryStore()) as supervisor:
        client = app_for(supervisor, tmp_path).test_client()
        job_id = await finished(supervisor)
        path = f"/files/{job_id}-0.png"

        redirect = await client.get(path)

        assert redirect.status_code == 307
        assert redirect.headers["Location"] == URL.format(job_id=job_id, index=0)
        assert redirect.headers["Cache-Control"] == "no-store"

        origin.release()
        await files_of(supervisor).wait_copies()
        stored = await client.get(path)

        assert stored.status_code == 200
        assert await stored.get_data() == PNG
        assert stored.headers["Content-Type"] == "image/png"
        assert stored.headers["Cache-Control"] == FILE_CACHE_CONTROL


async def test_files_keeps_redirecting_after_a_copy_failed_for_good(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    origin = Origin(status=410)
    async with service(tmp_path, origin, MemoryStore()) as supervisor:
        client = app_for(supervisor, tmp_path).test_client()
        job_id = await finished(supervisor)
        await files_of(supervisor).wait_copies()

        answer = await client.get(f"/files/{job_id}-0.png")

        assert answer.status_code == 307
        assert answer.headers["Location"] == URL.format(job_id=job_id, index=0)
        assert answer.headers["Cache-Control"] == "no-store"
