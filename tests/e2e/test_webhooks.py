"""``POST /api/webhooks/replicate`` on the running service, with Replicate faked on a real socket.

Real sockets and the real clock (not tests/web/, whose tests all run on virtual time): the fake
delivers its signed webhooks to the service's own URL, so the port is chosen before it starts.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.e2e.ports import free_port
from tests.e2e.replicate_service import (
    WAIT_S,
    follow,
    provider_statistics,
    replicate_environ,
    running_service,
    service_settings,
    submit,
)
from tests.fake_replicate import WEBHOOK_SECRET, FakeReplicate, run_fake_replicate, sign_webhook
from web.settings import Settings

WEBHOOK_PATH = "/api/webhooks/replicate"
OTHER_SECRET = "whsec_" + "QUJD" * 8


@pytest.fixture
async def fake() -> AsyncIterator[FakeReplicate]:
    fake = FakeReplicate(latency_s=1.5)
    async with run_fake_replicate(fake):
        yield fake


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def settings(fake: FakeReplicate, tmp_path: Path, port: int) -> Settings:
    """Webhooks to the service itself; Prefer: wait of 1 s; a fallback poll too slow to matter."""
    environ = replicate_environ(
        fake,
        MIN_IMAGES="1",
        REPLICATE_WAIT_S="1",
        REPLICATE_WEBHOOK_URL=f"http://127.0.0.1:{port}{WEBHOOK_PATH}",
        REPLICATE_WEBHOOK_SECRET=WEBHOOK_SECRET,
        REPLICATE_WEBHOOK_POLL_INTERVAL_S="60",
    )
    return service_settings(tmp_path, **environ)


async def post_webhook(
    client: httpx.AsyncClient, headers: dict[str, str], body: bytes
) -> httpx.Response:
    """POST as Replicate does: no bearer token, the signature headers, a JSON body."""
    async with httpx.AsyncClient(base_url=client.base_url, timeout=WAIT_S) as replicate:
        return await replicate.post(
            WEBHOOK_PATH, content=body, headers={"Content-Type": "application/json", **headers}
        )


def completed(fake: FakeReplicate, prediction_id: str) -> dict[str, Any]:
    """The body of the ``completed`` webhook for ``prediction_id``, as the fake would send it."""
    return {
        "id": prediction_id,
        "status": "succeeded",
        "output": [f"{fake.base_url}/files/{prediction_id}/out-0.webp"],
        "error": None,
    }


async def wait_until_waiting_for_a_prediction(client: httpx.AsyncClient) -> None:
    """Until the provider waits for a prediction (its create has answered), so a webhook that
    got through would complete the image at once."""
    with trio.fail_after(WAIT_S):
        # The provider signals nothing when its create answers; /api/status is where it shows.
        while (await provider_statistics(client))["in_flight"] == 0:  # noqa: ASYNC110
            await trio.sleep(0.02)


async def job_status(client: httpx.AsyncClient, job_id: str) -> tuple[str, list[str]]:
    job = (await client.get(f"/api/generate/{job_id}")).json()
    return job["status"], [result["status"] for result in job["results"]]


async def test_a_signed_webhook_completes_a_prediction_longer_than_the_wait(
    fake: FakeReplicate, settings: Settings, port: int
) -> None:
    async with running_service(settings, bind=f"127.0.0.1:{port}") as client:
        job_id = await submit(client, "a long exposure of the sea", 1)
        progress, done = await follow(client, job_id)
        stats = await provider_statistics(client)

    (prediction_id,) = fake.predictions
    assert done["data"]["status"] == "completed"
    assert progress["data"]["status"] == "completed"
    assert progress["data"]["url"] == f"{fake.base_url}/files/{prediction_id}/out-0.webp"
    assert fake.webhooks_sent == 1
    # The create answered "processing" after its 1 s wait; no poll ran (the next was due in
    # 60 s): the webhook finished the image.
    assert (stats["webhooks_received"], stats["polls"]) == (1, 0)


async def test_status_shows_the_providers_statistics(
    fake: FakeReplicate, settings: Settings, port: int
) -> None:
    async with running_service(settings, bind=f"127.0.0.1:{port}") as client:
        before = await provider_statistics(client)
        job_id = await submit(client, "a long exposure of the sea", 1)
        await follow(client, job_id)
        after = await provider_statistics(client)

    counters = ["creates", "predictions", "images", "polls", "webhooks_received", "cancels"]
    common = {
        "name": "replicate",
        "model": "black-forest-labs/flux-schnell",
        "webhooks": True,
        "throttled": 0,
        "create_rate_per_s": 10.0,
        "in_flight": 0,
    }
    assert {key: before[key] for key in [*common, *counters]} == {
        **common,
        **dict.fromkeys(counters, 0),
    }
    assert {key: after[key] for key in common} == common
    assert {key: after[key] for key in counters} == {
        "creates": 1,
        "predictions": 1,
        "images": 1,
        "polls": 0,
        "webhooks_received": 1,
        "cancels": 0,
    }
    assert after["webhooks_received"] == fake.webhooks_sent == 1


@pytest.mark.parametrize(
    "tamper",
    [
        "forged-signature",
        "tampered-body",
        "stale-timestamp",
        "future-timestamp",
        "missing-webhook-id",
        "missing-webhook-timestamp",
        "missing-webhook-signature",
        "not-json",
        "not-a-prediction",
    ],
)
async def test_a_bad_webhook_gets_401_and_changes_nothing(
    fake: FakeReplicate, settings: Settings, port: int, tamper: str
) -> None:
    fake.latency_s = 60  # the fake's own webhook never comes during the test
    async with running_service(settings, bind=f"127.0.0.1:{port}") as client:
        job_id = await submit(client, "a very slow sunrise", 1)
        await wait_until_waiting_for_a_prediction(client)
        (prediction_id,) = fake.predictions
        genuine = json.dumps(completed(fake, prediction_id))
        body = genuine
        headers = sign_webhook(WEBHOOK_SECRET, f"msg_{prediction_id}", body)
        if tamper == "forged-signature":
            headers = sign_webhook(OTHER_SECRET, f"msg_{prediction_id}", body)
        elif tamper == "tampered-body":
            body = body.replace(prediction_id, "fake0000000000000000000999")
        elif tamper.endswith("-timestamp") and not tamper.startswith("missing"):
            skew = 3600 if tamper == "future-timestamp" else -3600
            stamp = int(time.time()) + skew
            headers = sign_webhook(WEBHOOK_SECRET, f"msg_{prediction_id}", body, stamp)
        elif tamper.startswith("missing-"):
            del headers[tamper.removeprefix("missing-")]
        else:
            body = "this is not JSON" if tamper == "not-json" else json.dumps([prediction_id])
            headers = sign_webhook(WEBHOOK_SECRET, f"msg_{prediction_id}", body)

        rejected = await post_webhook(client, headers, body.encode())
        state_after = await job_status(client, job_id)
        stats_after = await provider_statistics(client)
        # Nothing changed: Replicate's genuine webhook still completes the image.
        accepted = await post_webhook(
            client, sign_webhook(WEBHOOK_SECRET, f"msg_{prediction_id}", genuine), genuine.encode()
        )
        progress, done = await follow(client, job_id)

    assert rejected.status_code == 401
    assert rejected.headers["Content-Type"] == "application/json"
    detail = rejected.json()["detail"]
    assert isinstance(detail, str)
    assert detail.startswith("Invalid webhook")
    assert state_after == ("running", ["running"])
    assert (stats_after["webhooks_received"], stats_after["images"]) == (0, 0)
    assert (accepted.status_code, accepted.json()) == (200, {"status": "accepted"})
    assert progress["data"]["url"] == completed(fake, prediction_id)["output"][0]
    assert done["data"]["status"] == "completed"


async def test_webhooks_are_404_when_the_provider_is_the_local_one(tmp_path: Path) -> None:
    settings = service_settings(tmp_path)
    assert settings.replicate is None
    body = json.dumps({"id": "fake0000000000000000000001", "status": "succeeded"})
    headers = sign_webhook(WEBHOOK_SECRET, "msg_1", body)

    async with running_service(settings) as client:
        response = await post_webhook(client, headers, body.encode())
        stats = await provider_statistics(client)

    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"detail": "Webhooks are not configured"}
    assert stats["name"] == "local"


async def test_webhooks_are_404_when_replicate_runs_without_webhooks(
    fake: FakeReplicate, tmp_path: Path
) -> None:
    settings = service_settings(tmp_path, **replicate_environ(fake))
    assert settings.replicate is not None
    assert not settings.replicate.webhooks
    body = json.dumps({"id": "fake0000000000000000000001", "status": "succeeded"})
    headers = sign_webhook(WEBHOOK_SECRET, "msg_1", body)

    async with running_service(settings) as client:
        response = await post_webhook(client, headers, body.encode())

    assert response.status_code == 404
    assert response.json() == {"detail": "Webhooks are not configured"}
