"""Create, poll, cancel, list and metrics, as a polling client sees them."""

from __future__ import annotations

from typing import Any, cast

import attrs
import pytest
import trio
from quart_trio import QuartTrio
from quart_trio.testing import TrioClient

from actors.supervisor import Supervisor
from tests.fakes import FakeProvider, Script
from tests.web.helpers import bearer, create_job
from web.app import create_app
from web.auth import Authenticator
from web.settings import Settings

JOB_KEYS = {
    "job_id",
    "id",
    "prompt",
    "num_images",
    "status",
    "created_at",
    "ttfi_ms",
    "total_ms",
    "results",
    "progress",
}
RESULT_KEYS = {"id", "index", "status", "url", "error", "attempts"}


async def poll(client: TrioClient, token: str, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/generate/{job_id}", headers=bearer(token))
    assert response.status_code == 200
    body = await response.get_json()
    assert isinstance(body, dict)
    return body


async def poll_until_finished(client: TrioClient, token: str, job_id: str) -> dict[str, Any]:
    with trio.fail_after(600):
        while True:
            body = await poll(client, token, job_id)
            if body["status"] in ("completed", "failed", "canceled"):
                return body
            await trio.sleep(0.25)  # the client's polling interval, on virtual time


async def test_create_answers_pending_with_the_job_id(client: TrioClient, token: str) -> None:
    response = await client.post(
        "/api/generate",
        json={"prompt": "A beautiful sunset over mountains", "num_images": 5},
        headers=bearer(token),
    )
    assert response.status_code == 200
    body = await response.get_json()
    assert body["status"] == "pending"
    assert isinstance(body["job_id"], str)
    assert body["job_id"]


async def test_poll_has_the_contract_shape_while_running(client: TrioClient, token: str) -> None:
    job_id = await create_job(client, token, num_images=6)
    body = await poll(client, token, job_id)
    assert set(body) >= JOB_KEYS
    assert body["job_id"] == body["id"] == job_id
    assert body["num_images"] == 6
    assert body["created_at"].endswith("Z")
    results = body["results"]
    assert isinstance(results, list)
    assert [result["index"] for result in results] == list(range(6))
    for result in results:
        assert set(result) >= RESULT_KEYS
        assert result["status"] == "running"
        assert result["url"] is None
    assert body["ttfi_ms"] is None
    assert body["total_ms"] is None
    assert body["progress"] == {
        "completed": 0,
        "failed": 0,
        "running": 6,
        "total": 6,
        "canceled": 0,
    }


async def test_finished_job_polls_completed_with_absolute_urls_and_timings(
    client: TrioClient, token: str
) -> None:
    job_id = await create_job(client, token, num_images=5)
    body = await poll_until_finished(client, token, job_id)
    assert body["status"] == "completed"
    # capacity 2, 1 s per image: images finish at 1, 1, 2, 2, 3 s
    assert body["ttfi_ms"] == 1000
    assert body["total_ms"] == 3000
    results = body["results"]
    assert isinstance(results, list)
    assert all(result["status"] == "completed" for result in results)
    assert all(result["attempts"] == 1 for result in results)
    assert [result["url"] for result in results] == [
        f"https://img.test/{job_id}/{index}.png" for index in range(5)
    ]


async def test_relative_provider_urls_become_absolute(
    supervisor: Supervisor, settings: Settings, auth: Authenticator, provider: FakeProvider
) -> None:
    provider.default = Script(latency_s=0.5, url="/files/{job_id}-{index}.png")
    for base, expected in [
        (None, "http://localhost"),
        ("https://cdn.example.org", "https://cdn.example.org"),
    ]:
        app = create_app(supervisor, attrs.evolve(settings, public_base_url=base), auth)
        client = cast(TrioClient, app.test_client())
        login = await client.post(
            "/api/auth/login", json={"email": "test@example.com", "password": "password123"}
        )
        token = (await login.get_json())["access_token"]
        job_id = await create_job(client, token)
        body = await poll_until_finished(client, token, job_id)
        urls = [result["url"] for result in body["results"]]
        assert urls[0] == f"{expected}/files/{job_id}-0.png"


async def test_metrics_report_ttfi_total_and_per_image_timings(
    client: TrioClient, token: str, provider: FakeProvider
) -> None:
    provider.scripts[1] = Script(latency_s=1.0, fail_times=1)
    job_id = await create_job(client, token, num_images=5)
    await poll_until_finished(client, token, job_id)
    response = await client.get(f"/api/generate/{job_id}/metrics", headers=bearer(token))
    body = await response.get_json()
    assert {
        key: body[key]
        for key in ("job_id", "status", "ttfi_ms", "completed_count", "failed_count", "total_count")
    } == {
        "job_id": job_id,
        "status": "completed",
        "ttfi_ms": 1000,
        "completed_count": 5,
        "failed_count": 0,
        "total_count": 5,
    }
    assert body["total_ms"] >= body["ttfi_ms"]
    assert body["attempts"] == 6
    assert body["retries"] == 1
    assert [image["attempts"] for image in body["images"]] == [1, 2, 1, 1, 1]
    assert all(image["provider_ms"] >= 1000 for image in body["images"])


async def test_failed_images_make_a_failed_job_with_null_ttfi(
    client: TrioClient, token: str, provider: FakeProvider
) -> None:
    provider.default = Script(latency_s=0.5, permanent="the model refused the prompt")
    job_id = await create_job(client, token)
    body = await poll_until_finished(client, token, job_id)
    assert body["status"] == "failed"
    assert body["ttfi_ms"] is None
    assert body["total_ms"] is not None
    results = body["results"]
    assert isinstance(results, list)
    assert {result["error"] for result in results} == {"the model refused the prompt"}
    assert body["progress"]["failed"] == 5


async def test_delete_cancels_and_answers_the_settled_job(
    client: TrioClient, token: str, provider: FakeProvider
) -> None:
    job_id = await create_job(client, token, num_images=5)
    await trio.sleep(1.5)  # two images done, two in flight, one waiting
    response = await client.delete(f"/api/generate/{job_id}", headers=bearer(token))
    assert response.status_code == 200
    body = await response.get_json()
    assert body["status"] == "canceled"
    statuses = [result["status"] for result in body["results"]]
    assert statuses == ["completed", "completed", "canceled", "canceled", "canceled"]
    assert provider.cancelled == 2
    again = await client.delete(f"/api/generate/{job_id}", headers=bearer(token))
    assert (await again.get_json()) == body


async def test_delete_of_a_finished_job_changes_nothing(client: TrioClient, token: str) -> None:
    job_id = await create_job(client, token)
    before = await poll_until_finished(client, token, job_id)
    response = await client.delete(f"/api/generate/{job_id}", headers=bearer(token))
    assert response.status_code == 200
    assert await response.get_json() == before


async def test_list_is_newest_first_and_paginated(client: TrioClient, token: str) -> None:
    job_ids = []
    for number in range(5):
        job_ids.append(await create_job(client, token, prompt=f"prompt number {number}"))
        await poll_until_finished(client, token, job_ids[-1])
    seen: list[str] = []
    cursor = None
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = await (await client.get(f"/api/generate{query}", headers=bearer(token))).get_json()
        seen.extend(job["job_id"] for job in page["results"])
        assert len(page["results"]) <= 2
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(job_ids))


async def test_idempotency_key_returns_the_same_job(
    client: TrioClient, token: str, supervisor: Supervisor
) -> None:
    headers = {**bearer(token), "Idempotency-Key": "order-42"}
    body = {"prompt": "a calm lake", "num_images": 5}
    first = await (await client.post("/api/generate", json=body, headers=headers)).get_json()
    second = await (await client.post("/api/generate", json=body, headers=headers)).get_json()
    assert first["job_id"] == second["job_id"]
    assert (first["created"], second["created"]) == (True, False)
    assert supervisor.statistics().jobs_retained == 1
    changed = await client.post(
        "/api/generate", json={"prompt": "a stormy lake", "num_images": 5}, headers=headers
    )
    assert changed.status_code == 422
    assert supervisor.statistics().jobs_retained == 1


async def test_per_user_active_job_limit_is_429_with_retry_after(
    client: TrioClient, token: str, other_token: str
) -> None:
    for _ in range(3):
        await create_job(client, token)
    response = await client.post(
        "/api/generate", json={"prompt": "one too many", "num_images": 5}, headers=bearer(token)
    )
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "5"
    assert "3" in (await response.get_json())["detail"]
    await create_job(client, other_token)  # the limit is per user


async def test_global_queue_cap_is_503_with_retry_after(
    client: TrioClient, token: str, other_token: str
) -> None:
    for _ in range(3):
        await create_job(client, token, num_images=20)
    response = await client.post(
        "/api/generate",
        json={"prompt": "over the cap", "num_images": 5},
        headers=bearer(other_token),
    )
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"


async def test_shutting_down_refuses_new_jobs_with_503(
    client: TrioClient, token: str, supervisor: Supervisor
) -> None:
    supervisor.begin_shutdown()
    response = await client.post(
        "/api/generate", json={"prompt": "too late", "num_images": 5}, headers=bearer(token)
    )
    assert response.status_code == 503
    assert "Retry-After" in response.headers
    health = await client.get("/health")
    assert health.status_code == 503
    assert (await health.get_json())["status"] == "degraded"


async def test_status_shows_the_supervisors_view(client: TrioClient, token: str) -> None:
    await create_job(client, token, num_images=5)
    await trio.sleep(0.5)
    body = await (await client.get("/api/status", headers=bearer(token))).get_json()
    assert body["jobs"]["running"] == 1
    assert body["capacity"] == {"limit": 2, "in_use": 2, "waiting": 3, "jobs_waiting": 1}
    assert body["images"]["queued"] == 5
    assert body["subscribers"] == {"sse": 0, "websocket": 0}
    assert body["provider"] == {"name": "fake", "calls": 2, "cancelled": 0}


async def test_health_is_ok(client: TrioClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert (await response.get_json())["status"] == "ok"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("PUT", "/api/generate", 405),
        ("PATCH", "/api/generate/abc", 405),
        ("GET", "/api/auth/login", 405),
        ("GET", "/api/nothing-here", 404),
        ("GET", "/files/../secrets", 404),
        ("GET", "/files/missing.png", 404),
    ],
)
async def test_unknown_routes_and_methods_answer_json(
    client: TrioClient, token: str, method: str, path: str, status: int
) -> None:
    response = await client.open(path, method=method, headers=bearer(token))
    assert response.status_code == status
    assert isinstance((await response.get_json())["detail"], str)


async def test_an_app_per_test_shares_nothing(app: QuartTrio) -> None:
    assert app.extensions["imagegen"].supervisor.statistics().jobs_retained == 0
