"""The whole service (``run_server``) on Replicate's API, faked on a real socket (real clock).

Faults come from the fake's seeded random source plus a few forced answers, so every kind
(429, 500 that created nothing, 500 that did create) happens in every run; the assertions hold
whatever the interleaving.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.e2e.replicate_service import (
    WAIT_S,
    Answers,
    follow,
    provider_statistics,
    replicate_environ,
    running_service,
    service_settings,
    submit,
)
from tests.fake_replicate import FakeReplicate, run_fake_replicate


@pytest.fixture
async def fake() -> AsyncIterator[FakeReplicate]:
    fake = FakeReplicate(latency_s=0.2, seed=20260101)
    async with run_fake_replicate(fake):
        yield fake


# --- tests ------------------------------------------------------------------------------------


async def test_faulty_replicate_gives_every_image_exactly_one_prediction(
    fake: FakeReplicate, tmp_path: Path
) -> None:
    fake.faults.create_500 = 0.3
    fake.faults.create_500_creates = 0.5  # half of those 500s did create a prediction
    fake.faults.create_429 = 0.1
    fake.faults.retry_after_s = 1
    # Whatever the random draws, each kind of fault happens at least once.
    fake.faults.forced_creates.extend(["500-created", "429", "500"])
    answers = Answers(fake)
    settings = service_settings(tmp_path, **replicate_environ(fake))
    prompts = [f"a lighthouse at dusk, take {take}" for take in range(3)]

    async with running_service(settings) as client:
        job_ids = [await submit(client, prompt, 5) for prompt in prompts]
        events = {job_id: await follow(client, job_id) for job_id in job_ids}
        stats = await provider_statistics(client)

    for job_events in events.values():
        *progress, done = job_events
        assert done["data"]["status"] == "completed"
        assert (done["data"]["completed_count"], done["data"]["failed_count"]) == (5, 0)
        assert sorted(event["data"]["index"] for event in progress) == [0, 1, 2, 3, 4]
        assert {event["data"]["status"] for event in progress} == {"completed"}
    urls = {event["data"]["url"] for job in events.values() for event in job[:-1]}
    assert urls == {f"{fake.base_url}/files/{pid}/out-0.webp" for pid in fake.predictions}
    # One prediction per image: none created twice, none orphaned, none shared.
    assert len(fake.predictions) == 15
    assert fake.statuses() == ["succeeded"] * 15
    assert fake.predictions_per_prompt() == dict.fromkeys(prompts, 5)
    assert (stats["name"], stats["predictions"], stats["images"]) == ("replicate", 15, 15)
    assert (stats["failed_predictions"], stats["in_flight"]) == (0, 0)
    # The provider's counts agree with what the fake saw.
    assert stats["creates"] == fake.create_requests >= 15
    assert (
        answers.counts["create", 201]
        + answers.counts["create", 500]
        + answers.counts["create", 429]
        == fake.create_requests
    )
    assert stats["throttled"] == answers.counts["create", 429] >= 1
    assert answers.counts["create", 500] >= 2


@pytest.mark.parametrize("when", ["create-held", "polling"])
async def test_cancelling_a_job_cancels_its_running_predictions_at_replicate(
    fake: FakeReplicate, tmp_path: Path, when: str
) -> None:
    fake.latency_s = 60
    answers = Answers(fake)
    # "create-held": DELETE while every create is still held open by Prefer: wait (5 s);
    # "polling": once every create has answered and each prediction has been polled.
    wait_s = "5" if when == "create-held" else "1"
    settings = service_settings(tmp_path, **replicate_environ(fake, REPLICATE_WAIT_S=wait_s))

    async with running_service(settings) as client:
        job_id = await submit(client, "a slow glacier", 5)
        with trio.fail_after(WAIT_S):
            if when == "create-held":
                await fake.wait_for_predictions(5)
            else:
                await answers.wait_until_polled(5)
        response = await client.delete(f"/api/generate/{job_id}")
        job = response.json()
        events = await follow(client, job_id)
        stats = await provider_statistics(client)

    assert response.status_code == 200
    assert job["status"] == "canceled"
    assert [result["status"] for result in job["results"]] == ["canceled"] * 5
    assert events[-1]["data"]["status"] == "canceled"
    assert sorted(fake.cancel_requests) == sorted(fake.predictions)
    assert len(fake.predictions) == 5
    assert fake.statuses() == ["canceled"] * 5
    assert (stats["cancels"], stats["in_flight"], stats["images"]) == (5, 0, 0)


async def test_polling_rides_out_a_storm_of_429_and_503(
    fake: FakeReplicate, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.latency_s = 1.5  # longer than Prefer: wait, so every image is polled
    fake.faults.get_429 = 0.3
    fake.faults.get_503 = 0.3
    fake.faults.retry_after_s = 1
    answers = Answers(fake)
    settings = service_settings(tmp_path, **replicate_environ(fake, REPLICATE_WAIT_S="1"))

    with caplog.at_level(logging.WARNING):
        async with running_service(settings) as client:
            job_id = await submit(client, "a stormy sea", 5)
            *progress, done = await follow(client, job_id)
            stats = await provider_statistics(client)

    assert done["data"]["status"] == "completed"
    assert {event["data"]["status"] for event in progress} == {"completed"}
    assert answers.counts["get", 429] >= 1
    assert answers.counts["get", 503] >= 1
    assert len(answers.polled) == 5
    assert len(fake.predictions) == 5
    assert (stats["creates"], stats["predictions"], stats["images"]) == (5, 5, 5)
    # Replicate's throttling of polls is not a throttle of creates.
    assert stats["throttled"] == 0
    # Nothing crashed on the way (an asyncio sleep under Trio would log a RuntimeError).
    assert [record for record in caplog.records if record.levelno >= logging.ERROR] == []
