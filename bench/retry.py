"""Retry: do transient provider faults lose images?

Two providers, each behind the whole service in a process of its own, with jobs created at once
and followed over SSE to ``done``:

``--provider replicate``: the real service (``python -m web``) at its **default settings** (no
``RETRY_ATTEMPTS`` or backoff override) pointed at the fake Replicate server of
``tests/fake_replicate.py``, which answers ``--create-500`` of the creates with a 500 that
created nothing and ``--create-429`` with a 429 (``Retry-After: --retry-after``). ``--runs``
consecutive runs, each with a fresh service and a fresh fake, of ``--jobs`` jobs of
``--images`` images. Pass: every image of every run completed, and the fake holds exactly one
prediction per image (no duplicate). A 429 or a create that created nothing uses none of an
image's attempts (``NotStartedError``), so no image is lost to them at the defaults.

``--provider local`` (the default): the service with the bench provider failing each attempt
at random, ``--fail`` with a transient error (an attempt that counts) and ``--limit`` with a
rate limit (a not-started failure carrying a ``--retry-after-ms`` hint, which does not count);
once with ``--attempts`` (``RETRY_ATTEMPTS``) and once with the default of 3, at which a 30 %
rate of failures that count loses about 0.3^3 = 2.7 % of the images.

    .venv/bin/python -m bench.retry --provider replicate --runs 20 \\
        --json bench/results/retry-replicate.json
    .venv/bin/python -m bench.retry --json bench/results/retry.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from bench import common
from bench.provider import prompt
from bench.replicate_delivery import faulty_fake
from tests.fake_replicate import TOKEN, run_fake_replicate


async def follow_to_done(port: int, token: str, job_ids: list[str]) -> list[dict[str, Any]]:
    """Each job's ``done`` payload, following every job over SSE at once."""
    dones: list[dict[str, Any]] = []

    def ready() -> None:
        pass

    async def follow(job_id: str) -> None:
        target = f"/api/generate/{job_id}/stream"
        reads = await common.record_sse(port, target, token, on_ready=ready)
        dones.append(common.parse_sse(reads)[-1].data)

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            for job_id in job_ids:
                nursery.start_soon(follow, job_id)
    return dones


async def image_figures(
    client: common.HttpClient, job_ids: list[str]
) -> tuple[Counter[int], Counter[str], dict[str, int]]:
    """Provider calls per image (a histogram), failed images' errors, completed images per job."""
    calls: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    completed: dict[str, int] = {}
    for job_id in job_ids:
        _, view = await client.json("GET", f"/api/generate/{job_id}")
        completed[job_id] = 0
        for image in view["results"]:
            calls[image["attempts"]] += 1
            completed[job_id] += image["status"] == "completed"
            if image["error"]:
                errors[image["error"]] += 1
    return calls, errors, completed


# --- the Replicate provider, at the default settings -----------------------------------------


async def replicate_run(args: argparse.Namespace, work_dir: Path, run: int) -> dict[str, Any]:
    fake = faulty_fake(
        args.latency,
        args.seed + run,
        args.create_500,
        args.create_429,
        args.retry_after,
        create_500_creates=args.create_500_creates,
    )
    run_dir = work_dir / f"run-{run}"
    run_dir.mkdir()
    async with run_fake_replicate(fake) as fake_url:
        env = common.service_env(REPLICATE_API_TOKEN=TOKEN, REPLICATE_BASE_URL=fake_url)
        async with (
            common.spawn_server(
                "web", run_dir, env=env, command=[sys.executable, "-m", "web"]
            ) as server,
            await common.HttpClient.connect(server.port) as client,
        ):
            token = await client.login()
            t0 = trio.current_time()
            prompts = {}
            for number in range(args.jobs):
                job_prompt = f"retry run {run} job {number}"
                prompts[await client.create(job_prompt, args.images)] = job_prompt
            job_ids = list(prompts)
            await follow_to_done(server.port, token, job_ids)
            elapsed = trio.current_time() - t0
            calls, errors, completed = await image_figures(client, job_ids)
            _, status = await client.json("GET", "/api/status")
    per_prompt = fake.predictions_per_prompt()
    # Every completed image has a prediction; more predictions for a job's prompt than
    # completed images means some image had two.
    duplicates = sum(
        max(0, per_prompt.get(job_prompt, 0) - completed[job_id])
        for job_id, job_prompt in prompts.items()
    )
    provider = status.get("provider") or {}
    return {
        "run": run,
        "images": args.jobs * args.images,
        "images_completed": sum(completed.values()),
        "fake_predictions": len(fake.predictions),
        "duplicate_predictions": duplicates,
        "create_requests": fake.create_requests,
        "calls_histogram": dict(sorted(calls.items())),
        "errors": dict(errors),
        "throttled": provider.get("throttled"),
        "reconciled": provider.get("reconciled"),
        "elapsed_s": round(elapsed, 2),
    }


async def run_replicate(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    runs = []
    for run in range(1, args.runs + 1):
        figures = await replicate_run(args, work_dir, run)
        runs.append(figures)
        sys.stderr.write(
            f"run {run}: {figures['images_completed']}/{figures['images']} images, "
            f"{figures['duplicate_predictions']} duplicates, {figures['elapsed_s']} s\n"
        )
    calls: Counter[int] = Counter()
    for figures in runs:
        calls.update({int(n): count for n, count in figures["calls_histogram"].items()})
    images = sum(figures["images"] for figures in runs)
    return {
        "runs": runs,
        "images": images,
        "images_completed": sum(figures["images_completed"] for figures in runs),
        "completed_per_run": [figures["images_completed"] for figures in runs],
        "duplicate_predictions": sum(figures["duplicate_predictions"] for figures in runs),
        "fake_predictions": sum(figures["fake_predictions"] for figures in runs),
        "create_requests": sum(figures["create_requests"] for figures in runs),
        "creates_per_image": round(sum(figures["create_requests"] for figures in runs) / images, 3),
        "calls_histogram": dict(sorted(calls.items())),
        "max_calls_per_image": max(calls),
        "throttled": sum(figures["throttled"] or 0 for figures in runs),
        "elapsed_s_per_run": common.summarize([figures["elapsed_s"] for figures in runs]),
    }


def print_replicate(result: dict[str, Any]) -> None:
    runs = result["runs"]
    rows: list[list[object]] = [
        [
            "images completed",
            "all",
            f"{result['images_completed']}/{result['images']} in {len(runs)} runs",
        ],
        ["completed per run", "", " ".join(map(str, result["completed_per_run"]))],
        ["predictions at the fake", "", result["fake_predictions"]],
        ["duplicate predictions", "0", result["duplicate_predictions"]],
        [
            "create requests (per image)",
            "",
            f"{result['create_requests']} ({result['creates_per_image']})",
        ],
        ["429s seen (throttled)", "", result["throttled"]],
        ["provider calls per image", "", result["calls_histogram"]],
        [
            "wall time per run (s), p50 / max",
            "",
            f"{result['elapsed_s_per_run']['p50']} / {result['elapsed_s_per_run']['max']}",
        ],
    ]
    common.print_table(["figure", "target", "ours"], rows)


# --- the local bench provider ----------------------------------------------------------------


async def one_setting(args: argparse.Namespace, work_dir: Path, attempts: int) -> dict[str, Any]:
    env = common.service_env(
        RETRY_ATTEMPTS=attempts,
        RETRY_BASE_DELAY_MS=args.base_delay_ms,
        RETRY_MAX_DELAY_MS=args.max_delay_ms,
    )
    job_prompt = prompt(
        latency_ms=args.latency_ms,
        fail=args.fail,
        limit=args.limit,
        retry_after_ms=args.retry_after_ms,
    )
    async with (
        common.spawn_server(
            "ours", work_dir, env=env, capacity=args.capacity, seed=args.seed
        ) as server,
        await common.HttpClient.connect(server.port) as client,
    ):
        token = await client.login()
        t0 = trio.current_time()
        job_ids = [await client.create(job_prompt, args.images) for _ in range(args.jobs)]
        dones = await follow_to_done(server.port, token, job_ids)
        elapsed = trio.current_time() - t0
        attempts_per_image, errors, _ = await image_figures(client, job_ids)
        _, status = await client.json("GET", "/api/status")
    images = args.jobs * args.images
    completed = sum(done["completed_count"] for done in dones)
    total_attempts = sum(n * count for n, count in attempts_per_image.items())
    return {
        "retry_attempts": attempts,
        "images": images,
        "images_completed": completed,
        "completed_pct": round(100 * completed / images, 2),
        "attempts": total_attempts,
        "attempts_per_image": round(total_attempts / images, 2),
        "attempts_histogram": dict(sorted(attempts_per_image.items())),
        "provider": status.get("provider"),
        "errors": dict(errors),
        "elapsed_s": round(elapsed, 2),
    }


async def run_local(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    return {
        "configured": await one_setting(args, work_dir, args.attempts),
        "default": await one_setting(args, work_dir, 3),
    }


def print_local(result: dict[str, Any]) -> None:
    rows: list[list[object]] = []
    for key in ("configured", "default"):
        figures = result[key]
        label = f"RETRY_ATTEMPTS={figures['retry_attempts']}"
        provider = figures["provider"] or {}
        rows += [
            [
                f"{label}: images completed",
                "all" if key == "configured" else "",
                f"{figures['images_completed']}/{figures['images']} ({figures['completed_pct']} %)",
            ],
            [f"{label}: attempts per image", "", figures["attempts_per_image"]],
            [f"{label}: attempts histogram", "", figures["attempts_histogram"]],
            [
                f"{label}: transient / rate-limited attempts",
                "",
                f"{provider.get('transient')} / {provider.get('rate_limited')}",
            ],
            [f"{label}: wall time (s)", "", figures["elapsed_s"]],
        ]
    common.print_table(["figure", "target", "ours"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", choices=["local", "replicate"], default="local")
    parser.add_argument("--jobs", type=int, help="jobs per run (local: 20, replicate: 5)")
    parser.add_argument("--images", type=int, default=10, help="images per job")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    local = parser.add_argument_group("--provider local")
    local.add_argument("--latency-ms", type=float, default=100)
    local.add_argument("--fail", type=float, default=0.3, help="transient failures")
    local.add_argument("--limit", type=float, default=0.1, help="rate limits")
    local.add_argument("--retry-after-ms", type=float, default=500)
    local.add_argument("--attempts", type=int, default=8, help="RETRY_ATTEMPTS")
    local.add_argument("--base-delay-ms", type=float, default=200, help="RETRY_BASE_DELAY_MS")
    local.add_argument("--max-delay-ms", type=float, default=2000, help="RETRY_MAX_DELAY_MS")
    local.add_argument("--capacity", type=int, default=10, help="MAX_CONCURRENCY")
    replicate = parser.add_argument_group("--provider replicate (the service's defaults)")
    replicate.add_argument("--runs", type=int, default=20)
    replicate.add_argument("--latency", type=float, default=1.0, help="seconds per prediction")
    replicate.add_argument("--create-500", type=float, default=0.3)
    replicate.add_argument(
        "--create-500-creates", type=float, default=0.0, help="500s that created anyway"
    )
    replicate.add_argument("--create-429", type=float, default=0.1)
    replicate.add_argument("--retry-after", type=int, default=1, help="Retry-After of the 429s")
    args = parser.parse_args()
    if args.jobs is None:
        args.jobs = 5 if args.provider == "replicate" else 20
    with tempfile.TemporaryDirectory(prefix="bench-retry-") as work:
        if args.provider == "replicate":
            result = trio.run(run_replicate, args, Path(work))
            print_replicate(result)
        else:
            result = trio.run(run_local, args, Path(work))
            print_local(result)
    result["settings"] = vars(args) | {"json": None}
    result["machine"] = common.machine()
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
