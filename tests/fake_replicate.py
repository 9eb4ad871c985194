"""A fake of Replicate's predictions API: a real HTTP server on 127.0.0.1, scriptable faults.

Shaped after Replicate's HTTP API (https://replicate.com/docs/reference/http): the create
endpoints (201, ``Prefer: wait=N`` held up to N s, ``Preference-Applied``), get, cancel, list
(newest first), Bearer auth with a problem+json 401, 429 with ``Retry-After`` and a
``retry_after`` body, 5xx (optionally after creating the prediction), failed predictions with
an error text, string or list output, and signed ``completed`` webhooks (Standard Webhooks).
Faults come from a seeded random source or from a queue of forced answers, so tests are
repeatable.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any

import attrs
import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

TOKEN = "r8_fake_token"
#: The User-Agent of the service's downloads of outputs (actors/files.py).
SERVICE_AGENT = "imagegen-trio"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"fake-replicate-webhook-signing-key").decode()
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGP4z8DwHwAFAAH/iZk9HQAAAABJRU5ErkJggg=="
)


@attrs.define
class Faults:
    """What the fake does wrong, and how often (probabilities from a seeded random source).

    ``forced_creates`` holds answers for the next creates, in order, before any random fault:
    ``"429"``, ``"500"`` (nothing created), ``"500-created"`` (created, then answered 500),
    ``"hang-created"`` (created, then no answer for an hour: the client times out) or ``"ok"``.
    ``forced_gets`` holds status codes the next gets of a prediction answer with instead (a
    problem+json body), before any random fault: ``401``, ``404``, ...
    """

    create_500: float = 0.0
    create_500_creates: float = 0.5
    create_429: float = 0.0
    get_429: float = 0.0
    get_503: float = 0.0
    list_500: float = 0.0
    fail: float = 0.0
    retry_after_s: int = 1
    forced_creates: deque[str] = attrs.Factory(deque)
    forced_gets: deque[int] = attrs.Factory(deque)
    failure_text: str = "CUDA out of memory"


@attrs.define(eq=False)
class Prediction:
    id: str
    model: str
    version: str
    input: dict[str, Any]
    created: float
    done_at: float
    created_at: str
    webhook: str | None
    status: str = "starting"
    output: Any = None
    error: str | None = None
    completed_at: str | None = None
    webhook_sent: bool = False


class FakeReplicate:
    """The fake's state and knobs; ``app`` serves it.

    Args:
        latency_s: How long a prediction runs.
        output: ``"list"`` (``["…/out-0.webp"]``), ``"string"``, ``"empty"`` or ``"many"``.
        seed: Seed of the random faults.
    """

    def __init__(self, *, latency_s: float = 0.2, output: str = "list", seed: int = 7) -> None:
        self.latency_s = latency_s
        self.output = output
        self.faults = Faults()
        self.rng = random.Random(seed)
        self.predictions: dict[str, Prediction] = {}
        self.create_requests = 0
        self.get_requests = 0
        self.list_requests = 0
        self.cancel_requests: list[str] = []
        self.webhooks_sent = 0
        self.webhook_secret = WEBHOOK_SECRET
        self.base_url = ""
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._client: httpx.AsyncClient | None = None  # one pool for every webhook
        self._created = trio.Event()
        #: While set, the service's downloads of outputs (its copies) wait for its release.
        self._copies_held: trio.Event | None = None
        #: Output downloads answered, by who asked: "service" (its copies) or "other".
        self.file_requests: dict[str, int] = {"service": 0, "other": 0}
        self.app = self._make_app()

    # --- what tests read ----------------------------------------------------------------

    def predictions_per_prompt(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for prediction in self.predictions.values():
            prompt = str(prediction.input.get("prompt"))
            counts[prompt] = counts.get(prompt, 0) + 1
        return counts

    async def wait_for_predictions(self, count: int) -> None:
        """Until at least ``count`` predictions exist."""
        while len(self.predictions) < count:
            await self._created.wait()

    def hold_copies(self) -> None:
        """Hold the service's downloads of outputs (anyone else's are answered) until
        :meth:`release_copies`."""
        if self._copies_held is None:
            self._copies_held = trio.Event()

    def release_copies(self) -> None:
        if self._copies_held is not None:
            self._copies_held.set()
            self._copies_held = None

    def max_in_flight(self) -> int:
        """The most predictions that were running at once (from create to done), ever."""
        edges = sorted(
            edge
            for prediction in self.predictions.values()
            for edge in ((prediction.created, 1), (prediction.done_at, -1))
        )  # at equal times an end (-1) comes before a start: back to back is not at once
        running = peak = 0
        for _, step in edges:
            running += step
            peak = max(peak, running)
        return peak

    def statuses(self) -> list[str]:
        return [self._refresh(p).status for p in self.predictions.values()]

    # --- lifecycle ----------------------------------------------------------------------

    def _refresh(self, prediction: Prediction) -> Prediction:
        now = trio.current_time()
        if prediction.status in ("starting", "processing") and now >= prediction.done_at:
            self._complete(prediction)
        elif prediction.status == "starting" and now >= prediction.created + 0.01:
            prediction.status = "processing"
        return prediction

    def _complete(self, prediction: Prediction) -> None:
        prediction.completed_at = _stamp()
        if (
            prediction.input.get("prompt", "").startswith("fail:")
            or self.rng.random() < self.faults.fail
        ):
            prediction.status = "failed"
            prediction.error = self.faults.failure_text
            return
        prediction.status = "succeeded"
        url = f"{self.base_url}/files/{prediction.id}/out-0.webp"
        prediction.output = {
            "list": [url],
            "string": url,
            "empty": [],
            "many": [url, url.replace("out-0", "out-1")],
        }[self.output]

    async def _run_prediction(self, prediction: Prediction) -> None:
        await trio.sleep_until(prediction.done_at)
        self._refresh(prediction)
        if prediction.webhook and prediction.status in ("succeeded", "failed"):
            await self._send_webhook(prediction)

    async def _send_webhook(self, prediction: Prediction) -> None:
        body = json.dumps(self._json(prediction))
        headers = sign_webhook(self.webhook_secret, f"msg_{prediction.id}", body)
        headers["Content-Type"] = "application/json"
        assert prediction.webhook is not None
        assert self._client is not None
        for _ in range(3):  # Replicate retries only the terminal webhook
            try:
                response = await self._client.post(
                    prediction.webhook, content=body, headers=headers
                )
            except httpx.TransportError:
                await trio.sleep(0.1)
                continue
            if response.is_success:
                break
        self.webhooks_sent += 1
        prediction.webhook_sent = True

    def _json(self, prediction: Prediction) -> dict[str, Any]:
        base = self.base_url
        return {
            "id": prediction.id,
            "model": prediction.model,
            "version": prediction.version,
            "input": prediction.input,
            "logs": "",
            "output": prediction.output,
            "data_removed": False,
            "error": prediction.error,
            "status": prediction.status,
            "created_at": prediction.created_at,
            "started_at": prediction.created_at,
            "completed_at": prediction.completed_at,
            "urls": {
                "get": f"{base}/v1/predictions/{prediction.id}",
                "cancel": f"{base}/v1/predictions/{prediction.id}/cancel",
                "web": f"https://replicate.com/p/{prediction.id}",
            },
            "metrics": {"predict_time": self.latency_s} if prediction.completed_at else {},
        }

    # --- the HTTP API -------------------------------------------------------------------

    def _make_app(self) -> QuartTrio:  # noqa: PLR0915 (one closure per route)
        app = QuartTrio(__name__)

        def problem(status: int, detail: str, **extra: object) -> Response:
            body = {"detail": detail, "status": status, **extra}
            return Response(json.dumps(body), status, {"Content-Type": "application/problem+json"})

        def throttled() -> Response:
            seconds = self.faults.retry_after_s
            response = problem(
                429,
                f"Request was throttled. Your rate limit resets in ~{seconds}s.",
                retry_after=seconds,
            )
            response.headers["Retry-After"] = str(seconds)
            return response

        @app.before_request
        async def authenticate() -> Response | None:
            if request.path.startswith(("/files/", "/_fake/")):  # public, and test hooks
                return None
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                return problem(
                    401, "You did not pass a valid authentication token", title="Unauthenticated"
                )
            return None

        async def create(model: str, version: str) -> Response:
            self.create_requests += 1
            body = await request.get_json()
            forced = self.faults.forced_creates.popleft() if self.faults.forced_creates else None
            rng = self.rng
            if forced == "429" or (forced is None and rng.random() < self.faults.create_429):
                return throttled()
            fail_500 = forced in ("500", "500-created") or (
                forced is None and rng.random() < self.faults.create_500
            )
            creates = forced in ("500-created", "hang-created") or (
                forced is None and rng.random() < self.faults.create_500_creates
            )
            if fail_500 and not creates:
                return problem(500, "Internal Server Error")
            prediction = self._new(model, version, body)
            if fail_500:
                return problem(500, "Internal Server Error")
            if forced == "hang-created":
                await trio.sleep(3600)
            prefer = request.headers.get("Prefer", "")
            headers = {"Content-Type": "application/json"}
            if prefer.startswith("wait"):
                _, _, seconds = prefer.partition("=")
                wait = min(int(seconds or 60), 60)
                with trio.move_on_after(wait):
                    await trio.sleep_until(prediction.done_at)
                headers["Preference-Applied"] = prefer
            self._refresh(prediction)
            return Response(json.dumps(self._json(prediction)), 201, headers)

        @app.post("/v1/models/<owner>/<name>/predictions")
        async def create_for_model(owner: str, name: str) -> Response:
            return await create(f"{owner}/{name}", "dp-" + "0" * 32)

        @app.post("/v1/predictions")
        async def create_for_version() -> Response:
            body = await request.get_json()
            return await create("acme/model", str(body.get("version")))

        @app.get("/v1/predictions/<prediction_id>")
        async def get(prediction_id: str) -> Response:
            self.get_requests += 1
            if self.faults.forced_gets:
                return problem(self.faults.forced_gets.popleft(), "Forced answer")
            if self.rng.random() < self.faults.get_429:
                return throttled()
            if self.rng.random() < self.faults.get_503:
                return problem(503, "Service Unavailable")
            prediction = self.predictions.get(prediction_id)
            if prediction is None:
                return problem(404, "Not found")
            return Response(
                json.dumps(self._json(self._refresh(prediction))),
                200,
                {"Content-Type": "application/json"},
            )

        @app.post("/v1/predictions/<prediction_id>/cancel")
        async def cancel(prediction_id: str) -> Response:
            self.cancel_requests.append(prediction_id)
            prediction = self.predictions.get(prediction_id)
            if prediction is None:
                return problem(404, "Not found")
            self._refresh(prediction)
            if prediction.status not in ("succeeded", "failed", "canceled"):
                prediction.status = "canceled"
                prediction.completed_at = _stamp()
            return Response(
                json.dumps(self._json(prediction)), 200, {"Content-Type": "application/json"}
            )

        @app.get("/v1/predictions")
        async def list_predictions() -> Response:
            self.list_requests += 1
            if self.rng.random() < self.faults.list_500:
                return problem(500, "Internal Server Error")
            newest = sorted(self.predictions.values(), key=lambda p: p.created, reverse=True)
            page = [self._json(self._refresh(p)) for p in newest[:100]]
            body = {"next": None, "previous": None, "results": page}
            return Response(json.dumps(body), 200, {"Content-Type": "application/json"})

        @app.get("/files/<prediction_id>/<name>")
        async def files(prediction_id: str, name: str) -> Response:
            service = request.headers.get("User-Agent", "").startswith(SERVICE_AGENT)
            if service and self._copies_held is not None:
                await self._copies_held.wait()
            if prediction_id not in self.predictions:
                return problem(404, "Not found")
            self.file_requests["service" if service else "other"] += 1
            return Response(PNG, 200, {"Content-Type": "image/webp"})

        # Test hooks (not Replicate's): hold and release the service's copies of outputs.
        @app.post("/_fake/copies/hold")
        async def hold() -> Response:
            self.hold_copies()
            return Response("", 204)

        @app.post("/_fake/copies/release")
        async def release() -> Response:
            self.release_copies()
            return Response("", 204)

        return app

    def _new(self, model: str, version: str, body: dict[str, Any]) -> Prediction:
        now = trio.current_time()
        prediction = Prediction(
            id=f"fake{next(self._ids):022d}",
            model=model,
            version=version,
            input=dict(body.get("input") or {}),
            created=now,
            done_at=now + self.latency_s,
            created_at=_stamp(),
            webhook=body.get("webhook"),
        )
        self.predictions[prediction.id] = prediction
        self._created.set()
        self._created = trio.Event()
        assert self._nursery is not None
        self._nursery.start_soon(self._run_prediction, prediction)
        return prediction


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def sign_webhook(
    secret: str, webhook_id: str, body: str, timestamp: int | None = None
) -> dict[str, str]:
    """Standard Webhooks headers for ``body``, as Replicate sends them."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{webhook_id}.{stamp}.{body}".encode(), hashlib.sha256).digest()
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": stamp,
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }


@asynccontextmanager
async def run_fake_replicate(fake: FakeReplicate) -> AsyncIterator[str]:
    """Serve ``fake`` on 127.0.0.1 (a free port) for the body of the block; yields its URL."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    shutdown = trio.Event()
    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        fake._client = client
        fake._nursery = nursery
        binds = await nursery.start(
            partial(serve, fake.app, config, shutdown_trigger=shutdown.wait)
        )
        fake.base_url = binds[0]
        try:
            yield binds[0]
        finally:
            shutdown.set()
            nursery.cancel_scope.cancel()


async def _serve_forever(fake: FakeReplicate, port: int) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
        fake._client = client
        fake._nursery = nursery
        fake.base_url = f"http://127.0.0.1:{port}"
        await serve(fake.app, config)


def main() -> None:
    """``python -m tests.fake_replicate --port 9000 --latency 2 --create-500 0.3``: a demo server.

    Point the service at it with ``REPLICATE_API_TOKEN=r8_fake_token`` and
    ``REPLICATE_BASE_URL=http://127.0.0.1:9000``.
    """
    import argparse  # noqa: PLC0415 (command line only)

    parser = argparse.ArgumentParser(description="A fake Replicate predictions API")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--latency", type=float, default=2.0)
    parser.add_argument("--create-500", type=float, default=0.0)
    parser.add_argument("--create-429", type=float, default=0.0)
    args = parser.parse_args()
    fake = FakeReplicate(latency_s=args.latency)
    fake.faults.create_500 = args.create_500
    fake.faults.create_429 = args.create_429
    trio.run(_serve_forever, fake, args.port)


if __name__ == "__main__":
    main()
