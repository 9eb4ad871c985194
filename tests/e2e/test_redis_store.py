"""``STORE=redis`` end to end: real ``python -m web`` processes on one ``REDIS_PREFIX`` of the
real Redis (tests/redis_support.py), killed with SIGKILL and started again; real clock.

What a restart on the same prefix keeps: the job, its events with their ids (a stream resumes
after the last one it saw) and its images; the new process carries the job on to its end, once
the killed one's lease on it has lapsed (tests/e2e/test_cluster.py: several processes at once).
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
from tests.redis_support import REDIS_URL, keys_under


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    return redis_prefix


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
        job_id = await submit_job(client, 6)
        seen = await kill_after_events(client, job_id, first, 2)
    assert [(event.id, event.type) for event in seen] == [(1, "progress"), (2, "progress")]

    # The same prefix: the new process takes the job over once the killed one's lease lapses.
    async with service(tmp_path, environ, name="second") as second, http(second) as client:
        after = await read_sse(client, job_id, last_event_id=seen[-1].id)
        replay = await read_sse(client, job_id)
        job = await get_json(client, f"/api/generate/{job_id}")
        await check_images(client, job, second.url)
        status = await get_json(client, "/api/status")
        assert await second.terminate() == 0

    check_continuation(seen, after, 6)
    assert [event.without_origin() for event in replay] == [
        event.without_origin() for event in seen + after
    ]
    assert (job["progress"]["completed"], job["progress"]["total"]) == (6, 6)
    assert status["store"]["backend"] == "redis"
    assert 1 <= status["images"]["completed_total"] <= 4  # carried on, not found finished
    # The job has ended: nothing unfinished is left to count, on this node or any other.
    assert (status["cluster"]["jobs_unfinished"], status["cluster"]["images_queued"]) == (0, 0)
    assert "Traceback" not in second.stderr()
    # The job is still there for a later process; no lease is left behind.
    keys = await keys_under(prefix)
    assert f"{prefix}lease:{job_id}" not in keys
    assert f"{prefix}job:{job_id}:events" in keys
