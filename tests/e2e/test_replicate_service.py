"""The whole service (``run_server``) on Replicate's API, faked on a real socket (real clock).

Faults come from the fake's seeded random source plus a few forced answers, so every kind
(429, 500 that created nothing, 500 that did create) happens in every run; the assertions hold
whatever the interleaving.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from quart import Response, request

from tests.fake_replicate import TOKEN, FakeReplicate, run_fake_replicate
from tests.web.helpers import HASHER, SECRET, parse_sse
from web.auth import Authenticator
from web.serve import run_server
from web.settings import Settings, load_settings

CREDENTIALS = {"email": "test@example.com", "password": "password123"}
#: Bounds one whole test (service start, the test's body, shutdown); a hang fails, not blocks.
SERVICE_TIMEOUT_S = 20
#: Bounds one wait inside a test.
WAIT_S = 10


# --- helpers (also used by test_webhooks.py) --------------------------------------------------


def service_settings(tmp_path: Path, **environ: str) -> Settings:
    """The service's settings as ``python -m web`` reads them, from these variables."""
    base = {
        "AUTH_SECRET": SECRET,
        "IMAGES_DIR": str(tmp_path / "images"),
        "HEARTBEAT_S": "1",
        "GRACEFUL_TIMEOUT_S": "1",
    }
    return load_settings(base | environ)


def replicate_environ(fake: FakeReplicate, **environ: str) -> dict[str, str]:
    """Variables pointing the service at ``fake``: 5 images at once, 8 quick attempts each."""
    return {
        "MAX_CONCURRENCY": "5",
        "RETRY_ATTEMPTS": "8",
        "RETRY_BASE_DELAY_MS": "50",
        "RETRY_MAX_DELAY_MS": "400",
        "REPLICATE_API_TOKEN": TOKEN,
        "REPLICATE_BASE_URL": fake.base_url,
        "REPLICATE_WAIT_S": "5",
        "REPLICATE_POLL_INTERVAL_MS": "50",
        "REPLICATE_TIMEOUT_S": "5",
        **environ,
    }


@asynccontextmanager
async def running_service(
    settings: Settings, *, bind: str = "127.0.0.1:0"
) -> AsyncIterator[httpx.AsyncClient]:
    """``run_server`` on ``bind`` for the body of the block; yields a logged-in client.

    Leaving the block shuts the service down (as SIGTERM would) and waits for it to stop.
    """
    shutdown = trio.Event()
    auth = Authenticator(settings, hasher=HASHER)
    with trio.fail_after(SERVICE_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(
                    run_server,
                    settings,
                    auth=auth,
                    bind=bind,
                    shutdown=shutdown,
                    handle_signals=False,
                )
            )
            try:
                async with httpx.AsyncClient(base_url=binds[0], timeout=WAIT_S) as client:
                    login = await client.post("/api/auth/login", json=CREDENTIALS)
                    assert login.status_code == 200, login.text
                    client.headers["Authorization"] = f"Bearer {login.json()['access_token']}"
                    yield client
            finally:
                shutdown.set()


async def submit(client: httpx.AsyncClient, prompt: str, num_images: int) -> str:
    response = await client.post("/api/generate", json={"prompt": prompt, "num_images": num_images})
    assert response.status_code == 200, response.text
    job_id = response.json()["job_id"]
    assert isinstance(job_id, str)
    return job_id


async def follow(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    """The job's SSE events (``progress`` ... ``done``), read until the stream ends."""
    with trio.fail_after(WAIT_S):
        async with client.stream("GET", f"/api/generate/{job_id}/stream") as response:
            assert response.status_code == 200
            raw = b"".join([chunk async for chunk in response.aiter_bytes()])
    events = [frame for frame in parse_sse(raw) if "event" in frame]
    assert events[-1]["event"] == "done", events
    return events


async def provider_statistics(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/api/status")
    assert response.status_code == 200, response.text
    provider = response.json()["provider"]
    assert isinstance(provider, dict)
    return provider


class Answers:
    """What the fake answered, by ``(kind, status)``; installed as an ``after_request`` hook.

    Kinds: ``create``, ``get``, ``list`` and ``cancel``. ``polled`` holds the ids of predictions
    that were polled with a 200 answer.
    """

    def __init__(self, fake: FakeReplicate) -> None:
        self.counts: Counter[tuple[str, int]] = Counter()
        self.polled: set[str] = set()
        self._changed = trio.Event()
        fake.app.after_request(self._record)

    async def _record(self, response: Response) -> Response:
        path = request.path
        if request.method == "POST":
            kind = "cancel" if path.endswith("/cancel") else "create"
        elif path == "/v1/predictions":
            kind = "list"
        else:
            kind = "get"
            if response.status_code == 200:
                self.polled.add(path.rsplit("/", 1)[-1])
        self.counts[kind, response.status_code] += 1
        self._changed.set()
        self._changed = trio.Event()
        return response

    async def wait_until_polled(self, count: int) -> None:
        while len(self.polled) < count:
            await self._changed.wait()


@pytest.fixture
async def fake() -> AsyncIterator[FakeReplicate]:
    fake = FakeReplicate(latency_s=0.2, seed=20260101)
    async with run_fake_replicate(fake):
        yield fake


# --- tests ------------------------------------------------------------------------------------


async def test_faulty_replicate_gives_every_image_exactly_one_prediction(
    fake: FakeReplicate, tmp_path: Path
) -> None:
    fake.faults.create_500 = 0.3
    fake.faults.create_500_creates = 0.5  # half of those 500s did create a prediction
    fake.faults.create_429 = 0.1
    fake.faults.retry_after_s = 1
    # Whatever the random draws, each kind of fault happens at least once.
    fake.faults.forced_creates.extend(["500-created", "429", "500"])
    answers = Answers(fake)
    settings = service_settings(tmp_path, **replicate_environ(fake))
    prompts = [f"a lighthouse at dusk, take {take}" for take in range(3)]

    async with running_service(settings) as client:
        job_ids = [await submit(client, prompt, 5) for prompt in prompts]
        events = {job_id: await follow(client, job_id) for job_id in job_ids}
        stats = await provider_statistics(client)

    for job_events in events.values():
        *progress, done = job_events
        assert done["data"]["status"] == "completed"
        assert (done["data"]["completed_count"], done["data"]["failed_count"]) == (5, 0)
        assert sorted(event["data"]["index"] for event in progress) == [0, 1, 2, 3, 4]
        assert {event["data"]["status"] for event in progress} == {"completed"}
    urls = {event["data"]["url"] for job in events.values() for event in job[:-1]}
    assert urls == {f"{fake.base_url}/files/{pid}/out-0.webp" for pid in fake.predictions}
    # One prediction per image: none created twice, none orphaned, none shared.
    assert len(fake.predictions) == 15
    assert fake.statuses() == ["succeeded"] * 15
    assert fake.predictions_per_prompt() == dict.fromkeys(prompts, 5)
    assert (stats["name"], stats["predictions"], stats["images"]) == ("replicate", 15, 15)
    assert (stats["failed_predictions"], stats["in_flight"]) == (0, 0)
    # The provider's counts agree with what the fake saw.
    assert stats["creates"] == fake.create_requests >= 15
    assert (
        answers.counts["create", 201]
        + answers.counts["create", 500]
        + answers.counts["create", 429]
        == fake.create_requests
    )
    assert stats["throttled"] == answers.counts["create", 429] >= 1
    assert answers.counts["create", 500] >= 2


@pytest.mark.parametrize("when", ["create-held", "polling"])
async def test_cancelling_a_job_cancels_its_running_predictions_at_replicate(
    fake: FakeReplicate, tmp_path: Path, when: str
) -> None:
    fake.latency_s = 60
    answers = Answers(fake)
    # "create-held": DELETE while every create is still held open by Prefer: wait (5 s);
    # "polling": once every create has answered and each prediction has been polled.
    wait_s = "5" if when == "create-held" else "1"
    settings = service_settings(tmp_path, **replicate_environ(fake, REPLICATE_WAIT_S=wait_s))

    async with running_service(settings) as client:
        job_id = await submit(client, "a slow glacier", 5)
        with trio.fail_after(WAIT_S):
            if when == "create-held":
                await fake.wait_for_predictions(5)
            else:
                await answers.wait_until_polled(5)
        response = await client.delete(f"/api/generate/{job_id}")
        job = response.json()
        events = await follow(client, job_id)
        stats = await provider_statistics(client)

    assert response.status_code == 200
    assert job["status"] == "canceled"
    assert [result["status"] for result in job["results"]] == ["canceled"] * 5
    assert events[-1]["data"]["status"] == "canceled"
    assert sorted(fake.cancel_requests) == sorted(fake.predictions)
    assert len(fake.predictions) == 5
    assert fake.statuses() == ["canceled"] * 5
    assert (stats["cancels"], stats["in_flight"], stats["images"]) == (5, 0, 0)


async def test_polling_rides_out_a_storm_of_429_and_503(
    fake: FakeReplicate, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.latency_s = 1.5  # longer than Prefer: wait, so every image is polled
    fake.faults.get_429 = 0.3
    fake.faults.get_503 = 0.3
    fake.faults.retry_after_s = 1
    answers = Answers(fake)
    settings = service_settings(tmp_path, **replicate_environ(fake, REPLICATE_WAIT_S="1"))

    with caplog.at_level(logging.WARNING):
        async with running_service(settings) as client:
            job_id = await submit(client, "a stormy sea", 5)
            *progress, done = await follow(client, job_id)
            stats = await provider_statistics(client)

    assert done["data"]["status"] == "completed"
    assert {event["data"]["status"] for event in progress} == {"completed"}
    assert answers.counts["get", 429] >= 1
    assert answers.counts["get", 503] >= 1
    assert len(answers.polled) == 5
    assert len(fake.predictions) == 5
    assert (stats["creates"], stats["predictions"], stats["images"]) == (5, 5, 5)
    # Replicate's throttling of polls is not a throttle of creates.
    assert stats["throttled"] == 0
    # Nothing crashed on the way (an asyncio sleep under Trio would log a RuntimeError).
    assert [record for record in caplog.records if record.levelno >= logging.ERROR] == []
