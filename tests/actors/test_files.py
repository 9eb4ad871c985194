"""ImageFiles: downloads checked and stored on disk, accounting per job, deletion of old jobs.

Downloads go to a real HTTP server on 127.0.0.1 (a small Quart-Trio app under hypercorn), so the
clock is the real one: ``autojump_clock`` can jump while socket I/O is in flight (its jumps
ignore the network). Backoff and timeouts are therefore set to tens of milliseconds, and every
step that could hang is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from actors.files import (
    STRAY_TEMPORARY_S,
    ImageFiles,
    ImageFilesSettings,
    file_extension,
    image_type,
    open_image_files,
    sniff_image,
)
from actors.messages import ImageCopy
from tests.fake_replicate import PNG

JOB = "0b7e4d2a-5c1f-4e8a-9d3b-2f6a1c8e7b90"
OTHER_JOB = "7c2d9e41-0a3b-4f6c-8e5d-1b9a2c3d4e5f"
#: Bounds one step of a test; a hang fails the test instead of blocking the suite.
WAIT_S = 10
#: The cap on one image in these tests (the PNG above is 70 bytes).
SMALL_CAP = 1024


# --- the origin server ---------------------------------------------------------------------------


@attrs.define(eq=False)
class Origin:
    """A server for image files that misbehave in scripted ways; counts requests per path."""

    app: QuartTrio
    requests: Counter[str] = attrs.Factory(Counter)
    url: str = ""

    def at(self, path: str) -> str:
        return self.url + path


def origin_app(requests: Counter[str]) -> QuartTrio:
    app = QuartTrio(__name__)

    @app.before_request
    async def count() -> None:
        requests[request.path] += 1

    @app.get("/png-as-webp")
    @app.get("/out-0.webp")
    async def png_as_webp() -> Response:
        return Response(PNG, 200, {"Content-Type": "image/webp"})

    @app.get("/html")
    async def html() -> Response:
        return Response(b"<html><body>Not found</body></html>", 200, {"Content-Type": "text/html"})

    @app.get("/text-as-png")
    async def text_as_png() -> Response:
        return Response(b"this is not an image, honest", 200, {"Content-Type": "image/png"})

    @app.get("/big")
    async def big() -> Response:
        return Response(PNG + bytes(SMALL_CAP), 200, {"Content-Type": "image/png"})

    @app.get("/endless")
    async def endless() -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield PNG
            while True:  # until the client hangs up
                await trio.lowlevel.checkpoint()
                yield bytes(256)

        return Response(body(), 200, {"Content-Type": "image/png"})

    @app.get("/flaky")
    async def flaky() -> Response:
        if requests["/flaky"] <= 2:
            return Response(b"oops", 500)
        return Response(PNG, 200, {"Content-Type": "image/png; charset=binary"})

    @app.get("/busy")
    async def busy() -> Response:
        if requests["/busy"] == 1:
            return Response(b"slow down", 429, {"Retry-After": "1"})
        return Response(PNG, 200, {"Content-Type": "image/png"})

    @app.get("/missing")
    async def missing() -> Response:
        return Response(b"gone", 404)

    @app.get("/redirect")
    async def redirect() -> Response:
        return Response(b"", 302, {"Location": "/png-as-webp"})

    @app.get("/hang")
    async def hang() -> Response:
        await trio.sleep_forever()

    @app.get("/stalled-body")
    async def stalled_body() -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield PNG[:8]
            await trio.sleep_forever()

        return Response(body(), 200, {"Content-Type": "image/png"})

    return app


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    requests: Counter[str] = Counter()
    origin = Origin(origin_app(requests), requests)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.1
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT_S):
            binds = await nursery.start(
                partial(serve, origin.app, config, shutdown_trigger=shutdown.wait)
            )
        origin.url = binds[0]
        try:
            yield origin
        finally:
            shutdown.set()
            nursery.cancel_scope.cancel()


# --- helpers -------------------------------------------------------------------------------------


@asynccontextmanager
async def opened(
    directory: Path, *, client: httpx.AsyncClient | None = None, **overrides: Any
) -> AsyncIterator[ImageFiles]:
    """Quick retries (10 ms backoff), one-second attempts, the small cap."""
    settings = ImageFilesSettings(
        directory=directory,
        max_image_bytes=SMALL_CAP,
        download_timeout_s=1.0,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
    )
    settings = attrs.evolve(settings, **overrides)
    with trio.fail_after(WAIT_S):
        async with open_image_files(settings, client=client) as files:
            yield files


# Sync helpers: blocking file access stays out of the async tests (flake8-async ASYNC240).
def names_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


def read(path: Path) -> bytes:
    return path.read_bytes()


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


async def served(files: ImageFiles, job_id: str, index: int, url: str) -> str:
    """Keep the image, wait for its copy, and say where its URL leads: ``/files/...`` once the
    copy is stored, the provider's URL while ``/files/...`` redirects there."""
    kept = files.keep(job_id, index, url)
    if kept.copy is not None:
        files.copy_behind(kept.copy)
    with trio.fail_after(WAIT_S):
        await files.wait_copies()
    if kept.copy is not None and files.locate(kept.copy.name) is not None:
        return kept.copy.source
    return kept.url


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The ``extra`` fields of every warning ``actors.files`` logged."""
    return [
        {key: record.__dict__.get(key) for key in ("job_id", "index", "error")}
        for record in caplog.records
        if record.name == "actors.files" and record.levelno == logging.WARNING
    ]


# --- downloads -----------------------------------------------------------------------------------


async def test_the_name_takes_the_urls_image_extension_whatever_the_bytes(
    origin: Origin, tmp_path: Path
) -> None:
    images = tmp_path / "images"  # created on the first download
    async with opened(images) as files:
        url = await served(files, JOB, 2, origin.at("/out-0.webp"))  # PNG bytes, in fact

        assert url == f"/files/{JOB}-2.webp"
        assert names_in(images) == [f"{JOB}-2.webp"]
        assert read(images / f"{JOB}-2.webp") == PNG
        assert files.statistics() == {
            "files": 1,
            "bytes": len(PNG),
            "downloads": 1,
            "download_failures": 0,
            "skipped": 0,
            "copies_pending": 0,
            "copies_failed": 0,
        }


async def test_a_url_without_an_image_extension_gets_a_neutral_one_served_by_signature(
    origin: Origin, tmp_path: Path
) -> None:
    async with opened(tmp_path) as files:
        url = await served(files, JOB, 2, origin.at("/png-as-webp"))

    assert url == f"/files/{JOB}-2.img"
    assert image_type(tmp_path / f"{JOB}-2.img") == "image/png"


@pytest.mark.parametrize(
    ("url", "ext"),
    [
        ("https://replicate.delivery/x/out-0.webp", "webp"),
        ("https://cdn.test/a/b.JPEG?sig=1#top", "jpg"),
        ("https://cdn.test/a.b/image", "img"),
        ("https://cdn.test/a/image.exe", "img"),
        ("https://cdn.test/", "img"),
    ],
)
def test_the_extension_comes_from_the_urls_path(url: str, ext: str) -> None:
    assert file_extension(url) == ext


@pytest.mark.parametrize(
    "url",
    [f"/files/{JOB}-0.img", "data:image/png;base64,iVBORw0KGgo=", "ftp://example.com/a.png"],
)
async def test_a_url_that_is_not_absolute_http_is_returned_unchanged(
    tmp_path: Path, url: str
) -> None:
    async with opened(tmp_path) as files:
        assert await served(files, JOB, 0, url) == url

        assert names_in(tmp_path) == []
        assert files.statistics()["downloads"] == files.statistics()["skipped"] == 0


async def test_with_storing_off_the_url_is_handed_out_and_counted_as_skipped(
    origin: Origin, tmp_path: Path
) -> None:
    url = origin.at("/png-as-webp")
    async with opened(tmp_path, store_remote=False) as files:
        assert await served(files, JOB, 0, url) == url

        assert origin.requests["/png-as-webp"] == 0
        assert names_in(tmp_path) == []
        assert files.statistics()["skipped"] == 1


async def test_an_html_answer_is_refused_once_with_a_warning(
    origin: Origin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = origin.at("/html")
    async with opened(tmp_path) as files:
        assert await served(files, JOB, 1, url) == url

        assert names_in(tmp_path) == []
        assert origin.requests["/html"] == 1  # permanent: not retried
        assert files.statistics()["download_failures"] == 1
    [warning] = warnings_logged(caplog)
    assert warning["job_id"] == JOB
    assert warning["index"] == 1
    assert "text/html" in warning["error"]


async def test_bytes_that_are_not_an_image_are_refused_despite_an_image_type(
    origin: Origin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = origin.at("/text-as-png")
    async with opened(tmp_path) as files:
        assert await served(files, JOB, 0, url) == url

        assert names_in(tmp_path) == []
        assert origin.requests["/text-as-png"] == 1
    [warning] = warnings_logged(caplog)
    assert "not a PNG" in warning["error"]


async def test_a_body_over_the_cap_is_refused_by_its_content_length(
    origin: Origin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = origin.at("/big")
    async with opened(tmp_path) as files:
        assert await served(files, JOB, 0, url) == url

        assert names_in(tmp_path) == []  # no image, no temporary file
        assert origin.requests["/big"] == 1
    [warning] = warnings_logged(caplog)
    assert f"Content-Length {len(PNG) + SMALL_CAP}" in warning["error"]


async def test_a_streamed_body_is_cut_off_once_past_the_cap(
    origin: Origin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = origin.at("/endless")  # chunked, no Content-Length, never ends by itself
    async with opened(tmp_path, download_timeout_s=WAIT_S) as files:
        assert await served(files, JOB, 0, url) == url

        assert names_in(tmp_path) == []
        assert origin.requests["/endless"] == 1
    [warning] = warnings_logged(caplog)
    assert warning["error"] == f"more than {SMALL_CAP} bytes"  # not the timeout


async def test_two_server_errors_then_an_image_is_stored_on_the_third_attempt(
    origin: Origin, tmp_path: Path
) -> None:
    async with opened(tmp_path, download_attempts=3) as files:
        url = await served(files, JOB, 0, origin.at("/flaky"))

        assert url == f"/files/{JOB}-0.img"
        assert origin.requests["/flaky"] == 3
        assert read(tmp_path / f"{JOB}-0.img") == PNG


async def test_server_errors_past_the_last_attempt_hand_out_the_url(
    origin: Origin, tmp_path: Path
) -> None:
    url = origin.at("/flaky")
    async with opened(tmp_path, download_attempts=2) as files:
        assert await served(files, JOB, 0, url) == url

        assert origin.requests["/flaky"] == 2
        assert names_in(tmp_path) == []
        assert files.statistics()["download_failures"] == 1


async def test_a_429_waits_for_retry_after_up_to_the_cap(origin: Origin, tmp_path: Path) -> None:
    # Retry-After: 1 is capped at backoff_max_s, which is well above the 10 ms base backoff.
    async with opened(tmp_path, backoff_max_s=0.3) as files:
        start = trio.current_time()
        url = await served(files, JOB, 0, origin.at("/busy"))
        elapsed = trio.current_time() - start

    assert url == f"/files/{JOB}-0.img"
    assert origin.requests["/busy"] == 2
    assert 0.3 <= elapsed < 0.9


async def test_a_404_is_not_retried(origin: Origin, tmp_path: Path) -> None:
    url = origin.at("/missing")
    async with opened(tmp_path, download_attempts=3) as files:
        assert await served(files, JOB, 0, url) == url

        assert origin.requests["/missing"] == 1
        assert files.statistics()["download_failures"] == 1


@pytest.mark.parametrize("attempts", [1, 2])
async def test_a_server_that_never_answers_times_out_each_attempt(
    origin: Origin, tmp_path: Path, caplog: pytest.LogCaptureFixture, attempts: int
) -> None:
    url = origin.at("/hang")
    async with opened(tmp_path, download_timeout_s=0.3, download_attempts=attempts) as files:
        start = trio.current_time()
        assert await served(files, JOB, 0, url) == url
        elapsed = trio.current_time() - start

    assert origin.requests["/hang"] == attempts
    assert 0.3 * attempts <= elapsed < 0.3 * attempts + 0.5
    [warning] = warnings_logged(caplog)
    assert "within 0.3 s" in warning["error"]


async def test_its_own_client_follows_redirects(origin: Origin, tmp_path: Path) -> None:
    async with opened(tmp_path) as files:
        url = await served(files, JOB, 0, origin.at("/redirect"))

    assert url == f"/files/{JOB}-0.img"
    assert origin.requests["/png-as-webp"] == 1


async def test_a_failed_write_leaves_no_temporary_file(
    origin: Origin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path / f"{JOB}-0.img" / "in-the-way", b"")  # a directory where the image goes
    url = origin.at("/png-as-webp")
    async with opened(tmp_path) as files:
        assert await served(files, JOB, 0, url) == url

        assert names_in(tmp_path) == [f"{JOB}-0.img"]  # still the directory, nothing else
        assert files.statistics()["download_failures"] == 1
    assert len(warnings_logged(caplog)) == 1


async def test_stopping_mid_copy_leaves_no_file_and_the_copy_pending(
    origin: Origin, tmp_path: Path
) -> None:
    headers_arrived = trio.Event()

    async def on_response(response: httpx.Response) -> None:
        headers_arrived.set()

    async with (
        httpx.AsyncClient(event_hooks={"response": [on_response]}) as client,
        opened(tmp_path, client=client, download_timeout_s=WAIT_S) as files,
    ):
        kept = files.keep(JOB, 0, origin.at("/stalled-body"))
        assert kept.copy is not None
        files.copy_behind(kept.copy)
        await headers_arrived.wait()  # the body is on its way, and stalls

        assert kept.copy is not None
        assert files.locate(kept.copy.name) == kept.copy
        assert files.statistics()["copies_pending"] == 1

    assert names_in(tmp_path) == []
    assert files.statistics()["downloads"] == files.statistics()["download_failures"] == 0


async def test_a_job_id_that_is_not_a_file_name_is_refused(origin: Origin, tmp_path: Path) -> None:
    async with opened(tmp_path) as files:
        with pytest.raises(ValueError, match="not a job id"):
            files.keep("../escape", 0, origin.at("/png-as-webp"))

    assert origin.requests["/png-as-webp"] == 0


@pytest.mark.parametrize(
    ("data", "ext"),
    [
        (PNG, "png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpg"),
        (b"GIF89a\x01\x00", "gif"),
        (b"GIF87a\x01\x00", "gif"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", None),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", None),
        (b"", None),
    ],
)
def test_the_extension_comes_from_the_signature(data: bytes, ext: str | None) -> None:
    assert sniff_image(data) == ext


def test_backoff_doubles_to_its_cap_and_honours_retry_after_up_to_it(tmp_path: Path) -> None:
    settings = ImageFilesSettings(directory=tmp_path)

    assert [settings.backoff_s(attempt) for attempt in (1, 2, 3, 4, 5)] == [0.5, 1, 2, 4, 5]
    assert settings.backoff_s(1, retry_after_s=3) == 3
    assert settings.backoff_s(1, retry_after_s=60) == 5
    assert settings.backoff_s(3, retry_after_s=0) == 2


# --- accounting and deletion ---------------------------------------------------------------------


async def test_keep_and_added_count_bytes_per_job_and_forget_drops_them_at_once(
    origin: Origin, tmp_path: Path
) -> None:
    local_png = bytes(100)
    async with opened(tmp_path) as files:
        await served(files, JOB, 0, origin.at("/png-as-webp"))
        await served(files, JOB, 0, origin.at("/png-as-webp"))  # the same file again: counted once
        await served(files, OTHER_JOB, 0, origin.at("/png-as-webp"))
        write(tmp_path / f"{JOB}-1.png", local_png)  # as the local provider would
        files.added(JOB, f"{JOB}-1.png", len(local_png))
        files.added(JOB, f"{JOB}-1.png", len(local_png))  # rendered again: counted once

        assert files.total_bytes == 2 * len(PNG) + len(local_png)
        assert files.statistics()["files"] == 3

        files.forget(JOB)

        assert files.total_bytes == len(PNG)  # before the files are gone
        assert files.statistics()["files"] == 1
        await files.wait_forgotten()
        assert names_in(tmp_path) == [f"{OTHER_JOB}-0.img"]


async def test_an_image_kept_before_a_restart_is_not_fetched_again(
    origin: Origin, tmp_path: Path
) -> None:
    async with opened(tmp_path) as files:
        first = await served(files, JOB, 0, origin.at("/png-as-webp"))
    async with opened(tmp_path) as files:  # the next start finds the file
        # The provider's URL has expired meanwhile: the copy on disk is what counts.
        again = await served(files, JOB, 0, origin.at("/missing"))

    assert again == first == f"/files/{JOB}-0.img"
    assert files.statistics()["download_failures"] == 0


async def test_forget_all_but_deletes_the_files_of_unknown_jobs(
    origin: Origin, tmp_path: Path
) -> None:
    async with opened(tmp_path) as files:
        await served(files, JOB, 0, origin.at("/png-as-webp"))
        await served(files, OTHER_JOB, 0, origin.at("/png-as-webp"))

        files.forget_all_but({OTHER_JOB})

        assert files.total_bytes == len(PNG)
        await files.wait_forgotten()
        assert names_in(tmp_path) == [f"{OTHER_JOB}-0.img"]


async def test_over_budget_until_a_job_is_forgotten(origin: Origin, tmp_path: Path) -> None:
    async with opened(tmp_path, max_total_bytes=len(PNG) + 1) as files:
        await served(files, JOB, 0, origin.at("/png-as-webp"))
        one_image = files.over_budget
        await served(files, OTHER_JOB, 0, origin.at("/png-as-webp"))
        two_images = files.over_budget
        files.forget(JOB)
        one_forgotten = files.over_budget

    assert (one_image, two_images, one_forgotten) == (False, True, False)


async def test_forget_deletes_only_that_jobs_files(tmp_path: Path) -> None:
    names = ["a-0.png", "a-1.jpg", "a-b-0.png", "ab-0.png", "other.txt"]
    for name in names:
        write(tmp_path / name, b"x")
    async with opened(tmp_path) as files:
        files.forget("a")
        files.forget("a")  # twice, and a job without files: both fine
        files.forget("no-such-job")
        await files.wait_forgotten()

        assert names_in(tmp_path) == ["a-b-0.png", "ab-0.png", "other.txt"]


async def test_start_up_accounts_existing_files_and_removes_stray_temporary_files(
    tmp_path: Path,
) -> None:
    write(tmp_path / f"{JOB}-0.png", bytes(10))
    write(tmp_path / f"{JOB}-1.jpg", bytes(20))
    write(tmp_path / f"{OTHER_JOB}-0.png", bytes(5))
    stray = tmp_path / f".{JOB}-2.png.4242.tmp"  # a process died while writing it
    write(stray, bytes(1000))
    an_hour_ago = time.time() - STRAY_TEMPORARY_S - 1
    os.utime(stray, (an_hour_ago, an_hour_ago))
    # Another live node's write in progress (the directory is shared by a cluster): kept.
    write(tmp_path / f".{OTHER_JOB}-1.png.77.0a1b2c3d.tmp", bytes(1000))
    write(tmp_path / "README", bytes(7))  # not an image of a job: left alone, not counted

    async with opened(tmp_path) as files:
        assert names_in(tmp_path) == sorted(
            [
                f".{OTHER_JOB}-1.png.77.0a1b2c3d.tmp",
                "README",
                f"{JOB}-0.png",
                f"{JOB}-1.jpg",
                f"{OTHER_JOB}-0.png",
            ]
        )
        assert files.total_bytes == 35
        assert files.statistics()["files"] == 3

        files.forget(JOB)
        assert files.total_bytes == 5
        await files.wait_forgotten()

        assert names_in(tmp_path) == sorted(
            [f".{OTHER_JOB}-1.png.77.0a1b2c3d.tmp", "README", f"{OTHER_JOB}-0.png"]
        )


async def test_start_up_without_a_directory_accounts_nothing(tmp_path: Path) -> None:
    async with opened(tmp_path / "not-yet") as files:
        files.forget(JOB)
        await files.wait_forgotten()

        assert files.total_bytes == 0
        assert not (tmp_path / "not-yet").exists()


async def test_jobs_forgotten_just_before_closing_lose_their_files(tmp_path: Path) -> None:
    write(tmp_path / f"{JOB}-0.png", PNG)
    async with opened(tmp_path) as files:
        files.forget(JOB)  # no checkpoint before the block ends

    assert names_in(tmp_path) == []


async def test_a_copy_another_process_made_meanwhile_is_counted_not_made_again(
    origin: Origin, tmp_path: Path
) -> None:
    name = f"{JOB}-0.img"
    url = origin.at("/png-as-webp")
    written: list[tuple[str, int]] = []
    async with opened(tmp_path) as files:
        files.on_written = lambda job_id, change: written.append((job_id, change))
        # Another node of a cluster made the copy after this process started (and counted it).
        write(tmp_path / name, PNG)
        copy = ImageCopy(job_id=JOB, index=0, name=name, source=url)
        files.resume_copies([copy], journal=lambda failed: None)
        with trio.fail_after(WAIT_S):
            await files.wait_copies()
        pending = files.locate(name)
        total = files.total_bytes

    assert origin.requests["/png-as-webp"] == 0
    assert written == []
    assert (pending, total) == (None, len(PNG))  # no copy pending: the file is served
