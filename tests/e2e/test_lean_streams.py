"""An open SSE stream under Hypercorn costs two tasks, and still ends when its client goes away
(web/asgi.py, web/hypercorn_fixes.py fix 13), on a real socket and the real clock."""

from __future__ import annotations

import httpx
import pytest
import trio

from tests.e2e.test_server import (  # noqa: F401 (fixtures)
    DEFAULT_HEARTBEAT_S,
    WAIT_S,
    Server,
    bearer,
    client,
    graceful_timeout_s,
    heartbeat_s,
    latency_ms,
    max_streams_per_user,
    server,
    settings,
    submit,
    token,
)

STREAMS = 20


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


@pytest.mark.parametrize("latency_ms", [(60_000, 60_000)])  # the job stays running throughout
async def test_an_open_stream_costs_two_tasks(
    server: Server, client: httpx.AsyncClient, token: str
) -> None:
    job_id = await submit(client, token)
    port = int(server.url.rsplit(":", 1)[1])
    before = len(_all_tasks())
    with trio.fail_after(WAIT_S):
        streams = [await _open_stream(port, job_id, token) for _ in range(STREAMS)]
    try:
        opened = len(_all_tasks()) - before
        # Hypercorn's connection task and the app's: quart-trio's two request tasks are gone.
        assert opened <= 2 * STREAMS, opened
    finally:
        for stream in streams:
            await stream.aclose()


@pytest.mark.parametrize("heartbeat_s", [DEFAULT_HEARTBEAT_S])  # no write finds the gone client
@pytest.mark.parametrize("max_streams_per_user", [1])
@pytest.mark.parametrize("latency_ms", [(60_000, 60_000)])
async def test_a_stream_ends_when_its_client_goes_away(
    server: Server, client: httpx.AsyncClient, token: str
) -> None:
    """The user's one stream is free again at once, not at the next heartbeat's failed write."""
    job_id = await submit(client, token)
    port = int(server.url.rsplit(":", 1)[1])
    for _ in range(3):
        with trio.fail_after(WAIT_S):
            stream = await _open_stream(port, job_id, token)
        await stream.aclose()
        with trio.fail_after(WAIT_S / 2):  # well under the 15 s heartbeat
            while True:
                target = f"/api/generate/{job_id}/stream"
                async with client.stream("GET", target, headers=bearer(token)) as answer:
                    status = answer.status_code
                if status != 429:
                    break
                await trio.sleep(0.05)
        assert status == 200
