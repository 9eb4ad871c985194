"""Online backup and restore of the SQLite store (``python -m web.backup``), end to end: real
``python -m web`` processes, the backup taken while one serves a stream of new jobs, and services
started on the copy."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.e2e.service_clients import (
    WAIT_S,
    Event,
    database,
    get_json,
    http,
    poll_until,
    read_sse,
    service,
    submit,
)
from tests.e2e.web_process import ROOT
from web.backup import BackupError, backup, restore

#: Images take 50-150 ms, two at a time: jobs finish while others are still being made.
LOAD = {"LOCAL_LATENCY_MS": "50-150", "MAX_CONCURRENCY": "2", "MAX_ACTIVE_JOBS_PER_USER": "20"}
#: Jobs finished before the backup is taken.
FINISHED_BEFORE = 4


async def run_backup(workdir: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``python -m web.backup ARGS`` as an operator runs it, on ``workdir``'s database."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_PATH": str(database(workdir))}
    with trio.fail_after(WAIT_S):
        return await trio.run_process(
            [sys.executable, "-m", "web.backup", *args],
            cwd=workdir,
            env=environ,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def jobs_of(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    page = await get_json(client, "/api/generate?limit=100")
    assert page["next_cursor"] is None
    return {job["job_id"]: job for job in page["results"]}


async def keep_submitting(client: httpx.AsyncClient, accepted: list[str], stop: trio.Event) -> None:
    """New 5-image jobs, about as fast as they are made, until ``stop``: the load the backup
    runs under (a 429 only means the service is behind for now). Stopped between requests, not
    cancelled: httpx leaves a request body cut by a cancellation unclosed (a ResourceWarning
    when it is collected, in whichever test runs then)."""
    while not stop.is_set():
        response = await submit(client, 5)
        if response.status_code == 200:
            accepted.append(response.json()["job_id"])
        else:
            assert response.status_code == 429, response.text
        with trio.move_on_after(0.1):
            await stop.wait()


def relative(events: list[Event]) -> list[Event]:
    return [event.without_origin() for event in events]


async def test_a_backup_under_load_holds_every_job_finished_before_it(tmp_path: Path) -> None:
    live, copy = tmp_path / "live", tmp_path / "copy"
    live.mkdir()
    copy.mkdir()
    accepted: list[str] = []
    stop = trio.Event()
    async with (
        service(live, LOAD, name="live") as svc,
        http(svc) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(keep_submitting, client, accepted, stop)
        with trio.fail_after(WAIT_S):
            while True:
                jobs = await jobs_of(client)
                finished = {i: j for i, j in jobs.items() if j["status"] == "completed"}
                if len(finished) >= FINISHED_BEFORE:
                    break
                await trio.sleep(0.05)
        events = {job_id: relative(await read_sse(client, job_id)) for job_id in finished}

        result = await run_backup(live, str(database(copy)))

        queued = (await get_json(client, "/api/status"))["images"]["queued"]
        stop.set()
    assert result.returncode == 0, result.stderr
    assert b"backed up" in result.stdout
    assert queued > 0, "the backup was not taken under load"
    assert not database(copy).with_name("jobs.sqlite3-wal").exists()

    async with service(copy, LOAD, name="restored") as svc, http(svc) as client:
        restored = await jobs_of(client)
        for job_id, job in finished.items():
            assert restored[job_id] == job
            assert relative(await read_sse(client, job_id)) == events[job_id]
        # Jobs accepted but not finished when the copy was made are carried on by its service.
        for job_id in set(restored) - set(finished):
            await poll_until(client, f"/api/generate/{job_id}", 200)
    assert set(finished) <= set(restored) <= set(accepted)


async def test_restore_waits_for_the_service_to_stop_then_brings_the_copy_back(
    tmp_path: Path,
) -> None:
    async with (
        service(tmp_path, {"LOCAL_LATENCY_MS": "10"}, name="first") as svc,
        http(svc) as client,
    ):
        kept = (await submit(client, 5)).json()["job_id"]
        await poll_until(client, f"/api/generate/{kept}", 200)
        assert (await run_backup(tmp_path, str(tmp_path / "backup.sqlite3"))).returncode == 0
        later = (await submit(client, 5)).json()["job_id"]

        refused = await run_backup(tmp_path, "--restore", str(tmp_path / "backup.sqlite3"))

        assert refused.returncode == 2
        assert b"stop the service first" in refused.stderr
        assert await svc.terminate() == 0

    restored = await run_backup(tmp_path, "--restore", str(tmp_path / "backup.sqlite3"))

    assert restored.returncode == 0, restored.stderr
    async with (
        service(tmp_path, {"LOCAL_LATENCY_MS": "10"}, name="second") as svc,
        http(svc) as client,
    ):
        assert (await client.get(f"/api/generate/{kept}")).status_code == 200
        assert (await client.get(f"/api/generate/{later}")).status_code == 404


def test_a_backup_needs_a_database_and_a_restore_a_sane_copy(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="no database"):
        backup(tmp_path / "missing.sqlite3", tmp_path / "copy.sqlite3")
    assert not (tmp_path / "missing.sqlite3").exists()  # not created by the attempt
    (tmp_path / "garbage.sqlite3").write_bytes(b"not a database at all" * 100)
    with pytest.raises(BackupError, match="not a usable database"):
        restore(tmp_path / "garbage.sqlite3", tmp_path / "jobs.sqlite3")
    newer = tmp_path / "newer.sqlite3"
    with sqlite3.connect(newer) as connection:
        connection.execute("PRAGMA user_version = 999")
    connection.close()
    with pytest.raises(BackupError, match="newer than this release"):
        restore(newer, tmp_path / "jobs.sqlite3")
