"""The service running against the fake Replicate: settings, start-up, and HTTP helpers.

Shared by the end-to-end tests of the Replicate provider (real sockets, real clock).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from quart import Response, request

from tests.fake_replicate import TOKEN, FakeReplicate
from tests.web.helpers import HASHER, SECRET, parse_sse
from web.auth import Authenticator
from web.serve import run_server
from web.settings import Settings, load_settings

CREDENTIALS = {"email": "test@example.com", "password": "password123"}
#: Bounds one whole test (service start, the test's body, shutdown); a hang fails, not blocks.
SERVICE_TIMEOUT_S = 20
#: Bounds one wait inside a test.
WAIT_S = 10


def service_settings(tmp_path: Path, **environ: str) -> Settings:
    """The service's settings as ``python -m web`` reads them, from these variables."""
    base = {
        "AUTH_SECRET": SECRET,
        "IMAGES_DIR": str(tmp_path / "images"),
        "DATABASE_PATH": str(tmp_path / "imagegen.sqlite3"),
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
        # The fake's output URLs name their prediction, which these tests check; copies of the
        # outputs are tested on their own (test_durability.py).
        "STORE_IMAGES": "false",
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
