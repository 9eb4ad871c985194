"""``STORE=redis`` end to end: real ``python -m web`` processes on one ``REDIS_PREFIX`` of the
real Redis (tests/redis_support.py), killed with SIGKILL and started again; real clock.

What a restart on the same prefix keeps: the job, its events with their ids (a stream resumes
after the last one it saw) and its images; the new process carries the job on to its end. While
a process holds the prefix, another one is refused at its start, naming the holder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.e2e.ports import free_port
from tests.e2e.service_clients import (
    check_continuation,
    check_images,
    get_json,
    http,
    kill_after_events,
    read_sse,
    service,
    submit_job,
)
from tests.e2e.web_process import ROOT
from tests.redis_support import REDIS_URL, keys_under

#: A killed holder's owner key outlives it by its TTL (actors/store/redis.py: 5 s), and the next
#: process waits for it at its start.
RESTART_S = 20


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    return redis_prefix


async def start_refused(
    workdir: Path, environ: dict[str, str]
) -> subprocess.CompletedProcess[bytes]:
    """``python -m web`` that is expected to exit at its start: its exit code and stderr."""
    env = {
        **os.environ,
        **environ,
        "PORT": str(free_port()),
        "IMAGES_DIR": str(workdir / "images"),
        "PYTHONPATH": str(ROOT),
    }
    with trio.fail_after(RESTART_S):
        return await trio.run_process(
            [sys.executable, "-m", "web"],
            cwd=workdir,
            env=env,
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )


async def test_a_killed_service_on_redis_carries_its_job_on_after_a_restart(
    tmp_path: Path, prefix: str
) -> None:
    environ = {
        "STORE": "redis",
        "REDIS_URL": REDIS_URL,
        "REDIS_PREFIX": prefix,
        # 6 images, 2 at a time, 600-900 ms each: the kill comes after the first two.
        "LOCAL_LATENCY_MS": "600-900",
        "MAX_CONCURRENCY": "2",
    }
    async with service(tmp_path, environ, name="first") as first, http(first) as client:
        second_start = await start_refused(tmp_path, environ)
        job_id = await submit_job(client, 6)
        seen = await kill_after_events(client, job_id, first, 2)
    assert [(event.id, event.type) for event in seen] == [(1, "progress"), (2, "progress")]

    # The same prefix, once the killed process's owner key has expired.
    async with service(tmp_path, environ, name="second") as second, http(second) as client:
        after = await read_sse(client, job_id, last_event_id=seen[-1].id)
        replay = await read_sse(client, job_id)
        job = await get_json(client, f"/api/generate/{job_id}")
        await check_images(client, job, second.url)
        status = await get_json(client, "/api/status")
        assert await second.terminate() == 0

    stderr = second_start.stderr.decode()
    assert second_start.returncode == 2, stderr
    assert f"REDIS_PREFIX {prefix!r}" in stderr
    assert f"in use by another process ({os.uname().nodename} pid {first.process.pid} " in stderr
    check_continuation(seen, after, 6)
    assert [event.without_origin() for event in replay] == [
        event.without_origin() for event in seen + after
    ]
    assert (job["progress"]["completed"], job["progress"]["total"]) == (6, 6)
    assert status["store"]["backend"] == "redis"
    assert 1 <= status["images"]["completed_total"] <= 4  # carried on, not found finished
    assert "Traceback" not in second.stderr()
    # SIGTERM let go of the prefix at once; the job is still there for the next process.
    keys = await keys_under(prefix)
    assert f"{prefix}owner" not in keys
    assert f"{prefix}job:{job_id}:events" in keys
