"""An open SSE stream under Hypercorn costs two tasks and a WebSocket three, and both still end
when their client goes away (web/asgi.py, web/hypercorn_fixes.py fix 13), on a real socket and
the real clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trio

from tests.e2e.raw_socket import open_websocket
from tests.e2e.test_server import (
    DEFAULT_HEARTBEAT_S,
    DEMO_EMAIL,
    DEMO_PASSWORD,
    GRACEFUL_TIMEOUT_S,
    WAIT_S,
    bearer,
    login,
    running_server,
    server_settings,
    submit,
)

STREAMS = 20
#: Images that take a minute: the job stays running throughout a test.
SLOW = (60_000, 60_000)


@pytest.fixture
def streams_per_user() -> int:
    return 1


@pytest.fixture
async def service(
    nursery: trio.Nursery, tmp_path: Path, streams_per_user: int
) -> AsyncIterator[tuple[int, httpx.AsyncClient, str]]:
    """The port, a client and the demo user's token; 15 s heartbeats."""
    settings = server_settings(
        tmp_path, SLOW, DEFAULT_HEARTBEAT_S, GRACEFUL_TIMEOUT_S, streams_per_user
    )
    async with (
        running_server(nursery, settings) as server,
        httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client,
    ):
        token = await login(client, DEMO_EMAIL, DEMO_PASSWORD)
        yield int(server.url.rsplit(":", 1)[1]), client, token


def _all_tasks() -> list[trio.lowlevel.Task]:
    tasks: list[trio.lowlevel.Task] = []
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        assert task is not None
        tasks.append(task)
        pending += [child for nursery in task.child_nurseries for child in nursery.child_tasks]
    return tasks


async def _open_stream(port: int, job_id: str, token: str) -> trio.SocketStream:
    """A raw SSE request, read up to the ``retry`` field (the body has begun)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        f"GET /api/generate/{job_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    received = b""
    while b"retry:" not in received:
        data = await stream.receive_some()
        assert data, received
        received += data
    assert received.startswith(b"HTTP/1.1 200"), received
    return stream


async def _wait_for_room(client: httpx.AsyncClient, job_id: str, token: str) -> None:
    """Until the user may open a stream again (not 429), well within the 15 s heartbeat."""
    target = f"/api/generate/{job_id}/stream"
    with trio.fail_after(WAIT_S / 2):
        while True:
            async with client.stream("GET", target, headers=bearer(token)) as answer:
                if answer.status_code != 429:
                    assert answer.status_code == 200
                    return
            await trio.sleep(0.05)


async def _open_websocket(port: int, job_id: str, token: str) -> trio.SocketStream:
    websocket, head = await open_websocket(port, f"/api/generate/{job_id}?token={token}")
    assert websocket is not None, head
    return websocket.stream


@pytest.mark.parametrize("streams_per_user", [STREAMS])
@pytest.mark.parametrize(
    ("opener", "tasks"),
    [
        # Hypercorn's connection task and the app's: quart-trio's two request tasks are gone.
        (_open_stream, 2),
        # The same, and Hypercorn's ping task.
        (_open_websocket, 3),
    ],
)
async def test_an_open_stream_costs_two_tasks_a_websocket_three(
    service: tuple[int, httpx.AsyncClient, str],
    opener: Callable[[int, str, str], Awaitable[trio.SocketStream]],
    tasks: int,
) -> None:
    port, client, token = service
    job_id = await submit(client, token)
    before = len(_all_tasks())
    streams: list[trio.SocketStream] = []
    with trio.fail_after(WAIT_S):
        for _ in range(STREAMS):
            streams.append(await opener(port, job_id, token))  # noqa: PERF401 (awaits)
    try:
        opened = len(_all_tasks()) - before
        assert opened <= tasks * STREAMS, opened
    finally:
        for stream in streams:
            await stream.aclose()


@pytest.mark.parametrize("opener", [_open_stream, _open_websocket])
async def test_a_stream_ends_when_its_client_goes_away(
    service: tuple[int, httpx.AsyncClient, str],
    opener: Callable[[int, str, str], Awaitable[trio.SocketStream]],
) -> None:
    """The user's one stream is free again at once after its socket closed without a goodbye,
    not at the next heartbeat's failed write."""
    port, client, token = service
    job_id = await submit(client, token)
    for _ in range(3):
        with trio.fail_after(WAIT_S):
            stream = await opener(port, job_id, token)
            await stream.aclose()
        await _wait_for_room(client, job_id, token)
