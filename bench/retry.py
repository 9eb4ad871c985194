"""Retry: 30 % transient provider failures and 10 % rate limits; does every image complete?

Our service (a subprocess) with the bench provider failing each attempt at random: with
probability ``--fail`` a transient error, with ``--limit`` a rate limit (a transient error
carrying a retry-after hint of ``--retry-after-ms``). ``--jobs`` jobs of ``--images`` images
are created at once and followed over SSE to ``done``; the answer is whether every image
completed, with how many attempts, and how long it took. It runs twice: with
``--attempts`` (``RETRY_ATTEMPTS``, default 8) and with the service's default of 3, which at a
40 % failure rate per attempt loses about 0.4^3 = 6.4 % of the images (the Replicate path under
the same faults: ``python -m bench.replicate_delivery``). There is no yardstick here: it has no
retries, and this is about correctness, not speed.

    .venv/bin/python -m bench.retry --json bench/results/retry.json
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from bench import common
from bench.provider import prompt


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
        dones: list[dict[str, Any]] = []

        async def follow(job_id: str) -> None:
            def ready() -> None:
                pass

            target = f"/api/generate/{job_id}/stream"
            reads = await common.record_sse(server.port, target, token, on_ready=ready)
            dones.append(common.parse_sse(reads)[-1].data)

        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                for job_id in job_ids:
                    nursery.start_soon(follow, job_id)
        elapsed = trio.current_time() - t0
        attempts_per_image: Counter[int] = Counter()
        errors: Counter[str] = Counter()
        for job_id in job_ids:
            _, view = await client.json("GET", f"/api/generate/{job_id}")
            for image in view["results"]:
                attempts_per_image[image["attempts"]] += 1
                if image["error"]:
                    errors[image["error"]] += 1
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


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    return {
        "configured": await one_setting(args, work_dir, args.attempts),
        "default": await one_setting(args, work_dir, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--latency-ms", type=float, default=100)
    parser.add_argument("--fail", type=float, default=0.3, help="transient failures")
    parser.add_argument("--limit", type=float, default=0.1, help="rate limits")
    parser.add_argument("--retry-after-ms", type=float, default=500)
    parser.add_argument("--attempts", type=int, default=8, help="RETRY_ATTEMPTS")
    parser.add_argument("--base-delay-ms", type=float, default=200, help="RETRY_BASE_DELAY_MS")
    parser.add_argument("--max-delay-ms", type=float, default=2000, help="RETRY_MAX_DELAY_MS")
    parser.add_argument("--capacity", type=int, default=10, help="MAX_CONCURRENCY")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-retry-") as work:
        result = trio.run(run, args, Path(work))
    result["settings"] = vars(args) | {"json": None}
    result["machine"] = common.machine()
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
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
