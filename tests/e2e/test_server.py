"""The whole service (``run_server``: hypercorn, the app, the supervisor, the local provider) on a
real socket and the real clock, driven by real clients: httpx for HTTP and SSE, trio-websocket
for WebSockets, and h11 by hand where a request must stop half way.

Virtual time is not used here: ``autojump_clock`` can jump while socket I/O is in flight
(its jumps ignore the network). Every step that could hang is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import h11
import httpx
import pytest
import trio
import trio.testing
from argon2 import PasswordHasher
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from actors.files import ImageFilesSettings
from actors.providers.local import LocalProviderSettings
from web.auth import Authenticator
from web.serve import run_server
from web.settings import Settings, StoreSettings

# Real argon2 with cheap parameters: every test logs in at least once.
HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
SECRET = "e2e-server-test-secret-0123456789-abcdefghijklmnop"  # over 32 bytes: no JWT warning
DEMO_EMAIL, DEMO_PASSWORD = "test@example.com", "password123"
OTHER_EMAIL, OTHER_PASSWORD = "other@example.com", "other-password-456"
FRONT_END_ORIGIN = "http://localhost:5173"
#: Bounds one step of a test (start, a request, a whole stream, shutdown).
WAIT_S = 10
#: Long enough that "did not wait for the graceful timeout" is a wide margin, not a timing.
GRACEFUL_TIMEOUT_S = 6
#: Short, so that heartbeats are seen within a test.
HEARTBEAT_S = 0.25
#: The production default (Settings.heartbeat_s).
DEFAULT_HEARTBEAT_S = 15.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WS_NORMAL, WS_POLICY_VIOLATION, WS_SERVICE_RESTART, WS_NOT_FOUND = 1000, 1008, 1012, 4404


# --- the server ----------------------------------------------------------------------------------


@attrs.frozen
class Server:
    url: str  # http://127.0.0.1:PORT
    shutdown: trio.Event  # set it to stop the server (as SIGTERM would)
    stopped: trio.Event  # set once run_server has returned

    def ws_url(self, path: str) -> str:
        return "ws" + self.url.removeprefix("http") + path


@pytest.fixture
def latency_ms() -> tuple[int, int]:
    """The local provider's time per image (a test may parametrize it)."""
    return (50, 150)


@pytest.fixture
def heartbeat_s() -> float:
    """The SSE ``: ping`` and hypercorn's WebSocket ping interval (a test may parametrize it)."""
    return HEARTBEAT_S


@pytest.fixture
def graceful_timeout_s() -> float:
    """How long hypercorn waits for open connections on shutdown (a test may parametrize it)."""
    return GRACEFUL_TIMEOUT_S


@pytest.fixture
def max_streams_per_user() -> int:
    """Open event streams a user may have (a test may parametrize it)."""
    return Settings().supervisor.max_streams_per_user


@pytest.fixture
def settings(
    tmp_path: Path,
    latency_ms: tuple[int, int],
    heartbeat_s: float,
    graceful_timeout_s: float,
    max_streams_per_user: int,
) -> Settings:
    return server_settings(
        tmp_path, latency_ms, heartbeat_s, graceful_timeout_s, max_streams_per_user
    )


def server_settings(
    tmp_path: Path,
    latency_ms: tuple[int, int],
    heartbeat_s: float,
    graceful_timeout_s: float,
    max_streams_per_user: int = Settings().supervisor.max_streams_per_user,
) -> Settings:
    """Images in ``tmp_path``; the demo user plus ``other@example.com`` from a users file."""
    users_file = tmp_path / "users.txt"
    users_file.write_text(f"{OTHER_EMAIL}:{HASHER.hash(OTHER_PASSWORD)}\n", encoding="utf-8")
    return attrs.evolve(
        Settings(),
        auth_secret=SECRET,
        users_file=users_file,
        heartbeat_s=heartbeat_s,
        graceful_timeout_s=graceful_timeout_s,
        # Shutdown tests here are about streams ending: no grace (test_durability covers it).
        shutdown_grace_s=0,
        supervisor=attrs.evolve(Settings().supervisor, max_streams_per_user=max_streams_per_user),
        local=LocalProviderSettings(images_dir=tmp_path / "images", latency_ms=latency_ms),
        store=StoreSettings(database_path=tmp_path / "imagegen.sqlite3"),
        files=ImageFilesSettings(directory=tmp_path / "images"),
    )


@pytest.fixture
async def server(nursery: trio.Nursery, settings: Settings) -> AsyncIterator[Server]:
    async with running_server(nursery, settings) as running:
        yield running


@asynccontextmanager
async def running_server(nursery: trio.Nursery, settings: Settings) -> AsyncIterator[Server]:
    """``run_server`` on a free port; on exit it is shut down and waited for until it returns."""
    shutdown, stopped = trio.Event(), trio.Event()
    auth = Authenticator(settings, hasher=HASHER, secret=SECRET)

    async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
        async with trio.open_nursery() as inner:
            binds = await inner.start(
                partial(
                    run_server,
                    settings,
                    auth=auth,
                    bind="127.0.0.1:0",
                    shutdown=shutdown,
                    handle_signals=False,
                )
            )
            task_status.started(binds)
        stopped.set()  # run_server has returned

    with trio.fail_after(WAIT_S):
        binds: list[str] = await nursery.start(run)
    try:
        yield Server(binds[0], shutdown, stopped)
    finally:
        shutdown.set()
        with trio.fail_after(WAIT_S, shield=True):
            await stopped.wait()


@pytest.fixture
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
        yield client


@pytest.fixture
async def token(client: httpx.AsyncClient) -> str:
    """The demo user's token, from the real login route."""
    return await login(client, DEMO_EMAIL, DEMO_PASSWORD)


# --- clients -------------------------------------------------------------------------------------


@attrs.frozen
class Event:
    """One job event, whichever transport carried it."""

    id: int
    type: str
    data: dict[str, Any]


@attrs.frozen
class SseReply:
    status: int
    headers: httpx.Headers
    lines: list[str]

    def blocks(self) -> list[dict[str, str]]:
        """The stream split at blank lines: ``{field: value}``, comments under ``""``."""
        blocks: list[dict[str, str]] = []
        block: dict[str, str] = {}
        for line in self.lines:
            if line == "":
                if block:
                    blocks.append(block)
                block = {}
                continue
            field, _, value = line.partition(":")
            block[field] = value.removeprefix(" ")
        if block:
            blocks.append(block)
        return blocks

    def events(self) -> list[Event]:
        return [
            Event(int(block["id"]), block["event"], json.loads(block["data"]))
            for block in self.blocks()
            if "event" in block
        ]


@attrs.frozen
class WsReply:
    events: list[Event]
    close_code: int


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(client: httpx.AsyncClient, email: str, password: str) -> str:
    with trio.fail_after(WAIT_S):
        response = await client.post("/api/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    assert isinstance(token, str)
    return token


async def submit(client: httpx.AsyncClient, token: str, num_images: int = 5) -> str:
    with trio.fail_after(WAIT_S):
        response = await client.post(
            "/api/generate",
            json={"prompt": "A beautiful sunset over mountains", "num_images": num_images},
            headers=bearer(token),
        )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "pending"
    job_id = response.json()["job_id"]
    assert isinstance(job_id, str)
    return job_id


async def read_sse(
    client: httpx.AsyncClient,
    job_id: str,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> SseReply:
    """A whole SSE response, read line by line until the server ends it."""
    with trio.fail_after(WAIT_S):
        async with client.stream(
            "GET", f"/api/generate/{job_id}/stream", headers=headers, params=params
        ) as response:
            lines = [line async for line in response.aiter_lines()]
    return SseReply(response.status_code, response.headers, lines)


@asynccontextmanager
async def open_ws(
    url: str, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket client on a TCP (or, with ``ssl_context``, TLS) stream of our own, closed on
    the way out.

    Not ``trio_websocket.open_websocket_url``: after a close that the server started, trio-websocket
    0.12.2 never closes its socket (``aclose`` returns early once a close reason is set, and the
    reader task stops at the server's EOF without closing the stream), which shows up as an
    unclosed-socket ``ResourceWarning``, an error under ``filterwarnings = error``.
    """
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    resource = f"{parts.path}?{parts.query}" if parts.query else parts.path
    if ssl_context is None:
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = await trio.open_tcp_stream(
            parts.hostname, parts.port
        )
    else:
        stream = await trio.open_ssl_over_tcp_stream(
            parts.hostname, parts.port, ssl_context=ssl_context
        )
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, parts.netloc, resource)
        try:
            yield ws
        finally:
            await ws.aclose()
            nursery.cancel_scope.cancel()  # the reader task: the socket closes right after


def close_code(closed: ConnectionClosed) -> int:
    assert closed.reason is not None
    return closed.reason.code


async def receive(ws: WebSocketConnection) -> str | bytes | None:
    """The next message, or ``None`` once the connection is closed."""
    try:
        return await ws.get_message()
    except ConnectionClosed:
        return None


async def read_ws(url: str) -> WsReply:
    """Every frame of a WebSocket until the server closes it, and its close code."""
    events: list[Event] = []
    with trio.fail_after(WAIT_S):
        async with open_ws(url) as ws:
            while (message := await receive(ws)) is not None:
                frame = json.loads(message)
                assert set(frame) == {"type", "id", "payload"}, frame
                events.append(Event(frame["id"], frame["type"], frame["payload"]))
            assert ws.closed is not None
            return WsReply(events, ws.closed.code)


async def poll_until_finished(client: httpx.AsyncClient, token: str, job_id: str) -> dict[str, Any]:
    """``GET /api/generate/{id}`` as a polling front end does, until the job has finished."""
    with trio.fail_after(WAIT_S):
        while True:
            response = await client.get(f"/api/generate/{job_id}", headers=bearer(token))
            assert response.status_code == 200, response.text
            job: dict[str, Any] = response.json()
            assert len(job["results"]) == job["num_images"]
            if job["status"] not in {"pending", "running"}:
                return job
            await trio.sleep(0.05)  # the polling interval of a polling client


# --- 1. the full walk ----------------------------------------------------------------------------


async def test_sse_websocket_and_polling_see_the_same_job(
    server: Server, client: httpx.AsyncClient, token: str
) -> None:
    job_id = await submit(client, token)
    replies: dict[str, Any] = {}

    async def follow_sse() -> None:
        replies["sse"] = await read_sse(client, job_id, headers=bearer(token))

    async def follow_ws() -> None:
        replies["ws"] = await read_ws(server.ws_url(f"/api/generate/{job_id}?token={token}"))

    async def poll() -> None:
        replies["poll"] = await poll_until_finished(client, token, job_id)

    async with trio.open_nursery() as nursery:
        for follower in (follow_sse, follow_ws, poll):
            nursery.start_soon(follower)
    sse: SseReply = replies["sse"]
    ws: WsReply = replies["ws"]
    job: dict[str, Any] = replies["poll"]

    assert sse.status == 200
    assert sse.headers["content-type"] == "text/event-stream"
    assert sse.headers["cache-control"] == "no-cache"
    assert sse.lines[:2] == ["retry: 3000", ""]
    events = sse.events()
    assert [(event.id, event.type) for event in events] == [
        *((n, "progress") for n in range(1, 6)),
        (6, "done"),
    ]
    assert ws.events == events
    assert ws.close_code == WS_NORMAL
    progress, done = events[:5], events[5]
    assert sorted(event.data["index"] for event in progress) == [0, 1, 2, 3, 4]
    assert all(event.data["status"] == "completed" for event in progress)
    assert done.data["status"] == "completed"
    assert (done.data["completed_count"], done.data["failed_count"]) == (5, 0)

    assert job["status"] == "completed"
    assert job["progress"]["completed"] == 5
    by_index = {event.data["index"]: event.data for event in progress}
    for result in job["results"]:
        assert result["status"] == by_index[result["index"]]["status"]
        assert result["url"] == by_index[result["index"]]["url"]

    with trio.fail_after(WAIT_S):
        metrics = (
            await client.get(f"/api/generate/{job_id}/metrics", headers=bearer(token))
        ).json()
    assert (metrics["status"], metrics["completed_count"], metrics["total_count"]) == (
        "completed",
        5,
        5,
    )
    assert 0 <= metrics["ttfi_ms"] <= metrics["total_ms"]
    assert (metrics["ttfi_ms"], metrics["total_ms"]) == (
        done.data["ttfi_ms"],
        done.data["total_ms"],
    )

    for result in job["results"]:
        url = result["url"]
        assert url.startswith(f"{server.url}/files/"), url
        with trio.fail_after(WAIT_S):
            image = await client.get(url)  # absolute: base_url does not apply
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/png"
        assert image.content.startswith(PNG_SIGNATURE)
        assert "max-age=" in image.headers["cache-control"]


# --- 2. late subscribers: replay and resume ------------------------------------------------------


async def test_a_late_subscriber_gets_a_replay_and_can_resume(
    server: Server, client: httpx.AsyncClient, token: str
) -> None:
    job_id = await submit(client, token)
    live = (await read_sse(client, job_id, headers=bearer(token))).events()
    assert [event.id for event in live] == [1, 2, 3, 4, 5, 6]

    replay = await read_sse(client, job_id, headers=bearer(token))
    after_3 = await read_sse(client, job_id, headers={**bearer(token), "Last-Event-ID": "3"})
    after_done = await read_sse(
        client, job_id, headers=bearer(token), params={"last_event_id": "6"}
    )
    ws_after_4 = await read_ws(
        server.ws_url(f"/api/generate/{job_id}?token={token}&last_event_id=4")
    )

    assert replay.status == 200
    assert replay.lines[0] == "retry: 3000"
    assert replay.events() == live
    assert after_3.events() == live[3:]
    assert (after_done.status, after_done.lines) == (204, [])
    assert ws_after_4.events == live[4:]
    assert ws_after_4.close_code == WS_NORMAL


# --- 3. authentication and ownership on the wire -------------------------------------------------


async def test_the_event_stream_takes_a_token_from_the_header_or_the_query(
    client: httpx.AsyncClient, token: str
) -> None:
    job_id = await submit(client, token)
    with trio.fail_after(WAIT_S):
        anonymous = await client.get(f"/api/generate/{job_id}/stream")
    by_query = await read_sse(client, job_id, params={"token": token})

    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert anonymous.headers["content-type"] == "application/json"
    assert isinstance(anonymous.json()["detail"], str)
    assert by_query.status == 200
    assert by_query.events()[-1].type == "done"


async def test_a_websocket_closes_1008_on_a_bad_token_and_4404_on_an_unknown_job(
    server: Server, client: httpx.AsyncClient, token: str
) -> None:
    job_id = await submit(client, token)

    bad_token = await read_ws(server.ws_url(f"/api/generate/{job_id}?token=not-a-jwt"))
    no_token = await read_ws(server.ws_url(f"/api/generate/{job_id}"))
    unknown_job = await read_ws(server.ws_url(f"/api/generate/no-such-job?token={token}"))

    assert (bad_token.close_code, bad_token.events) == (WS_POLICY_VIOLATION, [])
    assert (no_token.close_code, no_token.events) == (WS_POLICY_VIOLATION, [])
    assert (unknown_job.close_code, unknown_job.events) == (WS_NOT_FOUND, [])


@pytest.mark.parametrize("latency_ms", [(500, 500)], ids=["slow"])
async def test_another_users_job_is_not_found_anywhere(
    server: Server, client: httpx.AsyncClient, token: str
) -> None:
    other = await login(client, OTHER_EMAIL, OTHER_PASSWORD)
    job_id = await submit(client, token)
    path = f"/api/generate/{job_id}"

    with trio.fail_after(WAIT_S):
        # The cancel first, while the job runs: were it let through, the job would end canceled.
        delete = await client.delete(path, headers=bearer(other))
        owner_view = (await client.get(path, headers=bearer(token))).json()
        get = await client.get(path, headers=bearer(other))
        sse = await client.get(f"{path}/stream", headers=bearer(other))
        metrics = await client.get(f"{path}/metrics", headers=bearer(other))
        others_list = (await client.get("/api/generate", headers=bearer(other))).json()
        owners_list = (await client.get("/api/generate", headers=bearer(token))).json()
    ws = await read_ws(server.ws_url(f"{path}?token={other}"))
    done = (await read_sse(client, job_id, headers=bearer(token))).events()[-1]

    for response in (delete, get, sse, metrics):
        assert response.status_code == 404, response.request
        assert response.json() == {"detail": "Job not found"}
    assert (ws.close_code, ws.events) == (WS_NOT_FOUND, [])
    assert job_id not in [job["job_id"] for job in others_list["results"]]
    assert job_id in [job["job_id"] for job in owners_list["results"]]
    assert owner_view["status"] in {"pending", "running"}
    assert owner_view["progress"]["canceled"] == 0
    assert (done.data["status"], done.data["completed_count"]) == ("completed", 5)


# --- 4. graceful shutdown ------------------------------------------------------------------------


async def send_headers_expecting_continue(
    stream: trio.SocketStream, connection: h11.Connection, *, host: str, token: str, length: int
) -> None:
    """Send a ``POST /api/generate``'s head with ``Expect: 100-continue`` and wait for the
    ``100 Continue``: from then on the server is handling the request and awaits its body."""
    head = h11.Request(
        method="POST",
        target="/api/generate",
        headers=[
            ("Host", host),
            ("Authorization", f"Bearer {token}"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(length)),
            ("Expect", "100-continue"),
        ],
    )
    await send_h11(stream, connection, head)
    informational = await next_h11_event(stream, connection)
    assert isinstance(informational, h11.InformationalResponse), informational
    assert informational.status_code == 100


async def send_h11(stream: trio.SocketStream, connection: h11.Connection, event: Any) -> None:
    data = connection.send(event)
    assert data is not None
    await stream.send_all(data)


async def next_h11_event(stream: trio.SocketStream, connection: h11.Connection) -> object:
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event
        connection.receive_data(await stream.receive_some(65536))


async def read_h11_response(
    stream: trio.SocketStream, connection: h11.Connection
) -> tuple[h11.Response, bytes]:
    response = await next_h11_event(stream, connection)
    assert isinstance(response, h11.Response), response
    body = b""
    while not isinstance(event := await next_h11_event(stream, connection), h11.EndOfMessage):
        assert isinstance(event, h11.Data), event
        body += event.data
    return response, body


@pytest.mark.parametrize("latency_ms", [(5000, 5000)], ids=["slow"])
async def test_shutdown_ends_streams_refuses_new_jobs_and_returns(
    server: Server, client: httpx.AsyncClient, token: str
) -> None:
    job_id = await submit(client, token)
    body = json.dumps({"prompt": "too late for this one", "num_images": 5}).encode()
    host = server.url.removeprefix("http://")
    hostname, port = host.split(":")
    connection = h11.Connection(our_role=h11.CLIENT)

    with trio.fail_after(WAIT_S):
        async with (
            client.stream("GET", f"/api/generate/{job_id}/stream", headers=bearer(token)) as sse,
            open_ws(server.ws_url(f"/api/generate/{job_id}?token={token}")) as ws,
            await trio.open_tcp_stream(hostname, int(port)) as post,
        ):
            lines = sse.aiter_lines()
            assert await anext(lines) == "retry: 3000"
            await send_headers_expecting_continue(
                post, connection, host=host, token=token, length=len(body)
            )

            t0 = trio.current_time()
            server.shutdown.set()
            rest = [line async for line in lines]
            sse_ended_after = trio.current_time() - t0
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            ws_closed_after = trio.current_time() - t0
            # The SSE stream ended only once the supervisor stopped admitting: the held
            # request's body now reaches a service that is shutting down.
            await send_h11(post, connection, h11.Data(data=body))
            await send_h11(post, connection, h11.EndOfMessage())
            late, late_body = await read_h11_response(post, connection)
        await server.stopped.wait()
        stopped_after = trio.current_time() - t0

    assert all(not line.startswith(("event:", "data:")) for line in rest), rest
    assert sse_ended_after < 2
    assert close_code(closed.value) == WS_SERVICE_RESTART
    assert ws_closed_after < 2
    assert late.status_code == 503
    assert dict(late.headers).get(b"retry-after", b"").isdigit()
    assert isinstance(json.loads(late_body)["detail"], str)
    # Nothing was left for hypercorn's graceful timeout to wait for.
    assert stopped_after < GRACEFUL_TIMEOUT_S / 2


# --- 5. CORS -------------------------------------------------------------------------------------


async def test_a_preflight_is_allowed_for_a_listed_origin_only(client: httpx.AsyncClient) -> None:
    def preflight(origin: str) -> dict[str, str]:
        return {
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }

    with trio.fail_after(WAIT_S):
        listed = await client.options("/api/generate", headers=preflight(FRONT_END_ORIGIN))
        unlisted = await client.options(
            "/api/generate", headers=preflight("http://evil.example.com")
        )

    assert listed.status_code == 200
    assert listed.headers["access-control-allow-origin"] == FRONT_END_ORIGIN
    assert "POST" in listed.headers["access-control-allow-methods"]
    allowed_headers = listed.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers
    assert "content-type" in allowed_headers
    assert "access-control-allow-origin" not in unlisted.headers


# --- 6. logs -------------------------------------------------------------------------------------


async def test_the_access_log_never_shows_a_query_token(
    server: Server, client: httpx.AsyncClient, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = await submit(client, token)
    caplog.set_level(logging.INFO, logger="web")  # web.access and every other server logger

    sse = await read_sse(client, job_id, params={"token": token})
    ws = await read_ws(server.ws_url(f"/api/generate/{job_id}?token={token}"))
    # hypercorn writes the access line once the response has gone out; let it get there.
    with trio.fail_after(WAIT_S):
        await trio.testing.wait_all_tasks_blocked()

    assert sse.events()[-1].type == "done"
    assert ws.close_code == WS_NORMAL
    access = [record.getMessage() for record in caplog.records if record.name == "web.access"]
    assert any(f"/api/generate/{job_id}/stream" in line for line in access), access
    server_lines = [record.getMessage() for record in caplog.records]
    assert not [line for line in server_lines if token in line]
    assert token not in caplog.text


# --- hypercorn's WebSocket pings (web/hypercorn_fixes.py) ----------------------------------------


@pytest.mark.parametrize(
    ("heartbeat_s", "graceful_timeout_s"), [(DEFAULT_HEARTBEAT_S, 1.0)], ids=["default-heartbeat"]
)
async def test_shutdown_does_not_wait_for_a_closed_websocket(
    server: Server, client: httpx.AsyncClient, token: str, graceful_timeout_s: float
) -> None:
    job_id = await submit(client, token)
    ws = await read_ws(server.ws_url(f"/api/generate/{job_id}?token={token}"))
    assert ws.close_code == WS_NORMAL  # the WebSocket is closed at both ends

    t0 = trio.current_time()
    server.shutdown.set()
    with trio.fail_after(WAIT_S):
        await server.stopped.wait()

    assert trio.current_time() - t0 < graceful_timeout_s / 2


@pytest.mark.parametrize(
    "target",
    [
        "/files/" + "a" * 10_000 + ".png",  # was a 500 (the OS refused the name)
        "/files//x.png",  # was a 308 to /files/x.png
        "/files/%2F%2Fetc%2Fpasswd",  # was a 308: Hypercorn decodes the slashes
        "/files/..%2F..%2Fetc%2Fpasswd",
        "/files/../../etc/passwd",
        "/files/x%00.png",
        "/files/.hidden",
        "/files/a%5Cb.png",
    ],
    ids=[
        "long",
        "double-slash",
        "encoded-slashes",
        "encoded-traversal",
        "traversal",
        "nul",
        "dotfile",
        "backslash",
    ],
)
async def test_a_bad_file_name_is_a_404_with_a_detail(server: Server, target: str) -> None:
    url = urlsplit(server.url)
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream(url.hostname or "", url.port or 0)
        async with stream:
            connection = h11.Connection(h11.CLIENT)
            request = h11.Request(method="GET", target=target, headers=[("Host", url.netloc)])
            await send_h11(stream, connection, request)
            await send_h11(stream, connection, h11.EndOfMessage())
            response = await next_h11_event(stream, connection)
            body = b""
            while isinstance(event := await next_h11_event(stream, connection), h11.Data):
                body += event.data
    assert isinstance(response, h11.Response)
    assert response.status_code == 404, (response.status_code, body)
    assert json.loads(body)["detail"] in {"File not found", "Not Found"}


# --- 7. a user's open streams are capped ------------------------------------------------------


async def wait_for_subscribers(
    client: httpx.AsyncClient, token: str, expected: dict[str, int]
) -> dict[str, Any]:
    """``/api/status`` once its open streams are ``expected`` (the server sees them a moment
    after the client does)."""
    with trio.fail_after(WAIT_S):
        while True:
            view: dict[str, Any] = (await client.get("/api/status", headers=bearer(token))).json()
            if view["subscribers"] == expected:
                return view
            await trio.sleep(0.01)


@pytest.mark.parametrize(
    ("latency_ms", "max_streams_per_user"), [((60_000, 60_000), 2)], ids=["slow-cap-2"]
)
async def test_a_users_streams_over_the_cap_get_429_or_close_1008(
    server: Server, client: httpx.AsyncClient, token: str
) -> None:
    other = await login(client, OTHER_EMAIL, OTHER_PASSWORD)
    job_id = await submit(client, token)
    others_id = await submit(client, other)
    path = f"/api/generate/{job_id}/stream"
    ws_url = server.ws_url(f"/api/generate/{job_id}?token={token}")
    with trio.fail_after(WAIT_S):
        async with client.stream("GET", path, headers=bearer(token)) as held:
            lines = held.aiter_lines()  # kept, and read to its end (a half-read response warns)
            assert await anext(lines) == "retry: 3000"
            async with open_ws(ws_url):
                await wait_for_subscribers(client, token, {"sse": 1, "websocket": 1})

                refused = await client.get(path, headers=bearer(token))
                async with open_ws(ws_url) as over:
                    assert await receive(over) is None
                    closed = over.closed
                async with client.stream(
                    "GET", f"/api/generate/{others_id}/stream", headers=bearer(other)
                ) as others:  # the cap is per user
                    await client.delete(f"/api/generate/{others_id}", headers=bearer(other))
                    others_lines = [line async for line in others.aiter_lines()]
                view = await wait_for_subscribers(client, token, {"sse": 1, "websocket": 1})
                metrics = (await client.get("/metrics")).text
                await client.delete(f"/api/generate/{job_id}", headers=bearer(token))
                held_lines = [line async for line in lines]
        after = await wait_for_subscribers(client, token, {"sse": 0, "websocket": 0})
        again = await read_sse(client, job_id, headers=bearer(token))  # room again

    assert refused.status_code == 429
    assert refused.json() == {"detail": "Too many open streams: at most 2 per user"}
    assert refused.headers["retry-after"] == "5"
    assert closed is not None
    assert (closed.code, closed.reason) == (
        WS_POLICY_VIOLATION,
        "Too many open streams: at most 2 per user",
    )
    assert others.status_code == 200
    assert "event: done" in others_lines
    assert view["subscribers_refused"] == {"sse": 1, "websocket": 1}
    assert 'imagegen_subscribers_refused_total{transport="sse"} 1.0' in metrics
    assert 'imagegen_subscribers_refused_total{transport="websocket"} 1.0' in metrics
    assert "event: done" in held_lines
    assert after["subscribers_refused"] == {"sse": 1, "websocket": 1}
    assert again.status == 200
    assert again.events()[-1].type == "done"
