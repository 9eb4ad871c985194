"""Limits shared across ``python -m web`` processes (``STORE=redis``), end to end: real
processes, the real Redis (tests/redis_support.py), the fake Replicate on a real socket.

Either the processes are the nodes of one cluster (one ``REDIS_PREFIX``: any node accepts, one
runs each job) or separate deployments (a ``REDIS_PREFIX`` each) that share one
``REDIS_LIMITS_PREFIX``: either way ``MAX_CONCURRENCY`` holds for all of them together.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import trio

from tests.e2e.service_clients import http, read_sse, service, submit_job
from tests.e2e.test_redis_store import prefix  # noqa: F401 (a fixture)
from tests.fake_replicate import TOKEN, FakeReplicate, run_fake_replicate
from tests.redis_support import REDIS_URL

PROCESSES = 3
CAPACITY = 3


@pytest.mark.parametrize("cluster", [True, False], ids=["one cluster", "deployments"])
async def test_processes_sharing_limits_hold_them_together(
    tmp_path: Path,
    prefix: str,  # noqa: F811 (the fixture)
    cluster: bool,
) -> None:
    fake = FakeReplicate(latency_s=0.3)
    async with run_fake_replicate(fake) as replicate_url, AsyncExitStack() as stack:
        clients: list[httpx.AsyncClient] = []
        for n in range(PROCESSES):
            workdir = tmp_path / f"node{n}"
            workdir.mkdir()
            environ = {
                "STORE": "redis",
                "REDIS_URL": REDIS_URL,
                "REDIS_PREFIX": prefix if cluster else f"{prefix}node{n}:",
                "REDIS_LIMITS_PREFIX": "" if cluster else f"{prefix}limits:",
                "MAX_CONCURRENCY": str(CAPACITY),
                "MAX_ACTIVE_JOBS_PER_USER": "10",
                "REPLICATE_API_TOKEN": TOKEN,
                "REPLICATE_BASE_URL": replicate_url,
                "REPLICATE_WAIT_S": "5",
                "REPLICATE_POLL_INTERVAL_MS": "50",
                "STORE_IMAGES": "false",
                "LOGIN_MAX_FAILURES": "3",
            }
            node = await stack.enter_async_context(service(workdir, environ, name=f"node{n}"))
            clients.append(await stack.enter_async_context(http(node)))

        # Failed logins on two processes throttle the pair on the third.
        wrong = {"email": "someone@example.com", "password": "guess"}
        for client in (clients[0], clients[1], clients[0]):
            assert (await client.post("/api/auth/login", json=wrong)).status_code == 401
        throttled = await clients[2].post("/api/auth/login", json=wrong)
        assert throttled.status_code == 429, throttled.text

        finished: list[str] = []

        async def run_job(client: httpx.AsyncClient) -> None:
            job_id = await submit_job(client, 5)
            events = await read_sse(client, job_id)
            finished.append(events[-1].data["status"])

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for client in clients:
                    for _ in range(2):
                        nursery.start_soon(run_job, client)

        # Every slot taken was handed on within its process or given back (an attempt may take
        # one more than once: a create's paced turn not due yet is waited for without it).
        slots = [(await client.get("/api/status")).json()["cluster"]["slots"] for client in clients]
        assert sum(s["handed_on_total"] + s["given_back_total"] for s in slots) >= PROCESSES * 2 * 5
        assert [(s["holding"], s["waiting"]) for s in slots] == [(0, 0)] * PROCESSES

    assert finished == ["completed"] * (PROCESSES * 2)
    assert len(fake.predictions) == PROCESSES * 2 * 5
    # Every process alone would have had CAPACITY predictions running: together, too.
    assert fake.max_in_flight() == CAPACITY
