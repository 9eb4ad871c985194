"""Open event streams are capped per user (SSE answers 429, a WebSocket closes 1008), refusals
are counted in ``/api/status`` and ``/metrics``, and so are jobs ended by a bug of their own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import attrs
import pytest
import trio
from quart.testing.connections import WebsocketDisconnectError
from quart_trio.testing import TrioClient

from actors.job import JobActor
from actors.messages import WorkerReport
from tests.fakes import FakeProvider, Script
from tests.web.helpers import bearer, create_job, parse_sse, read_sse
from tests.web.test_observability import samples
from web.settings import Settings

CAP = 2


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return attrs.evolve(
        settings, supervisor=attrs.evolve(settings.supervisor, max_streams_per_user=CAP)
    )


@asynccontextmanager
async def open_sse(client: TrioClient, job_id: str, token: str) -> AsyncIterator[None]:
    """An SSE stream held open (its ``retry:`` line read) for the body of the block."""
    async with client.request(f"/api/generate/{job_id}/stream", headers=bearer(token)) as conn:
        await conn.send_complete()
        assert parse_sse(await conn.receive()) == [{"retry": 3000}]
        yield
        await conn.disconnect()


@asynccontextmanager
async def open_ws(client: TrioClient, job_id: str, token: str) -> AsyncIterator[None]:
    """A WebSocket held open (accepted and subscribed) for the body of the block."""
    async with client.websocket(f"/api/generate/{job_id}?token={token}"):
        await trio.testing.wait_all_tasks_blocked()
        yield


async def status(client: TrioClient, token: str) -> dict[str, object]:
    body = await (await client.get("/api/status", headers=bearer(token))).get_json()
    assert isinstance(body, dict)
    return body


async def scrape(client: TrioClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return samples(await (await client.get("/metrics")).get_data(as_text=True))


async def test_a_stream_over_the_users_cap_answers_429_and_is_counted(
    client: TrioClient, token: str, other_token: str, provider: FakeProvider
) -> None:
    provider.default = Script(latency_s=100)
    job_id = await create_job(client, token)
    others = await create_job(client, other_token)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(open_sse(client, job_id, token))
        await stack.enter_async_context(open_ws(client, job_id, token))

        refused = await client.get(f"/api/generate/{job_id}/stream", headers=bearer(token))
        body = await refused.get_json()
        async with open_sse(client, others, other_token):  # the cap is per user
            pass

        assert refused.status_code == 429
        assert body == {"detail": f"Too many open streams: at most {CAP} per user"}
        assert refused.headers["Retry-After"] == "5"
        view = await status(client, token)
        assert view["subscribers"] == {"sse": 1, "websocket": 1}
        assert view["subscribers_refused"] == {"sse": 1, "websocket": 0}
        found = await scrape(client)
        assert found["imagegen_subscribers_refused_total", (("transport", "sse"),)] == 1
        assert found["imagegen_subscribers_refused_total", (("transport", "websocket"),)] == 0

    await trio.testing.wait_all_tasks_blocked()
    assert (await status(client, token))["subscribers"] == {"sse": 0, "websocket": 0}
    async with open_sse(client, job_id, token), open_sse(client, job_id, token):
        pass  # the room is back


async def test_a_websocket_over_the_users_cap_closes_1008(
    client: TrioClient, token: str, provider: FakeProvider
) -> None:
    provider.default = Script(latency_s=100)
    job_id = await create_job(client, token)
    async with open_sse(client, job_id, token), open_sse(client, job_id, token):
        async with client.websocket(f"/api/generate/{job_id}?token={token}") as ws:
            with trio.fail_after(10), pytest.raises(WebsocketDisconnectError) as closed:
                await ws.receive()

        assert closed.value.args[0] == 1008
        view = await status(client, token)
        assert view["subscribers"] == {"sse": 2, "websocket": 0}
        assert view["subscribers_refused"] == {"sse": 0, "websocket": 1}


async def test_a_replay_of_a_finished_job_counts_against_the_cap_too(
    client: TrioClient, token: str, provider: FakeProvider
) -> None:
    provider.by_prompt["slow"] = Script(latency_s=100)
    slow = await create_job(client, token, prompt="slow")
    done = await create_job(client, token)
    await read_sse(client, f"/api/generate/{done}/stream", headers=bearer(token))
    async with open_ws(client, slow, token), open_ws(client, slow, token):
        refused = await client.get(f"/api/generate/{done}/stream", headers=bearer(token))
    status_code, _, frames = await read_sse(
        client, f"/api/generate/{done}/stream", headers=bearer(token)
    )

    assert refused.status_code == 429
    assert status_code == 200
    assert frames[-1]["event"] == "done"


async def test_a_crashed_job_is_counted_in_status_and_metrics(
    client: TrioClient, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def buggy_fold(self: JobActor, report: WorkerReport) -> None:
        raise RuntimeError("fold bug")

    monkeypatch.setattr(JobActor, "_fold", buggy_fold)
    job_id = await create_job(client, token)
    _, _, frames = await read_sse(client, f"/api/generate/{job_id}/stream", headers=bearer(token))

    assert frames[-1]["event"] == "done"
    assert frames[-1]["data"]["status"] == "failed"
    assert (await status(client, token))["jobs_crashed_total"] == 1
    assert (await scrape(client))["imagegen_job_crashes_total", ()] == 1
