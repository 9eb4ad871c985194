"""The store as the routes see it: /health, 503 on a store that cannot write, restored jobs."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import trio
from quart_trio.testing import TrioClient

from actors.settings import SupervisorSettings
from actors.store import MemoryStore
from actors.supervisor import Supervisor
from tests.fakes import FakeProvider, Script, upper_jitter
from tests.web.helpers import bearer
from web.app import create_app
from web.auth import Authenticator, kept_secret
from web.settings import Settings

BODY = {"prompt": "a lighthouse", "num_images": 5}


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore(resumable=True)


@pytest.fixture
async def supervisor(
    nursery: trio.Nursery, provider: FakeProvider, settings: Settings, store: MemoryStore
) -> Supervisor:
    supervisor = Supervisor(provider, settings.supervisor, uniform=upper_jitter, store=store)
    await nursery.start(supervisor.run)
    return supervisor


async def test_health_reports_the_store(client: TrioClient) -> None:
    response = await client.get("/health")

    assert response.status_code == 200
    assert await response.get_json() == {
        "status": "ok",
        "checks": {"supervisor": "ok", "store": "ok"},
    }


async def test_health_is_503_while_the_store_is_unusable(
    client: TrioClient, store: MemoryStore
) -> None:
    store.broken = "database or disk is full"

    response = await client.get("/health")

    assert response.status_code == 503
    assert response.headers["Retry-After"].isdigit()
    assert await response.get_json() == {
        "status": "degraded",
        "detail": "The job store is unusable",
        "checks": {"supervisor": "ok", "store": "database or disk is full"},
    }


async def test_a_job_the_store_refuses_is_a_503_and_leaves_nothing(
    client: TrioClient, token: str, store: MemoryStore, provider: FakeProvider
) -> None:
    store.broken = "database or disk is full"

    refused = await client.post("/api/generate", json=BODY, headers=bearer(token))

    assert refused.status_code == 503
    assert refused.headers["Retry-After"].isdigit()
    assert "store" in (await refused.get_json())["detail"]
    listed = await client.get("/api/generate", headers=bearer(token))
    assert (await listed.get_json())["results"] == []
    assert provider.calls == []
    store.broken = None
    accepted = await client.post("/api/generate", json=BODY, headers=bearer(token))
    assert accepted.status_code == 200


async def test_a_refused_idempotent_request_can_be_sent_again(
    client: TrioClient, token: str, store: MemoryStore
) -> None:
    headers = {**bearer(token), "Idempotency-Key": "order-7"}
    store.broken = "disk I/O error"
    assert (await client.post("/api/generate", json=BODY, headers=headers)).status_code == 503
    store.broken = None

    again = await client.post("/api/generate", json=BODY, headers=headers)

    assert again.status_code == 200
    assert (await again.get_json())["created"] is True


async def test_a_restarted_service_serves_the_same_job_and_key(
    nursery: trio.Nursery, settings: Settings, auth: Authenticator, store: MemoryStore
) -> None:
    """Two apps on one (resumable) store, one after the other: a restart on virtual time."""
    provider = FakeProvider(default=Script(latency_s=1))
    headers_key = {"Idempotency-Key": "order-8"}

    async def serve_once(check: bool) -> str:
        supervisor = Supervisor(provider, settings.supervisor, uniform=upper_jitter, store=store)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                await inner.start(supervisor.run)
                client = create_app(supervisor, settings, auth).test_client()
                token = (
                    await (
                        await client.post(
                            "/api/auth/login",
                            json={"email": "test@example.com", "password": "password123"},
                        )
                    ).get_json()
                )["access_token"]
                headers = {**bearer(token), **headers_key}
                answer = await client.post("/api/generate", json=BODY, headers=headers)
                body = await answer.get_json()
                if check:
                    assert body["created"] is False
                    await trio.sleep(10)
                    job = await client.get(f"/api/generate/{body['job_id']}", headers=headers)
                    assert (await job.get_json())["status"] == "completed"
                else:
                    assert body["created"] is True
                    await trio.sleep(0.5)  # the process stops before any image is made
                scope.cancel()
        job_id = body["job_id"]
        assert isinstance(job_id, str)
        return job_id

    first = await serve_once(check=False)
    second = await serve_once(check=True)

    assert first == second
    # Capacity 2: images 0 and 1 were in flight when the process stopped; after the restart
    # they go on with attempt 2, and the other three start with attempt 1.
    assert sorted((call.index, call.attempt) for call in provider.calls) == [
        (0, 1),
        (0, 2),
        (1, 1),
        (1, 2),
        (2, 1),
        (3, 1),
        (4, 1),
    ]


def test_settings_default_to_the_sqlite_store() -> None:
    settings = Settings()
    assert (settings.store.backend, str(settings.store.database_path)) == (
        "sqlite",
        "var/imagegen.sqlite3",
    )
    assert SupervisorSettings() == settings.supervisor


def test_a_made_signing_key_is_kept_for_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "var" / "auth_secret"

    first = kept_secret(path)

    assert len(first) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert kept_secret(path) == first
