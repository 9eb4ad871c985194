"""Durability end to end: real ``python -m web`` processes on one SQLite file, killed with
SIGKILL, stopped with SIGTERM, and started again; real sockets and the real clock.

What a restart keeps: every event with its id (SSE and WebSocket resumes continue where the
client stopped), the images (the service's own copies under ``/files/``) and Idempotency-Keys.
What it must not do: create a second Replicate prediction for an image that had one, or one
whose create was in flight when the process died.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import trio

from tests.e2e.ports import free_port
from tests.e2e.replicate_service import Answers, replicate_environ
from tests.e2e.service_clients import (
    PNG_SIGNATURE,
    WAIT_S,
    WS_NORMAL,
    Event,
    check_continuation,
    check_images,
    database,
    get_json,
    http,
    kill_after_events,
    open_sse,
    poll_until,
    read_sse,
    read_ws,
    service,
    submit,
    submit_job,
    token,
    wait_for_copies,
    ws_rest,
)
from tests.e2e.test_server import open_ws
from tests.e2e.web_process import ROOT, web_process_to_its_end
from tests.fake_replicate import PNG, FakeReplicate, run_fake_replicate


@pytest.fixture
async def fake() -> AsyncIterator[FakeReplicate]:
    fake = FakeReplicate(latency_s=0.2)
    async with run_fake_replicate(fake):
        yield fake


def finish_soon(fake: FakeReplicate, delay_s: float) -> None:
    """Every prediction the fake holds ends ``delay_s`` from now (at its next poll after that).

    The tests create predictions that would run for a minute, so that whatever the machine's
    speed, the service is killed while they run; then they let them end.
    """
    for prediction in fake.predictions.values():
        prediction.done_at = trio.current_time() + delay_s


async def wait_until_stored(client: httpx.AsyncClient) -> None:
    """Until the store has nothing queued: every write made so far is committed.

    (The SQLite store trims its queue only after the transaction, see actors/store/sqlite.py.)
    """
    with trio.fail_after(WAIT_S):
        while True:
            if not (await get_json(client, "/api/status"))["store"]["queued"]:
                return
            await trio.sleep(0.02)


# --- 1. kill -9 with the local provider ----------------------------------------------------------


async def test_a_killed_service_carries_its_job_on_and_streams_resume_after_the_last_id(
    tmp_path: Path,
) -> None:
    # 6 images, 2 at a time, 600-900 ms each: the job needs at least 1.8 s, and the kill comes
    # right after the first two images (at most 0.9 s plus rendering).
    environ = {"LOCAL_LATENCY_MS": "600-900", "MAX_CONCURRENCY": "2"}
    async with service(tmp_path, environ, name="first") as first, http(first) as client:
        job_id = await submit_job(client, 6)
        seen = await kill_after_events(client, job_id, first, 2)
    assert [(event.id, event.type) for event in seen] == [(1, "progress"), (2, "progress")]
    last_seen = seen[-1].id

    async with service(tmp_path, environ, name="second") as second, http(second) as client:
        ws_url = second.ws_url(
            f"/api/generate/{job_id}?token={token(client)}&last_event_id={last_seen}"
        )
        after: list[Event] = []
        ws_replies: list[tuple[list[Event], int]] = []

        async def follow_sse() -> None:
            after.extend(await read_sse(client, job_id, last_event_id=last_seen))

        async def follow_ws() -> None:
            ws_replies.append(await read_ws(ws_url))

        # Both follow the job live while the new process carries it on.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow_sse)
            nursery.start_soon(follow_ws)
        replay = await read_sse(client, job_id)
        job = await get_json(client, f"/api/generate/{job_id}")
        images = await check_images(client, job, second.url)
        status = await get_json(client, "/api/status")

    [(ws_after, ws_close)] = ws_replies
    check_continuation(seen, after, 6)
    assert ws_after == after
    assert ws_close == WS_NORMAL
    # The events from before the kill kept their ids and payloads (URLs are per origin).
    assert [event.without_origin() for event in replay] == [
        event.without_origin() for event in seen + after
    ]
    assert (job["progress"]["completed"], job["progress"]["total"]) == (6, 6)
    assert all(image.startswith(PNG_SIGNATURE) for image in images)
    # The new process rendered the images that were not finished: the job was carried on, not
    # found finished.
    assert 1 <= status["images"]["completed_total"] <= 6 - last_seen
    assert "Traceback" not in second.stderr()


# --- 2. kill -9 with Replicate -------------------------------------------------------------------


async def test_a_killed_service_resumes_its_predictions_and_creates_none(
    fake: FakeReplicate, tmp_path: Path
) -> None:
    fake.latency_s = 60  # until finish_soon()
    answers = Answers(fake)
    # Creates are held for 1 s (Prefer: wait=1) and answer "processing"; then the images poll.
    environ = replicate_environ(fake, REPLICATE_WAIT_S="1")
    async with service(tmp_path, environ, name="first") as first, http(first) as client:
        job_id = await submit_job(client, 5)
        with trio.fail_after(WAIT_S):
            await answers.wait_until_polled(5)  # every create has answered with an id
        await wait_until_stored(client)  # ... and every id is in the journal
        await first.kill()
    assert (fake.create_requests, len(fake.predictions)) == (5, 5)
    finish_soon(fake, 0.5)

    async with service(tmp_path, environ, name="second") as second, http(second) as client:
        events = await read_sse(client, job_id)
        stats = (await get_json(client, "/api/status"))["provider"]

    check_continuation([], events, 5)
    # One prediction per image, none created after the restart, each one's output used once.
    assert (fake.create_requests, len(fake.predictions)) == (5, 5)
    assert {event.data["url"] for event in events[:-1]} == {
        f"{fake.base_url}/files/{prediction_id}/out-0.webp" for prediction_id in fake.predictions
    }
    assert (stats["creates"], stats["resumed"], stats["reconciled"]) == (0, 5, 0)
    assert (stats["images"], stats["in_flight"]) == (5, 0)


async def test_creates_in_flight_at_a_kill_are_reconciled_not_repeated(
    fake: FakeReplicate, tmp_path: Path
) -> None:
    # Prefer: wait=30 on predictions of a minute: when the fake has made all five, every create
    # is still held open, so the service knows no prediction id, only its "pending since" notes
    # (each stored before its create was sent).
    fake.latency_s = 60
    environ = replicate_environ(fake, REPLICATE_WAIT_S="30")
    async with service(tmp_path, environ, name="first") as first, http(first) as client:
        job_id = await submit_job(client, 5)
        with trio.fail_after(WAIT_S):
            await fake.wait_for_predictions(5)
        await first.kill()
    assert (fake.create_requests, len(fake.predictions)) == (5, 5)
    finish_soon(fake, 0.5)

    async with service(tmp_path, environ, name="second") as second, http(second) as client:
        events = await read_sse(client, job_id)
        stats = (await get_json(client, "/api/status"))["provider"]

    check_continuation([], events, 5)
    # Each image adopted a different one of the five from Replicate's list; none was created.
    assert (fake.create_requests, len(fake.predictions)) == (5, 5)
    assert {event.data["url"] for event in events[:-1]} == {
        f"{fake.base_url}/files/{prediction_id}/out-0.webp" for prediction_id in fake.predictions
    }
    assert (stats["creates"], stats["reconciled"], stats["resumed"]) == (0, 5, 0)


# --- 3. SIGTERM: the grace period ----------------------------------------------------------------


async def test_sigterm_refuses_new_jobs_while_running_ones_finish_and_their_streams_go_on(
    tmp_path: Path,
) -> None:
    grace_s = 5
    environ = {"LOCAL_LATENCY_MS": "1500", "SHUTDOWN_GRACE_S": str(grace_s)}
    async with service(tmp_path, environ, name="first") as first, http(first) as client:
        job_id = await submit_job(client, 5)
        ws_url = first.ws_url(f"/api/generate/{job_id}?token={token(client)}")
        with trio.fail_after(WAIT_S):
            async with open_sse(client, job_id) as events, open_ws(ws_url) as ws:
                before = await get_json(client, f"/api/generate/{job_id}")
                first.process.send_signal(signal.SIGTERM)
                t0 = trio.current_time()
                health = await poll_until(client, "/health", 503)
                late = await submit(client, 5, prompt="one more, please")
                sse_events = await events.rest()
                ws_events, ws_close = await ws_rest(ws)
            exit_code = await first.process.wait()
            exited_after = trio.current_time() - t0

    assert before["status"] in {"pending", "running"}
    assert before["progress"]["completed"] == 0
    assert health.json() == {
        "status": "degraded",
        "detail": "Shutting down",
        "checks": {"supervisor": "shutting_down", "store": "ok"},
    }
    assert late.status_code == 503
    assert isinstance(late.json()["detail"], str)
    assert late.headers["retry-after"].isdigit()
    # Every image finished after the signal, and both streams carried every event to the end.
    # (The job's last events are published in the very step in which the drain ends every
    # subscriber's wait: they must still go out before the streams end.)
    check_continuation([], sse_events, 5)
    assert ws_events == sse_events
    assert ws_close == WS_NORMAL
    assert exit_code == 0
    assert exited_after < grace_s  # it stopped when the job ended, not when the grace did
    assert "Traceback" not in first.stderr()

    async with service(tmp_path, environ, name="second") as second, http(second) as client:
        job = await get_json(client, f"/api/generate/{job_id}")
        replay = await read_sse(client, job_id)
    assert (job["status"], job["progress"]["completed"]) == ("completed", 5)
    assert [event.without_origin() for event in replay] == [
        event.without_origin() for event in sse_events
    ]


async def test_the_process_exits_as_soon_as_a_job_ending_within_the_grace_is_streamed(
    tmp_path: Path,
) -> None:
    graceful_timeout_s = 4
    environ = {
        "LOCAL_LATENCY_MS": "1000",
        "SHUTDOWN_GRACE_S": "5",
        "GRACEFUL_TIMEOUT_S": str(graceful_timeout_s),
    }
    async with service(tmp_path, environ, name="first") as first, http(first) as client:
        job_id = await submit_job(client, 5)
        with trio.fail_after(WAIT_S):
            async with open_sse(client, job_id) as events:
                first.process.send_signal(signal.SIGTERM)
                streamed = await events.rest()
            # The client keeps its connection for the next request, as browsers and proxies do.
            t0 = trio.current_time()
            assert await first.process.wait() == 0
            exited_after = trio.current_time() - t0

    check_continuation([], streamed, 5)
    # Without the third fix of web/hypercorn_fixes.py: 4.0 s (the graceful timeout), every run.
    assert exited_after < graceful_timeout_s / 2


async def test_a_job_outliving_the_grace_is_carried_on_at_the_next_start(tmp_path: Path) -> None:
    # 6 images of 1 s, 2 at a time: SIGTERM comes with the first result (about 1 s in), the
    # grace ends 0.5 s later, and the job would need at least 2 s more.
    environ = {"LOCAL_LATENCY_MS": "1000", "MAX_CONCURRENCY": "2", "SHUTDOWN_GRACE_S": "0.5"}
    async with service(tmp_path, environ, name="first") as first, http(first) as client:
        job_id = await submit_job(client, 6)
        with trio.fail_after(WAIT_S):
            async with open_sse(client, job_id) as events:
                first_event = await events.next()
                first.process.send_signal(signal.SIGTERM)
                t0 = trio.current_time()
                rest = await events.rest()
            exit_code = await first.process.wait()
            exited_after = trio.current_time() - t0
    assert first_event is not None
    seen = [first_event, *rest]
    assert [event.type for event in seen] == ["progress"] * len(seen)  # no done
    assert exit_code == 0
    assert exited_after < 2.0  # the grace, and no wait for the job
    assert "Traceback" not in first.stderr()

    async with service(tmp_path, environ, name="second") as second, http(second) as client:
        after = await read_sse(client, job_id, last_event_id=seen[-1].id)
        job = await get_json(client, f"/api/generate/{job_id}")
    check_continuation(seen, after, 6)
    assert (job["job_id"], job["status"], job["progress"]["completed"]) == (job_id, "completed", 6)


# --- 4. Idempotency-Key --------------------------------------------------------------------------


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_an_idempotency_key_outlives_a_restart(tmp_path: Path, stop: str) -> None:
    environ = {"LOCAL_LATENCY_MS": "300", "SHUTDOWN_GRACE_S": "0"}
    key = {"Idempotency-Key": "order-42"}
    async with service(tmp_path, environ, name="first") as first, http(first) as client:
        created = await submit(client, 5, prompt="a quiet harbour", headers=key)
        # The answer comes once the job is stored: even a kill right now must not lose it.
        if stop == "sigkill":
            await first.kill()
        else:
            assert await first.terminate() == 0
    assert created.status_code == 200, created.text
    assert created.json()["created"] is True
    job_id = created.json()["job_id"]

    async with service(tmp_path, environ, name="second") as second, http(second) as client:
        again = await submit(client, 5, prompt="a quiet harbour", headers=key)
        other_body = await submit(client, 6, prompt="a quiet harbour", headers=key)
        events = await read_sse(client, job_id)
        jobs = await get_json(client, "/api/generate")

    assert again.status_code == 200, again.text
    assert (again.json()["job_id"], again.json()["created"]) == (job_id, False)
    assert again.json()["num_images"] == 5
    assert other_body.status_code == 422
    [problem] = other_body.json()["detail"]
    assert problem["loc"] == ["header", "Idempotency-Key"]
    check_continuation([], events, 5)  # carried on after the restart
    assert [job["job_id"] for job in jobs["results"]] == [job_id]


# --- 5. stored images ----------------------------------------------------------------------------


async def test_stored_images_outlive_replicate_and_the_process(tmp_path: Path) -> None:
    fake = FakeReplicate(latency_s=0.2)
    async with run_fake_replicate(fake):
        environ = replicate_environ(fake, STORE_IMAGES="true")
        async with service(tmp_path, environ, name="first") as first, http(first) as client:
            job_id = await submit_job(client, 5)
            events = await read_sse(client, job_id)
            job = await get_json(client, f"/api/generate/{job_id}")
            images = await check_images(client, job, first.url)
            # Replicate deletes outputs after an hour: here, at once.
            outputs = [f"{fake.base_url}/files/{pid}/out-0.webp" for pid in fake.predictions]
            fake.predictions.clear()
            expired = []
            with trio.fail_after(WAIT_S):
                for url in outputs:
                    response = await client.get(url)
                    expired.append(response.status_code)
            images_after_expiry = await check_images(client, job, first.url)
            assert await first.terminate() == 0
    # Replicate is gone altogether now.

    async with service(tmp_path, environ, name="second") as second, http(second) as client:
        restored = await get_json(client, f"/api/generate/{job_id}")
        images_after_restart = await check_images(client, restored, second.url)

    check_continuation([], events, 5)
    assert {event.data["url"] for event in events[:-1]} == {
        result["url"] for result in job["results"]
    }
    assert images == [PNG] * 5
    assert expired == [404] * 5
    assert images_after_expiry == images_after_restart == images


async def test_copies_pending_at_a_kill_are_made_by_the_next_start(
    fake: FakeReplicate, tmp_path: Path
) -> None:
    fake.hold_copies()  # the service's downloads of the outputs wait
    environ = replicate_environ(fake, STORE_IMAGES="true")
    async with service(tmp_path, environ, name="first") as first, http(first) as client:
        job_id = await submit_job(client, 5)
        events = await read_sse(client, job_id)  # every image published, no copy made
        files = (await get_json(client, "/api/status"))["files"]
        name = f"{job_id}-0.webp"
        with trio.fail_after(WAIT_S):
            redirect = await client.get(f"/files/{name}")
        await first.kill()
    assert (files["copies_pending"], files["downloads"]) == (5, 0)
    assert redirect.status_code == 307
    assert redirect.headers["location"].startswith(f"{fake.base_url}/files/")
    assert not (tmp_path / "images").exists() or not list((tmp_path / "images").iterdir())
    fake.release_copies()

    async with service(tmp_path, environ, name="second") as second, http(second) as client:
        files = await wait_for_copies(client)
        with trio.fail_after(WAIT_S):
            stored = await client.get(f"/files/{name}")

    check_continuation([], events, 5)
    assert [event.data["url"] for event in events[:-1]] == [
        f"{first.url}/files/{job_id}-{event.data['index']}.webp" for event in events[:-1]
    ]
    assert (files["copies_pending"], files["copies_failed"], files["downloads"]) == (0, 0, 5)
    assert (stored.status_code, stored.content) == (200, PNG)
    assert stored.headers["content-type"] == "image/png"  # the bytes' type, whatever the name


# --- 6. an unusable store ------------------------------------------------------------------------


def lock_for_writing(path: Path) -> sqlite3.Connection:
    """Another writer holding the database: the service's writes wait out its busy_timeout
    (5 s, actors/store/sqlite.py) and fail with "database is locked". Deterministic, unlike
    corrupting a file the service has open: its writes go to the WAL and its cache, so they may
    well succeed. Readers are not blocked (WAL), so the health check's own read still works."""
    connection = sqlite3.connect(path, isolation_level=None, timeout=WAIT_S)
    connection.execute("BEGIN EXCLUSIVE")
    return connection


async def test_a_store_that_cannot_write_makes_health_degraded_and_creates_answer_503(
    tmp_path: Path,
) -> None:
    environ = {"LOCAL_LATENCY_MS": "100"}
    async with service(tmp_path, environ, name="first") as first, http(first) as client:
        healthy = await client.get("/health")
        lock = lock_for_writing(database(tmp_path))
        try:
            with trio.fail_after(3 * WAIT_S):
                refused = await client.post(
                    "/api/generate",
                    json={"prompt": "a locked door", "num_images": 5},
                    timeout=3 * WAIT_S,
                )
            degraded = await client.get("/health")
            listed = await get_json(client, "/api/generate")
        finally:
            lock.rollback()
            lock.close()
        # Once the store writes again, so does the service.
        accepted = await submit(client, 5, prompt="an open door")
        recovered = await client.get("/health")

    assert healthy.status_code == 200
    assert refused.status_code == 503
    assert isinstance(refused.json()["detail"], str)
    assert refused.headers["retry-after"].isdigit()
    assert degraded.status_code == 503
    body = degraded.json()
    assert (body["status"], body["checks"]["supervisor"]) == ("degraded", "ok")
    assert "database is locked" in body["checks"]["store"]
    assert listed["results"] == []
    assert accepted.status_code == 200, accepted.text
    assert recovered.status_code == 200
    assert "Traceback" not in first.stderr()

    async with service(tmp_path, environ, name="second") as second, http(second) as client:
        jobs = await get_json(client, "/api/generate")
    assert [job["prompt"] for job in jobs["results"]] == ["an open door"]


async def test_health_recovers_once_the_store_can_write_again(tmp_path: Path) -> None:
    async with service(tmp_path, {}, name="first") as first, http(first) as client:
        lock = lock_for_writing(database(tmp_path))
        try:
            with trio.fail_after(3 * WAIT_S):
                refused = await client.post(
                    "/api/generate",
                    json={"prompt": "a locked door", "num_images": 5},
                    timeout=3 * WAIT_S,
                )
        finally:
            lock.rollback()
            lock.close()
        # The store can write again. Nothing writes, though: an idle service gets no request
        # that would, and neither does one that a load balancer took out for its 503s.
        with trio.move_on_after(3):
            while True:
                health = await client.get("/health")
                if health.status_code == 200:
                    break
                await trio.sleep(0.05)

    assert refused.status_code == 503
    assert health.status_code == 200, health.json()  # seen: 503, "database is locked"


def remove_database(workdir: Path) -> None:
    for path in workdir.glob(f"{database(workdir).name}*"):  # with its -wal and -shm
        path.unlink()


async def test_health_is_degraded_when_the_database_file_is_gone(tmp_path: Path) -> None:
    # The service's connection still writes to the unlinked file: only a check that opens the
    # path afresh sees that the next start will not find those jobs.
    async with service(tmp_path, {}, name="first") as first, http(first) as client:
        healthy = await client.get("/health")
        remove_database(tmp_path)
        degraded = await client.get("/health")

    assert healthy.status_code == 200
    assert degraded.status_code == 503
    body = degraded.json()
    assert (body["status"], body["checks"]["supervisor"]) == ("degraded", "ok")
    assert "unable to open database file" in body["checks"]["store"]
    assert "Traceback" not in first.stderr()


def garbage(path: Path) -> None:
    path.write_bytes(b"not a database " * 100)


def newer_schema(path: Path) -> None:
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version = 99")
    connection.close()


def schema(path: Path) -> tuple[int, list[str]]:
    """The database's schema version and tables."""
    connection = sqlite3.connect(path)
    try:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master")]
    finally:
        connection.close()
    return version, tables


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (garbage, "file is not a database"),
        (newer_schema, "newer than this service knows"),
    ],
    ids=["garbage", "newer-schema"],
)
async def test_an_unusable_database_file_stops_the_start_with_exit_code_2(
    tmp_path: Path, make: Callable[[Path], None], reason: str
) -> None:
    path = database(tmp_path)
    make(path)
    garbage_bytes = path.read_bytes()
    env = {
        **os.environ,
        "DATABASE_PATH": str(path),
        "IMAGES_DIR": str(tmp_path / "images"),
        "PORT": str(free_port()),
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }
    result = await web_process_to_its_end(tmp_path, env, timeout_s=2 * WAIT_S)

    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert stderr.startswith("error: the job store cannot be used: "), stderr
    assert reason in stderr
    assert stderr.count("\n") == 1
    assert "Traceback" not in stderr
    # The file is left as it was (a newer release's database: its schema untouched).
    if make is garbage:
        assert path.read_bytes() == garbage_bytes
    else:
        assert schema(path) == (99, [])
