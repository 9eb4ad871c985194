"""A ``python -m web`` process that can be killed and started again, and clients of it.

For the durability tests: every start of a service in one work directory uses the same SQLite
file, image directory and ``AUTH_SECRET`` (a token outlives a restart), and writes its log to a
file of its own. The clients read SSE and WebSocket streams event by event, so that a test can
stop reading (or kill the service) at a chosen event.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from tests.e2e.test_server import open_ws
from tests.e2e.web_process import web_process

SECRET = "durability-test-secret-0123456789-abcdefghijklmnop"  # over 32 bytes: no JWT warning
CREDENTIALS = {"email": "test@example.com", "password": "password123"}
DATABASE = "jobs.sqlite3"
#: Bounds one step of a test (a request, a whole stream, a process's exit).
WAIT_S = 10
WS_NORMAL, WS_SERVICE_RESTART = 1000, 1012
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- the process ---------------------------------------------------------------------------------


@attrs.frozen
class Service:
    """One running ``python -m web``: its process, base URL and log file."""

    process: trio.Process
    url: str
    log: Path

    def ws_url(self, path: str) -> str:
        return "ws" + self.url.removeprefix("http") + path

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    async def kill(self) -> None:
        """SIGKILL, as ``kill -9`` or the OOM killer would: no clean-up of any kind."""
        self.process.kill()
        with trio.fail_after(WAIT_S):
            await self.process.wait()

    async def terminate(self) -> int:
        """SIGTERM, then wait for the exit; the exit code."""
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT_S):
            return await self.process.wait()


def database(workdir: Path) -> Path:
    return workdir / DATABASE


@asynccontextmanager
async def service(
    workdir: Path, environ: Mapping[str, str], *, name: str
) -> AsyncIterator[Service]:
    """``python -m web`` on ``workdir``'s store (``STORE=sqlite``) with ``environ`` on top.

    Its stderr goes to ``workdir/{name}.log``; killed on exit if it is still running.
    """
    log = workdir / f"{name}.log"
    variables = {
        "STORE": "sqlite",
        "DATABASE_PATH": str(database(workdir)),
        "AUTH_SECRET": SECRET,
        "LOG_LEVEL": "INFO",  # the log is a file: no pipe to fill, and a failure has context
        # Short, so that a stop never waits long for a connection (see the third fix in
        # web/hypercorn_fixes.py and its test in test_durability.py).
        "GRACEFUL_TIMEOUT_S": "1",
        **environ,
    }
    async with (
        await trio.open_file(log, "wb") as sink,
        web_process(workdir, variables, stderr=sink.fileno()) as (process, url),
    ):
        yield Service(process, url, log)


@asynccontextmanager
async def http(svc: Service) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``svc``, logged in as the demo user (its ``token`` is in ``headers``)."""
    async with httpx.AsyncClient(base_url=svc.url, timeout=WAIT_S) as client:
        with trio.fail_after(WAIT_S):
            response = await client.post("/api/auth/login", json=CREDENTIALS)
        assert response.status_code == 200, response.text
        client.headers["Authorization"] = f"Bearer {response.json()['access_token']}"
        yield client


def token(client: httpx.AsyncClient) -> str:
    return client.headers["Authorization"].removeprefix("Bearer ")


async def submit(
    client: httpx.AsyncClient,
    num_images: int,
    *,
    prompt: str = "A beautiful sunset over mountains",
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    with trio.fail_after(WAIT_S):
        return await client.post(
            "/api/generate", json={"prompt": prompt, "num_images": num_images}, headers=headers
        )


async def submit_job(client: httpx.AsyncClient, num_images: int, **kwargs: Any) -> str:
    response = await submit(client, num_images, **kwargs)
    assert response.status_code == 200, response.text
    job_id = response.json()["job_id"]
    assert isinstance(job_id, str)
    return job_id


async def get_json(client: httpx.AsyncClient, path: str) -> dict[str, Any]:
    with trio.fail_after(WAIT_S):
        response = await client.get(path)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# --- events --------------------------------------------------------------------------------------


@attrs.frozen
class Event:
    """One job event, whichever transport carried it."""

    id: int
    type: str
    data: dict[str, Any]

    def without_origin(self) -> Event:
        """The event with its image URL relative: each process answers with its own origin."""
        url = self.data.get("url")
        if not isinstance(url, str):
            return self
        parts = urlsplit(url)
        return attrs.evolve(self, data={**self.data, "url": parts.path})


class EventStream:
    """An SSE response read one event at a time (comments and ``retry:`` skipped)."""

    def __init__(self, lines: AsyncIterator[str]) -> None:
        self._lines = lines

    async def next(self) -> Event | None:
        """The next event, or ``None`` once the server has ended the response."""
        block: dict[str, str] = {}
        async for line in self._lines:
            if line:
                field, _, value = line.partition(":")
                block[field] = value.removeprefix(" ")
            elif "event" in block:
                return Event(int(block["id"]), block["event"], json.loads(block["data"]))
            else:
                block = {}
        return None

    async def rest(self) -> list[Event]:
        """Every event until the server ends the response."""
        events = []
        while (event := await self.next()) is not None:
            events.append(event)
        return events


@asynccontextmanager
async def open_sse(
    client: httpx.AsyncClient, job_id: str, *, last_event_id: int | None = None
) -> AsyncIterator[EventStream]:
    """The job's event stream (resumed after ``last_event_id`` as a browser resumes it).

    Read it to its end, or to the error of a cut connection: a response left half read leaves
    httpcore's body generator to the garbage collector (a ``ResourceWarning``).
    """
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    async with client.stream("GET", f"/api/generate/{job_id}/stream", headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"] == "text/event-stream"
        yield EventStream(response.aiter_lines())


async def kill_after_events(
    client: httpx.AsyncClient, job_id: str, svc: Service, count: int
) -> list[Event]:
    """The first ``count`` events of the job's stream; then ``svc`` is killed (SIGKILL) and the
    stream read to its cut (read to the error: leaving a response half read leaves httpcore's
    body generator to the garbage collector)."""
    seen: list[Event] = []
    with trio.fail_after(WAIT_S):
        async with open_sse(client, job_id) as events:
            while len(seen) < count:
                event = await events.next()
                assert event is not None
                seen.append(event)
            await svc.kill()
            try:
                await events.next()
            except httpx.TransportError:
                return seen
    raise AssertionError("the stream went on after the service was killed")


async def read_sse(
    client: httpx.AsyncClient, job_id: str, *, last_event_id: int | None = None
) -> list[Event]:
    """Every event of the job's stream until the server ends it."""
    with trio.fail_after(WAIT_S):
        async with open_sse(client, job_id, last_event_id=last_event_id) as events:
            return await events.rest()


async def ws_rest(ws: WebSocketConnection) -> tuple[list[Event], int]:
    """Every frame until the server closes the WebSocket, and its close code."""
    events: list[Event] = []
    while True:
        try:
            message = await ws.get_message()
        except ConnectionClosed:
            break
        frame = json.loads(message)
        assert set(frame) == {"type", "id", "payload"}, frame
        events.append(Event(frame["id"], frame["type"], frame["payload"]))
    assert ws.closed is not None
    return events, ws.closed.code


async def read_ws(url: str) -> tuple[list[Event], int]:
    with trio.fail_after(WAIT_S):
        async with open_ws(url) as ws:
            return await ws_rest(ws)


# --- checks --------------------------------------------------------------------------------------


def check_continuation(before: list[Event], after: list[Event], num_images: int) -> None:
    """``after`` carries on exactly where ``before`` stopped: the next ids, each once, in order,
    one progress event per image not reported yet, then ``done`` with every image completed."""
    last = before[-1].id if before else 0
    assert [event.id for event in after] == list(range(last + 1, num_images + 2)), after
    assert [event.type for event in after] == ["progress"] * (len(after) - 1) + ["done"]
    indices = [event.data["index"] for event in before + after[:-1]]
    assert sorted(indices) == list(range(num_images))
    assert {event.data["status"] for event in after[:-1]} <= {"completed"}
    done = after[-1].data
    assert (done["status"], done["completed_count"], done["failed_count"]) == (
        "completed",
        num_images,
        0,
    )


async def wait_for_copies(client: httpx.AsyncClient) -> dict[str, Any]:
    """Until no copy of a provider's output is pending (they are made behind the events); the
    image directory's figures then."""
    with trio.fail_after(WAIT_S):
        while True:
            files: dict[str, Any] = (await get_json(client, "/api/status"))["files"]
            if not files["copies_pending"]:
                return files
            await trio.sleep(0.02)


async def check_images(client: httpx.AsyncClient, job: dict[str, Any], origin: str) -> list[bytes]:
    """Every image of the finished ``job`` is the service's own file, and loads: the bytes."""
    assert job["status"] == "completed", job
    await wait_for_copies(client)
    images = []
    for result in job["results"]:
        url = result["url"]
        assert url.startswith(f"{origin}/files/{job['job_id']}-{result['index']}."), url
        with trio.fail_after(WAIT_S):
            response = await client.get(url)
        assert response.status_code == 200, url
        assert response.headers["content-type"] == "image/png"
        assert "max-age=" in response.headers["cache-control"]
        images.append(response.content)
    return images


async def poll_until(client: httpx.AsyncClient, path: str, status: int) -> httpx.Response:
    """GET ``path`` until it answers ``status``."""
    with trio.fail_after(WAIT_S):
        while True:
            response = await client.get(path)
            if response.status_code == status:
                return response
            await trio.sleep(0.02)
