"""The SSE route: framing, replay, resume, live delivery, heartbeats, shutdown."""

from __future__ import annotations

from typing import Any

import trio
from quart_trio.testing import TrioClient

from actors.messages import Transport
from actors.supervisor import Supervisor
from tests.fakes import FakeProvider, Script
from tests.web.helpers import bearer, create_job, parse_sse, read_sse

HEARTBEAT_S = 15


async def finished_job(client: TrioClient, token: str, num_images: int = 5) -> str:
    job_id = await create_job(client, token, num_images=num_images)
    status, _, frames = await read_sse(
        client, f"/api/generate/{job_id}/stream", headers=bearer(token)
    )
    assert status == 200
    assert frames[-1]["event"] == "done"
    return job_id


async def test_stream_has_the_contract_headers_retry_events_and_done(
    client: TrioClient, token: str
) -> None:
    job_id = await create_job(client, token, num_images=5)
    status, headers, frames = await read_sse(
        client, f"/api/generate/{job_id}/stream", headers=bearer(token)
    )
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    assert frames[0] == {"retry": 3000}
    events = frames[1:]
    assert [frame["id"] for frame in events] == [1, 2, 3, 4, 5, 6]
    assert [frame["event"] for frame in events] == ["progress"] * 5 + ["done"]
    progress = [frame["data"] for frame in events[:5]]
    assert sorted(item["index"] for item in progress) == [0, 1, 2, 3, 4]
    for item in progress:
        assert set(item) == {
            "index",
            "status",
            "url",
            "error",
            "attempts",
            "started_at",
            "finished_at",
        }
    assert events[-1]["data"] == {
        "status": "completed",
        "total_ms": 3000,
        "ttfi_ms": 1000,
        "completed_count": 5,
        "failed_count": 0,
    }


async def test_events_arrive_live_as_images_finish(client: TrioClient, token: str) -> None:
    job_id = await create_job(client, token, num_images=5)
    t0 = trio.current_time()
    arrivals: list[tuple[float, int]] = []
    async with client.request(f"/api/generate/{job_id}/stream", headers=bearer(token)) as conn:
        await conn.send_complete()
        with trio.fail_after(60):
            while True:
                try:
                    chunk = await conn.receive()
                except trio.EndOfChannel:
                    break
                now = trio.current_time() - t0
                arrivals.extend((now, frame["id"]) for frame in parse_sse(chunk) if "id" in frame)
    # capacity 2 and 1 s per image: two images at 1 s, two at 2 s, one at 3 s, then done
    assert arrivals == [(1.0, 1), (1.0, 2), (2.0, 3), (2.0, 4), (3.0, 5), (3.0, 6)]


async def test_late_subscriber_replays_everything_at_once(client: TrioClient, token: str) -> None:
    job_id = await finished_job(client, token)
    t0 = trio.current_time()
    _, _, frames = await read_sse(client, f"/api/generate/{job_id}/stream", headers=bearer(token))
    assert trio.current_time() == t0
    assert [frame.get("id") for frame in frames] == [None, 1, 2, 3, 4, 5, 6]


async def test_last_event_id_header_resumes_after_n(client: TrioClient, token: str) -> None:
    job_id = await finished_job(client, token)
    headers = {**bearer(token), "Last-Event-ID": "3"}
    _, _, frames = await read_sse(client, f"/api/generate/{job_id}/stream", headers=headers)
    assert [frame.get("id") for frame in frames] == [None, 4, 5, 6]


async def test_query_last_event_id_resumes_and_the_header_wins(
    client: TrioClient, token: str
) -> None:
    job_id = await finished_job(client, token)
    path = f"/api/generate/{job_id}/stream?last_event_id=4"
    _, _, frames = await read_sse(client, path, headers=bearer(token))
    assert [frame.get("id") for frame in frames] == [None, 5, 6]
    _, _, frames = await read_sse(client, path, headers={**bearer(token), "Last-Event-ID": "2"})
    assert [frame.get("id") for frame in frames] == [None, 3, 4, 5, 6]


async def test_resume_from_done_or_later_is_204(client: TrioClient, token: str) -> None:
    job_id = await finished_job(client, token)
    for cursor in ("6", "7", "999999", "9" * 19, "9" * 40):  # any length: still after done
        headers = {**bearer(token), "Last-Event-ID": cursor}
        response = await client.get(f"/api/generate/{job_id}/stream", headers=headers)
        assert response.status_code == 204
        assert await response.get_data() == b""


async def test_malformed_last_event_id_means_full_replay(client: TrioClient, token: str) -> None:
    job_id = await finished_job(client, token)
    for cursor in ("-1", "abc", "1.5", "", " ", "\u0663"):
        headers = {**bearer(token), "Last-Event-ID": cursor}
        _, _, frames = await read_sse(client, f"/api/generate/{job_id}/stream", headers=headers)
        assert [frame.get("id") for frame in frames] == [None, 1, 2, 3, 4, 5, 6], cursor


async def test_heartbeat_ping_after_exactly_fifteen_idle_seconds(
    client: TrioClient, token: str, provider: FakeProvider
) -> None:
    release = trio.Event()
    provider.default = Script(latency_s=0, block=release)
    job_id = await create_job(client, token, num_images=5)
    async with client.request(f"/api/generate/{job_id}/stream", headers=bearer(token)) as conn:
        await conn.send_complete()
        with trio.fail_after(100):
            assert parse_sse(await conn.receive()) == [{"retry": 3000}]
            t0 = trio.current_time()
            assert parse_sse(await conn.receive()) == [{"comment": "ping"}]
            assert trio.current_time() - t0 == HEARTBEAT_S
            assert parse_sse(await conn.receive()) == [{"comment": "ping"}]
            assert trio.current_time() - t0 == 2 * HEARTBEAT_S
        await conn.disconnect()


async def test_subscribers_are_counted_and_released_on_disconnect(
    client: TrioClient, token: str, supervisor: Supervisor, provider: FakeProvider
) -> None:
    provider.default = Script(latency_s=100)
    job_id = await create_job(client, token)
    async with client.request(f"/api/generate/{job_id}/stream", headers=bearer(token)) as conn:
        await conn.send_complete()
        await conn.receive()
        assert dict(supervisor.statistics().subscribers)[Transport.SSE] == 1
        await conn.disconnect()
    await trio.testing.wait_all_tasks_blocked()
    assert dict(supervisor.statistics().subscribers)[Transport.SSE] == 0


async def test_shutdown_ends_an_open_stream(
    client: TrioClient, token: str, supervisor: Supervisor, provider: FakeProvider
) -> None:
    provider.default = Script(latency_s=100)
    job_id = await create_job(client, token)
    async with client.request(f"/api/generate/{job_id}/stream", headers=bearer(token)) as conn:
        await conn.send_complete()
        await conn.receive()
        t0 = trio.current_time()
        supervisor.begin_shutdown()
        with trio.fail_after(1):
            rest = b""
            while True:
                try:
                    rest += await conn.receive()
                except trio.EndOfChannel:
                    break
        assert trio.current_time() == t0
        assert b"event:" not in rest


async def test_cancel_reaches_subscribers_as_done_canceled(
    client: TrioClient, token: str, provider: FakeProvider
) -> None:
    provider.default = Script(latency_s=100)
    job_id = await create_job(client, token)
    async with trio.open_nursery() as nursery:
        frames: list[dict[str, Any]] = []

        async def follow() -> None:
            _, _, got = await read_sse(
                client, f"/api/generate/{job_id}/stream", headers=bearer(token)
            )
            frames.extend(got)

        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        await client.delete(f"/api/generate/{job_id}", headers=bearer(token))
    done = frames[-1]
    assert done["event"] == "done"
    assert done["data"]["status"] == "canceled"
    assert [frame["data"]["status"] for frame in frames[1:-1]] == ["canceled"] * 5
