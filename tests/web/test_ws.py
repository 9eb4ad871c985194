"""The WebSocket route: same events as SSE, close codes, resume."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from quart.testing.connections import WebsocketDisconnectError
from quart.typing import TestWebsocketConnectionProtocol as WebsocketConnection
from quart_trio.testing import TrioClient

from actors.messages import Transport
from actors.supervisor import Supervisor
from tests.fakes import FakeProvider, Script
from tests.web.helpers import bearer, create_job, read_sse


async def read_ws(
    client: TrioClient, path: str, *, headers: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Every frame until the server closes, and the close code."""
    frames: list[dict[str, Any]] = []
    async with client.websocket(path, headers=headers) as ws:
        with trio.fail_after(600):
            while True:
                frame = await _receive(ws)
                if isinstance(frame, WebsocketDisconnectError):
                    return frames, frame.args[0]
                frames.append(json.loads(frame))


async def _receive(ws: WebsocketConnection) -> str | WebsocketDisconnectError:
    try:
        return str(await ws.receive())
    except WebsocketDisconnectError as closed:
        return closed


async def test_ws_sends_the_same_events_as_sse_then_closes_1000(
    client: TrioClient, token: str
) -> None:
    job_id = await create_job(client, token)
    frames, code = await read_ws(client, f"/api/generate/{job_id}?token={token}")
    assert code == 1000
    _, _, sse = await read_sse(client, f"/api/generate/{job_id}/stream", headers=bearer(token))
    assert [(f["type"], f["id"], f["payload"]) for f in frames] == [
        (f["event"], f["id"], f["data"]) for f in sse[1:]
    ]
    assert [f["type"] for f in frames] == ["progress"] * 5 + ["done"]
    assert list(frames[0]) == ["type", "id", "payload"]


async def test_ws_accepts_an_authorization_header(client: TrioClient, token: str) -> None:
    job_id = await create_job(client, token)
    frames, code = await read_ws(client, f"/api/generate/{job_id}", headers=bearer(token))
    assert code == 1000
    assert frames[-1]["type"] == "done"


@pytest.mark.parametrize("query", ["", "?token=", "?token=garbage"])
async def test_ws_without_a_valid_token_closes_1008(
    client: TrioClient, token: str, query: str
) -> None:
    job_id = await create_job(client, token)
    frames, code = await read_ws(client, f"/api/generate/{job_id}{query}")
    assert (frames, code) == ([], 1008)


async def test_ws_unknown_or_foreign_job_closes_4404(
    client: TrioClient, token: str, other_token: str
) -> None:
    assert await read_ws(client, f"/api/generate/nope?token={token}") == ([], 4404)
    job_id = await create_job(client, token)
    assert await read_ws(client, f"/api/generate/{job_id}?token={other_token}") == ([], 4404)


async def test_ws_resumes_after_last_event_id(client: TrioClient, token: str) -> None:
    job_id = await create_job(client, token)
    await read_ws(client, f"/api/generate/{job_id}?token={token}")
    frames, code = await read_ws(client, f"/api/generate/{job_id}?token={token}&last_event_id=4")
    assert [frame["id"] for frame in frames] == [5, 6]
    assert code == 1000
    frames, code = await read_ws(client, f"/api/generate/{job_id}?token={token}&last_event_id=6")
    assert (frames, code) == ([], 1000)


async def test_ws_closes_1012_on_shutdown(
    client: TrioClient, token: str, supervisor: Supervisor, provider: FakeProvider
) -> None:
    provider.default = Script(latency_s=100)
    job_id = await create_job(client, token)
    async with trio.open_nursery() as nursery:
        result: list[tuple[list[dict[str, Any]], int]] = []

        async def follow() -> None:
            result.append(await read_ws(client, f"/api/generate/{job_id}?token={token}"))

        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        assert dict(supervisor.statistics().subscribers)[Transport.WEBSOCKET] == 1
        supervisor.begin_shutdown()
    assert result == [([], 1012)]
    assert dict(supervisor.statistics().subscribers)[Transport.WEBSOCKET] == 0


async def test_ws_delivers_live_events_at_the_moment_images_finish(
    client: TrioClient, token: str
) -> None:
    job_id = await create_job(client, token)
    t0 = trio.current_time()
    arrivals = []
    async with client.websocket(f"/api/generate/{job_id}?token={token}") as ws:
        with trio.fail_after(60):
            while True:
                try:
                    frame = json.loads(await ws.receive())
                except WebsocketDisconnectError:
                    break
                arrivals.append((trio.current_time() - t0, frame["id"]))
    assert arrivals == [(1.0, 1), (1.0, 2), (2.0, 3), (2.0, 4), (3.0, 5), (3.0, 6)]
