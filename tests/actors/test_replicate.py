"""The Replicate provider against a fake Replicate server on a real socket (real clock)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import attrs
import pytest
import trio

from actors.capacity import FairCapacity
from actors.errors import (
    NotStartedError,
    PermanentProviderError,
    TransientProviderError,
    WebhookRejected,
)
from actors.messages import ImageOutcome, ImageStatus, WorkerReport
from actors.providers.base import ImageRequest
from actors.providers.replicate import (
    ModelRef,
    ReplicateProvider,
    ReplicateSettings,
    SettingsProblem,
    open_replicate_provider,
)
from actors.retry import RetryPolicy
from actors.worker import WorkerContext, run_image_worker
from tests.fake_replicate import (
    TOKEN,
    WEBHOOK_SECRET,
    FakeReplicate,
    run_fake_replicate,
    sign_webhook,
)
from tests.fakes import fixed_now, upper_jitter

VERSION = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"


@pytest.fixture
async def fake() -> AsyncIterator[FakeReplicate]:
    fake = FakeReplicate(latency_s=0.05)
    async with run_fake_replicate(fake):
        yield fake


def settings_for(fake: FakeReplicate, **overrides: Any) -> ReplicateSettings:
    settings = ReplicateSettings(
        api_token=TOKEN,
        base_url=fake.base_url,
        wait_s=5,
        poll_interval_s=0.02,
        request_timeout_s=2.0,
    )
    return attrs.evolve(settings, **overrides)


@pytest.fixture
async def provider(fake: FakeReplicate) -> AsyncIterator[ReplicateProvider]:
    async with open_replicate_provider(settings_for(fake)) as provider:
        yield provider


def image(index: int = 0, attempt: int = 1, prompt: str = "a red fox") -> ImageRequest:
    return ImageRequest(job_id="job-1", index=index, prompt=prompt, attempt=attempt)


async def generate(provider: ReplicateProvider, request: ImageRequest) -> str:
    with trio.fail_after(10):
        return await provider.generate(request)


async def test_a_create_held_by_prefer_wait_answers_the_image_at_once(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    url = await generate(provider, image())
    assert url == f"{fake.base_url}/files/fake0000000000000000000001/out-0.webp"
    stats = provider.statistics()
    assert (stats["creates"], stats["predictions"], stats["images"], stats["polls"]) == (1, 1, 1, 0)
    assert fake.predictions["fake0000000000000000000001"].input == {"prompt": "a red fox"}


@pytest.mark.parametrize("output", ["string", "many"])
async def test_string_and_multi_image_outputs_give_one_url(output: str) -> None:
    fake = FakeReplicate(latency_s=0.01, output=output)
    async with run_fake_replicate(fake), open_replicate_provider(settings_for(fake)) as provider:
        url = await generate(provider, image())
    assert url.endswith("/out-0.webp")


async def test_a_prediction_longer_than_the_wait_window_is_polled(fake: FakeReplicate) -> None:
    fake.latency_s = 1.3
    async with open_replicate_provider(settings_for(fake, wait_s=1)) as provider:
        url = await generate(provider, image())
        stats = provider.statistics()
    assert url.endswith("/out-0.webp")
    assert stats["creates"] == 1
    assert isinstance(stats["polls"], int)
    assert stats["polls"] >= 1


async def test_version_refs_post_to_the_predictions_endpoint(fake: FakeReplicate) -> None:
    settings = settings_for(fake, model=ModelRef.parse(f"acme/model:{VERSION}"))
    async with open_replicate_provider(settings) as provider:
        await generate(provider, image())
    (prediction,) = fake.predictions.values()
    assert prediction.version == VERSION


async def test_extra_input_is_merged_and_the_prompt_wins(fake: FakeReplicate) -> None:
    settings = settings_for(fake, model_input={"aspect_ratio": "16:9", "prompt": "ignored"})
    async with open_replicate_provider(settings) as provider:
        await generate(provider, image(prompt="a calm lake"))
    (prediction,) = fake.predictions.values()
    assert prediction.input == {"aspect_ratio": "16:9", "prompt": "a calm lake"}


async def test_429_on_create_slows_every_create_and_is_waited_out_outside_the_attempt(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    fake.faults.forced_creates.extend(["429"])
    with pytest.raises(NotStartedError, match="throttling") as throttled:
        await generate(provider, image())
    assert throttled.value.retry_after_s == fake.faults.retry_after_s  # Retry-After, for the worker
    # Until the pause ends no create goes out: the attempt says how long to wait, at once.
    with pytest.raises(NotStartedError, match="turn") as early:
        await generate(provider, image(attempt=2))
    assert early.value.retry_after_s is not None
    assert 0 < early.value.retry_after_s <= fake.faults.retry_after_s
    assert fake.create_requests == 1

    await trio.sleep(early.value.retry_after_s)
    url = await generate(provider, image(attempt=3))

    assert url.endswith("/out-0.webp")
    stats = provider.statistics()
    assert (stats["creates"], stats["predictions"], stats["throttled"]) == (2, 1, 1)
    assert stats["create_rate_per_s"] == 6.0  # halved from 10, then one accepted create
    assert len(fake.predictions) == 1
    assert (stats["in_flight"], stats["tracked"]) == (0, 0)


async def test_500_that_created_nothing_started_nothing_and_the_retry_creates(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    fake.faults.forced_creates.extend(["500"])
    with pytest.raises(NotStartedError, match="failed to create"):
        await generate(provider, image())
    assert len(fake.predictions) == 0
    await generate(provider, image(attempt=2))
    assert len(fake.predictions) == 1
    stats = provider.statistics()
    assert (stats["creates"], stats["in_flight"], stats["tracked"]) == (2, 0, 0)


@pytest.mark.parametrize("fault", ["500-created", "hang-created"])
async def test_a_create_that_failed_after_creating_adopts_that_prediction(
    fake: FakeReplicate, fault: str
) -> None:
    fake.faults.forced_creates.extend([fault])
    async with open_replicate_provider(
        settings_for(fake, request_timeout_s=0.3, wait_s=1)
    ) as provider:
        url = await generate(provider, image())
        stats = provider.statistics()
    assert url.endswith("/out-0.webp")
    assert len(fake.predictions) == 1
    assert (stats["creates"], stats["reconciled"], stats["predictions"]) == (1, 1, 1)


async def test_an_unreadable_list_keeps_the_image_unsure_and_creates_nothing_more(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    fake.faults.forced_creates.extend(["500-created"])
    fake.faults.list_500 = 1.0
    for attempt in (1, 2):
        with pytest.raises(TransientProviderError, match="cannot be read"):
            await generate(provider, image(attempt=attempt))
    assert fake.create_requests == 1
    fake.faults.list_500 = 0.0
    await generate(provider, image(attempt=3))
    assert fake.create_requests == 1
    assert len(fake.predictions) == 1


async def test_reconcile_never_adopts_a_prediction_another_image_had(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    await generate(provider, image(index=0))  # same prompt, finished: must stay image 0's
    fake.faults.forced_creates.extend(["500"])
    with pytest.raises(TransientProviderError):
        await generate(provider, image(index=1))
    assert len(fake.predictions) == 1
    assert provider.statistics()["reconciled"] == 0


async def test_an_attempt_cut_during_the_create_is_reconciled_not_created_again(
    fake: FakeReplicate,
) -> None:
    fake.latency_s = 0.6
    async with open_replicate_provider(settings_for(fake, wait_s=1)) as provider:
        with trio.move_on_after(0.2):  # the create is still held open by Prefer: wait
            await provider.generate(image())
        url = await generate(provider, image(attempt=2))
        stats = provider.statistics()
    assert url.endswith("/out-0.webp")
    assert (fake.create_requests, len(fake.predictions), stats["reconciled"]) == (1, 1, 1)


async def test_an_attempt_cut_while_polling_resumes_the_same_prediction(
    fake: FakeReplicate,
) -> None:
    fake.latency_s = 1.6
    async with open_replicate_provider(settings_for(fake, wait_s=1)) as provider:
        with trio.move_on_after(1.3):  # the create answered at 1 s; polling since
            await provider.generate(image())
        url = await generate(provider, image(attempt=2))
        stats = provider.statistics()
    assert url.endswith("/out-0.webp")
    assert (fake.create_requests, len(fake.predictions), stats["resumed"]) == (1, 1, 1)


async def test_polling_survives_429_and_503(fake: FakeReplicate) -> None:
    fake.latency_s = 1.2
    fake.faults.get_429 = 0.3
    fake.faults.get_503 = 0.3
    fake.faults.retry_after_s = 0
    async with open_replicate_provider(settings_for(fake, wait_s=1)) as provider:
        url = await generate(provider, image())
    assert url.endswith("/out-0.webp")


async def test_a_failed_prediction_keeps_replicates_error(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    with pytest.raises(PermanentProviderError, match="CUDA out of memory"):
        await generate(provider, image(prompt="fail: this one"))
    assert provider.statistics()["in_flight"] == 0


async def test_empty_output_is_a_permanent_failure() -> None:
    fake = FakeReplicate(latency_s=0.01, output="empty")
    async with run_fake_replicate(fake), open_replicate_provider(settings_for(fake)) as provider:
        with pytest.raises(PermanentProviderError, match="no image"):
            await generate(provider, image())


async def test_a_rejected_token_is_a_clear_permanent_error(fake: FakeReplicate) -> None:
    async with open_replicate_provider(settings_for(fake, api_token="r8_wrong")) as provider:
        with pytest.raises(PermanentProviderError, match="rejected the API token"):
            await generate(provider, image())
    assert fake.predictions == {}


async def test_cancel_reaches_replicate(fake: FakeReplicate) -> None:
    fake.latency_s = 5
    async with open_replicate_provider(settings_for(fake, wait_s=1)) as provider:
        with trio.move_on_after(0.3):
            await provider.generate(image())
        with trio.fail_after(5):
            await provider.cancel("job-1", 0)
        stats = provider.statistics()
    (prediction_id,) = fake.predictions
    assert fake.cancel_requests == [prediction_id]
    assert fake.statuses() == ["canceled"]
    assert (stats["cancels"], stats["in_flight"]) == (1, 0)


def worker_context(provider: ReplicateProvider, capacity: int = 1) -> WorkerContext:
    return WorkerContext(
        job_id="job-1",
        prompt="a red fox",
        provider=provider,
        capacity=FairCapacity(trio.CapacityLimiter(capacity)),
        retry=RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.05),
        attempt_timeout_s=5,
        provider_cancel_s=2,
        now=fixed_now(),
        uniform=upper_jitter,
    )


async def make_image(provider: ReplicateProvider, index: int = 0) -> ImageOutcome:
    """Run one image worker on ``provider`` to its outcome."""
    reports_send, reports_recv = trio.open_memory_channel[WorkerReport](100)
    with trio.fail_after(10):
        await run_image_worker(index, context=worker_context(provider), reports_send=reports_send)
    *_, outcome = [report async for report in reports_recv]
    assert isinstance(outcome, ImageOutcome)
    return outcome


@pytest.mark.parametrize("status", [401, 404])
async def test_a_refused_poll_fails_the_image_cancels_its_prediction_and_keeps_nothing(
    fake: FakeReplicate, status: int
) -> None:
    fake.latency_s = 5  # still running when its poll is refused
    fake.faults.forced_gets.extend([status])
    async with open_replicate_provider(settings_for(fake, wait_s=1)) as provider:
        outcome = await make_image(provider)
        stats = provider.statistics()

    assert outcome.status is ImageStatus.FAILED
    assert outcome.error is not None
    assert f"({status})" in outcome.error
    (prediction_id,) = fake.predictions
    assert fake.cancel_requests == [prediction_id]
    assert fake.statuses() == ["canceled"]
    assert (stats["cancels"], stats["in_flight"], stats["tracked"]) == (1, 0, 0)


async def test_a_failed_prediction_ends_with_nothing_kept_and_nothing_to_cancel(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    outcome = await make_image(provider)  # a success first: the same state, released
    assert outcome.status is ImageStatus.COMPLETED
    assert provider.statistics()["tracked"] == 0

    with pytest.raises(PermanentProviderError, match="CUDA"):
        await generate(provider, image(index=1, prompt="fail: this one"))
    assert (provider.statistics()["in_flight"], provider.statistics()["tracked"]) == (0, 0)
    await provider.cancel("job-1", 1)  # what the worker does next: nothing left to stop
    assert fake.cancel_requests == []


async def test_an_image_given_up_after_creates_that_created_nothing_keeps_nothing(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    fake.faults.forced_creates.extend(["500"])
    with pytest.raises(NotStartedError):
        await generate(provider, image())
    assert (provider.statistics()["in_flight"], provider.statistics()["tracked"]) == (0, 1)
    with trio.fail_after(5):
        await provider.cancel("job-1", 0)
    assert (provider.statistics()["tracked"], provider.statistics()["cancels"]) == (0, 0)
    assert fake.cancel_requests == []


async def test_a_429s_pause_is_waited_out_without_capacity_or_attempts(
    fake: FakeReplicate,
) -> None:
    fake.faults.retry_after_s = 1
    fake.faults.forced_creates.extend(["429", "429"])
    async with open_replicate_provider(settings_for(fake)) as provider:
        context = worker_context(provider, capacity=2)
        reports_send, reports_recv = trio.open_memory_channel[WorkerReport](100)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                with reports_send:
                    for index in (0, 1):
                        worker = partial(
                            run_image_worker,
                            index,
                            context=context,
                            reports_send=reports_send.clone(),
                        )
                        nursery.start_soon(worker)
                while fake.create_requests < 2:  # noqa: ASYNC110 (the fake's own counter)
                    await trio.sleep(0.01)
                await trio.sleep(0.3)  # in the middle of the 1 s pause
                in_use_in_pause = context.capacity.statistics().in_use
                creates_in_pause = fake.create_requests
        stats = provider.statistics()
    outcomes = [report async for report in reports_recv if isinstance(report, ImageOutcome)]

    assert (in_use_in_pause, creates_in_pause) == (0, 2)
    assert [outcome.status for outcome in outcomes] == [ImageStatus.COMPLETED] * 2
    assert {outcome.attempts for outcome in outcomes} == {2}  # the 429, then the image
    assert (fake.create_requests, len(fake.predictions), stats["throttled"]) == (4, 2, 2)
    assert (stats["in_flight"], stats["tracked"]) == (0, 0)


async def test_unreachable_replicate_started_nothing() -> None:
    settings = ReplicateSettings(
        api_token=TOKEN, base_url="http://127.0.0.1:9", request_timeout_s=1
    )
    async with open_replicate_provider(settings) as provider:
        with pytest.raises(NotStartedError, match="cannot reach Replicate"):
            await generate(provider, image())


def signed(
    body: dict[str, Any], *, secret: str = WEBHOOK_SECRET, **kwargs: Any
) -> tuple[dict[str, str], bytes]:
    raw = json.dumps(body)
    return sign_webhook(secret, "msg_1", raw, **kwargs), raw.encode()


async def test_a_signed_webhook_completes_the_image_at_once(fake: FakeReplicate) -> None:
    fake.latency_s = 30  # only the webhook can finish it in time
    settings = settings_for(
        fake,
        wait_s=1,
        webhook_url="https://hooks.example/replicate",
        webhook_secret=WEBHOOK_SECRET,
        webhook_poll_interval_s=60,
    )
    async with open_replicate_provider(settings) as provider, trio.open_nursery() as nursery:
        urls: list[str] = []

        async def wait_for_image() -> None:
            urls.append(await generate(provider, image()))

        nursery.start_soon(wait_for_image)
        with trio.fail_after(5):
            await fake.wait_for_predictions(1)
        (prediction_id,) = fake.predictions
        assert fake.predictions[prediction_id].webhook == "https://hooks.example/replicate"
        done = {"id": prediction_id, "status": "succeeded", "output": ["https://x.test/a.png"]}
        provider.receive_webhook(*signed(done))
    assert urls == ["https://x.test/a.png"]


@pytest.mark.parametrize(
    "tamper",
    ["body", "secret", "stale", "garbage-signature", "no-headers", "not-json"],
)
async def test_bad_webhooks_are_rejected_and_change_nothing(
    fake: FakeReplicate, tamper: str
) -> None:
    settings = settings_for(
        fake, webhook_url="https://hooks.example/r", webhook_secret=WEBHOOK_SECRET
    )
    body = {"id": "fake0000000000000000000001", "status": "succeeded", "output": ["u"]}
    headers, raw = signed(body)
    if tamper == "body":
        raw = raw.replace(b"succeeded", b"failed")
    elif tamper == "secret":
        headers, raw = signed(body, secret="whsec_" + "QUJD" * 8)
    elif tamper == "stale":
        headers, raw = signed(body, timestamp=1_000_000)
    elif tamper == "garbage-signature":
        headers["webhook-signature"] = "v1,@@@not-base64@@@"
    elif tamper == "no-headers":
        headers = {}
    elif tamper == "not-json":
        headers, _ = signed(body)
        raw = b"\xff\xfe"
    async with open_replicate_provider(settings) as provider:
        with pytest.raises(WebhookRejected):
            provider.receive_webhook(headers, raw)
        assert provider.statistics()["webhooks_received"] == 0


@pytest.mark.parametrize(
    ("ref", "path", "version"),
    [
        (
            "black-forest-labs/flux-schnell",
            "/v1/models/black-forest-labs/flux-schnell/predictions",
            None,
        ),
        (f"stability-ai/sdxl:{VERSION}", "/v1/predictions", VERSION),
        (VERSION, "/v1/predictions", VERSION),
    ],
)
def test_model_refs_pick_their_endpoint(ref: str, path: str, version: str | None) -> None:
    model = ModelRef.parse(ref)
    assert model.create_path == path
    assert model.version == version
    assert str(model) == ref


@pytest.mark.parametrize("ref", ["", "flux", "a/b/c", "owner/name:latest", "owner/name:", "a b/c"])
def test_malformed_model_refs_are_refused(ref: str) -> None:
    with pytest.raises(SettingsProblem, match="REPLICATE_MODEL"):
        ModelRef.parse(ref)
