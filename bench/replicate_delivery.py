"""Replicate provider under faults: completion, duplicates, creates per image, delivery latency.

Runs, in one Trio process on real loopback sockets, the fake Replicate server from
``tests/fake_replicate.py`` and the whole service pointed at it, then submits jobs over HTTP and
follows each over SSE. Delivery latency is the time from the moment the fake finished a
prediction to the moment the SSE subscriber received that image's event.

    .venv/bin/python -m bench.replicate_delivery --jobs 5 --images 10 --latency 2 \\
        --create-500 0.3 --create-429 0.1 --json bench/results/replicate.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from actors.files import ImageFilesSettings
from actors.providers.replicate import ReplicateSettings
from actors.retry import RetryPolicy
from tests.e2e.ports import free_port
from tests.fake_replicate import TOKEN, WEBHOOK_SECRET, FakeReplicate, run_fake_replicate
from web.serve import run_server
from web.settings import Settings, StoreSettings

SECRET = "bench-secret-0123456789-0123456789-0123456789"  # noqa: S105 (a local run's)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def follow(
    client: httpx.AsyncClient, job_id: str, arrivals: list[tuple[float, dict[str, Any]]]
) -> dict[str, Any]:
    done: dict[str, Any] = {}
    async with client.stream("GET", f"/api/generate/{job_id}/stream") as stream:
        event = ""
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "progress":
                    arrivals.append((trio.current_time(), data))
                else:
                    done = data
    return done


def faulty_fake(  # noqa: PLR0917 (keywords in practice)
    latency_s: float,
    seed: int,
    create_500: float,
    create_429: float,
    retry_after_s: int,
    create_500_creates: float | None = None,
) -> FakeReplicate:
    """A fake Replicate whose creates answer 500 (``create_500_creates`` of those after
    creating the prediction; the fake's default unless given) and 429 at these rates."""
    fake = FakeReplicate(latency_s=latency_s, seed=seed)
    fake.faults.create_500 = create_500
    fake.faults.create_429 = create_429
    fake.faults.retry_after_s = retry_after_s
    if create_500_creates is not None:
        fake.faults.create_500_creates = create_500_creates
    return fake


async def run(args: argparse.Namespace) -> dict[str, Any]:
    fake = faulty_fake(args.latency, args.seed, args.create_500, args.create_429, args.retry_after)
    work_dir = tempfile.mkdtemp(prefix="bench-replicate-")
    async with run_fake_replicate(fake) as fake_url, trio.open_nursery() as nursery:
        base = Settings()
        settings = attrs.evolve(
            base,
            auth_secret=SECRET,
            max_images=max(base.max_images, args.images),
            supervisor=attrs.evolve(
                base.supervisor,
                capacity=args.capacity,
                retry=RetryPolicy(attempts=args.attempts, base_delay_s=0.2, max_delay_s=2.0),
                max_active_jobs_per_user=args.jobs,
            ),
            replicate=ReplicateSettings(api_token=TOKEN, base_url=fake_url),
            store=StoreSettings(database_path=Path(work_dir) / "imagegen.sqlite3"),
            files=ImageFilesSettings(directory=Path(work_dir) / "images"),
        )
        bind = f"127.0.0.1:{free_port()}"
        if args.webhooks:
            assert settings.replicate is not None
            settings = attrs.evolve(
                settings,
                replicate=attrs.evolve(
                    settings.replicate,
                    webhook_url=f"http://{bind}/api/webhooks/replicate",
                    webhook_secret=WEBHOOK_SECRET,
                ),
            )
        shutdown = trio.Event()
        binds = await nursery.start(
            lambda task_status: run_server(
                settings,
                bind=bind,
                shutdown=shutdown,
                handle_signals=False,
                task_status=task_status,
            )
        )
        arrivals: list[tuple[float, dict[str, Any]]] = []
        dones: list[dict[str, Any]] = []
        async with httpx.AsyncClient(
            base_url=binds[0], timeout=httpx.Timeout(30, read=None)
        ) as client:
            login = await client.post(
                "/api/auth/login", json={"email": "test@example.com", "password": "password123"}
            )
            client.headers["Authorization"] = f"Bearer {login.json()['access_token']}"
            t0 = trio.current_time()
            job_ids = []
            for number in range(args.jobs):
                created = await client.post(
                    "/api/generate",
                    json={"prompt": f"bench prompt number {number}", "num_images": args.images},
                )
                created.raise_for_status()
                job_ids.append(created.json()["job_id"])

            async def follow_into(job_id: str) -> None:
                dones.append(await follow(client, job_id, arrivals))

            async with trio.open_nursery() as followers:
                for job_id in job_ids:
                    followers.start_soon(follow_into, job_id)
            elapsed = trio.current_time() - t0
            status = (await client.get("/api/status")).json()
        shutdown.set()
    return summarize(args, fake, arrivals, dones, status, elapsed)


def summarize(  # noqa: PLR0917 (one call site)
    args: argparse.Namespace,
    fake: FakeReplicate,
    arrivals: list[tuple[float, dict[str, Any]]],
    dones: list[dict[str, Any]],
    status: dict[str, Any],
    elapsed: float,
) -> dict[str, Any]:
    delivery_ms = []
    for arrived, data in arrivals:
        if data["status"] != "completed":
            continue
        prediction_id = data["url"].split("/files/")[1].split("/")[0]
        delivery_ms.append((arrived - fake.predictions[prediction_id].done_at) * 1000)
    images = args.jobs * args.images
    completed = sum(done.get("completed_count", 0) for done in dones)
    provider = status["provider"]
    predictions = len(fake.predictions)
    return {
        "images_requested": images,
        "images_completed": completed,
        "completed_pct": round(100 * completed / images, 2),
        "fake_predictions": predictions,
        "duplicate_predictions": predictions - completed,
        "create_requests": fake.create_requests,
        "creates_per_image": round(fake.create_requests / images, 3),
        "provider": provider,
        "delivery_ms": {
            "count": len(delivery_ms),
            "p50": round(percentile(delivery_ms, 0.50), 2),
            "p95": round(percentile(delivery_ms, 0.95), 2),
            "p99": round(percentile(delivery_ms, 0.99), 2),
            "max": round(max(delivery_ms), 2),
            "mean": round(statistics.fmean(delivery_ms), 2),
        },
        "elapsed_s": round(elapsed, 2),
        "settings": vars(args) | {"json": None},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--latency", type=float, default=2.0, help="seconds per prediction")
    parser.add_argument("--create-500", type=float, default=0.3)
    parser.add_argument("--create-429", type=float, default=0.1)
    parser.add_argument("--retry-after", type=int, default=1)
    parser.add_argument("--capacity", type=int, default=10)
    parser.add_argument("--attempts", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--webhooks", action="store_true", help="completed webhooks, not polls")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    result = trio.run(run, args)
    delivery = result["delivery_ms"]
    rows = [
        (
            "images completed",
            f"{result['images_completed']}/{result['images_requested']} "
            f"({result['completed_pct']} %)",
        ),
        ("predictions at the fake", result["fake_predictions"]),
        ("duplicate predictions", result["duplicate_predictions"]),
        ("create requests", result["create_requests"]),
        ("creates per image", result["creates_per_image"]),
        ("429s seen (throttled)", result["provider"]["throttled"]),
        ("unsure creates reconciled", result["provider"]["reconciled"]),
        ("webhooks received", result["provider"]["webhooks_received"]),
        (
            "delivery p50 / p95 / p99 / max (ms)",
            f"{delivery['p50']} / {delivery['p95']} / {delivery['p99']} / {delivery['max']}",
        ),
        ("wall time (s)", result["elapsed_s"]),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        sys.stdout.write(f"{name:<{width}}  {value}\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
