"""The service as shipped, with Replicate: delivery and TTFI overhead against the yardstick.

Our service runs as ``python -m web`` (a subprocess) at its defaults (SQLite with
``synchronous=full``, ``STORE_IMAGES=true``, INFO logging), with only ``REPLICATE_API_TOKEN``
and ``REPLICATE_BASE_URL`` set, pointing at the fake Replicate server from
``tests/fake_replicate.py`` (a process of its own, so that serving the service's downloads of
images does not delay this process's reads; predictions take ``--latency`` seconds, creates
held open with ``Prefer: wait``). The yardstick (``bench/yardstick.py``: Trio + h11, no
framework) runs as another subprocess with :class:`bench.provider.ReplicateCallProvider`
against the same fake: one create held open, nothing else. ``--env KEY=VALUE`` (repeatable)
changes our service's settings, e.g. ``--env STORE=memory --env STORE_IMAGES=false``.

Each repetition creates one job of ``--images`` images on each server (ours, then the
yardstick), follows it over SSE from right after the create, and measures:

- **delivery**: from the moment the fake finished an image's prediction (its ``completed_at``)
  to the moment the subscriber read that image's event. The event names the prediction when
  it carries Replicate's URL (the yardstick, ``STORE_IMAGES=false``); the service's own
  ``/files/`` URL does not, so then a job's events are paired with its predictions in order of
  finishing (the prompts are unique per job; a job's predictions finish within a few ms).
- **TTFI overhead**: from sending the create to reading the first completed image, minus the
  provider's latency.
- **store writes**: our store's commits (queued writes stored) and transactions (each one
  fsync with SQLite ``synchronous=full``) per image, from ``/api/status``.
- **server CPU per image**: the server process's CPU over every measured job (10 ms clock
  ticks), per image.

Targets (issue "fast by default"): delivery p99 <= max(10 ms, 2x the yardstick's); TTFI
overhead (p99 over the repetitions) <= the yardstick's + 10 ms.

    .venv/bin/python -m bench.defaults --json bench/results/defaults.json
    .venv/bin/python -m bench.defaults --env STORE=memory --env STORE_IMAGES=false

``--profile FILE`` then samples our server with py-spy over ``--repeats`` more jobs (a run of
its own, not measured) and sums the samples by layer and function (``bench/profiling.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from bench import common, profiling
from tests.fake_replicate import TOKEN

KINDS = ("ours", "yardstick")


def parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env expects KEY=VALUE, not {pair!r}")
        env[key] = value
    return env


async def finished_predictions(fake_port: int, job_prompt: str) -> dict[str, int]:
    """The job's predictions at the fake, in the order they finished: id -> when, as
    ``time.monotonic_ns()`` (from the fake's ``completed_at``, stamped the moment it finished
    them; both clocks are this machine's)."""
    async with await common.HttpClient.connect(fake_port) as client:
        client.token = TOKEN
        status, page = await client.json("GET", "/v1/predictions")
    if status != 200:
        raise common.BenchError(f"the fake's list answered {status}")
    wall_minus_monotonic_ns = time.time_ns() - time.monotonic_ns()
    finished: list[tuple[int, str]] = []
    for prediction in page["results"]:
        if prediction["input"].get("prompt") != job_prompt:
            continue
        stamp = datetime.fromisoformat(prediction["completed_at"])  # "...Z": UTC
        wall_ns = round(stamp.timestamp() * 1e6) * 1000
        finished.append((wall_ns - wall_minus_monotonic_ns, prediction["id"]))
    return {prediction_id: at_ns for at_ns, prediction_id in sorted(finished)}


async def one_job(
    server: common.Server, token: str, fake_port: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One job on ``server``, followed over SSE: its deliveries, TTFI overhead and CPU."""
    job_prompt = f"defaults bench {uuid.uuid4().hex}"
    cpu0 = server.cpu_s()
    async with await common.HttpClient.connect(server.port) as client:
        client.token = token
        sent_ns = time.monotonic_ns()
        job_id = await client.create(job_prompt, args.images)

    with trio.fail_after(args.latency + 60):
        reads = await common.record_sse(
            server.port, f"/api/generate/{job_id}/stream", token, on_ready=lambda: None
        )
    cpu = server.cpu_s() - cpu0
    events = common.parse_sse(reads)
    images = [e for e in events if e.type == "progress" and e.data.get("status") == "completed"]
    done = next((e.data for e in events if e.type == "done"), {})
    if len(images) != args.images:
        raise common.BenchError(f"{server.kind}: {len(images)}/{args.images} images: {done}")
    finished_ns = await finished_predictions(fake_port, job_prompt)
    in_order = sorted(images, key=lambda e: e.at_ns)
    delivery_ms = []
    paired = False
    for event, prediction_id in zip(in_order, finished_ns, strict=True):
        named = next((pid for pid in finished_ns if pid in str(event.data.get("url"))), None)
        paired = paired or named is None
        delivery_ms.append((event.at_ns - finished_ns[named or prediction_id]) / 1e6)
    first_ns = in_order[0].at_ns
    return {
        "delivery_ms": delivery_ms,
        "ttfi_overhead_ms": (first_ns - sent_ns) / 1e6 - args.latency * 1000,
        "service_ttfi_ms": done.get("ttfi_ms"),
        "cpu_s": cpu,
        "images": args.images,
        "paired_in_order": paired,
    }


async def store_statistics(server: common.Server, token: str) -> dict[str, Any]:
    """Our store's counters (``/api/status``): writes committed, transactions."""
    async with await common.HttpClient.connect(server.port) as client:
        client.token = token
        status, view = await client.json("GET", "/api/status")
    if status != 200:
        raise common.BenchError(f"/api/status answered {status}")
    return dict(view["store"])


def summary(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    delivery = [ms for job in jobs for ms in job["delivery_ms"]]
    ttfi = [job["ttfi_overhead_ms"] for job in jobs]
    cpu_s = sum(job["cpu_s"] for job in jobs)
    images = sum(job["images"] for job in jobs)
    return {
        "delivery_ms": common.summarize(delivery),
        "ttfi_overhead_ms": common.summarize(ttfi),
        "cpu_us_per_image": round(1e6 * cpu_s / images, 1),
        "paired_in_order": any(job["paired_in_order"] for job in jobs),
        "service_ttfi_ms": [job["service_ttfi_ms"] for job in jobs],
        "delivery_ms_by_job": [[round(ms, 2) for ms in job["delivery_ms"]] for job in jobs],
    }


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    overrides = parse_env(args.env)
    result: dict[str, Any] = {"env": overrides}
    async with common.spawn_fake_replicate(args.latency) as fake_port:
        fake_url = f"http://127.0.0.1:{fake_port}"
        ours_env = {
            "AUTH_SECRET": common.SECRET,
            "REPLICATE_API_TOKEN": TOKEN,
            "REPLICATE_BASE_URL": fake_url,
            **overrides,
        }
        yard_args = ["--replicate-url", fake_url, "--replicate-token", TOKEN]
        async with (
            common.spawn_server(
                "ours", work_dir, env=ours_env, command=[sys.executable, "-m", "web"]
            ) as ours,
            common.spawn_server("yardstick", work_dir, extra_args=yard_args) as yard,
        ):
            servers = {"ours": ours, "yardstick": yard}
            tokens = {kind: await common.login(server.port) for kind, server in servers.items()}
            for kind, server in servers.items():  # warm-up
                await one_job(server, tokens[kind], fake_port, args)
            jobs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
            before = await store_statistics(ours, tokens["ours"])
            for _ in range(args.repeats):
                for kind, server in servers.items():
                    jobs[kind].append(await one_job(server, tokens[kind], fake_port, args))
            after = await store_statistics(ours, tokens["ours"])
            images = args.repeats * args.images
            result["ours_store_per_image"] = {
                key: round((after[key] - before[key]) / images, 2)
                for key in ("commits", "transactions")
                if isinstance(after.get(key), int)
            }
            result["ours_rss_kb"] = ours.rss_kb()
            if args.profile:
                # A run of its own (py-spy pauses the server at every sample): not measured.
                async with profiling.py_spy_record(ours.pid, args.profile, rate=args.rate):
                    for _ in range(args.repeats):
                        await one_job(ours, tokens["ours"], fake_port, args)
                result["profile"] = profiling.analyse(args.profile)
    for kind in KINDS:
        result[kind] = summary(jobs[kind])
    result["targets"] = targets(result["ours"], result["yardstick"])
    return result


def targets(ours: dict[str, Any], yard: dict[str, Any]) -> dict[str, Any]:
    delivery_limit = max(10.0, 2 * yard["delivery_ms"]["p99"])
    ttfi_limit = yard["ttfi_overhead_ms"]["p99"] + 10
    return {
        "delivery_p99_limit_ms": round(delivery_limit, 2),
        "delivery_p99_met": ours["delivery_ms"]["p99"] <= delivery_limit,
        "ttfi_overhead_limit_ms": round(ttfi_limit, 2),
        "ttfi_overhead_met": ours["ttfi_overhead_ms"]["p99"] <= ttfi_limit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="jobs per server")
    parser.add_argument("--images", type=int, default=5, help="images per job")
    parser.add_argument("--latency", type=float, default=2.0, help="seconds per prediction")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="our service's settings"
    )
    parser.add_argument(
        "--profile", type=Path, help="then py-spy (raw samples here) over --repeats more jobs"
    )
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    result = common.run_in_work_dir(run, args, "bench-defaults-")
    result["settings"]["profile"] = str(args.profile) if args.profile else None
    ours, yard, met = result["ours"], result["yardstick"], result["targets"]
    rows: list[list[object]] = []
    for figure in ("p50", "p95", "p99", "max"):
        a, b = ours["delivery_ms"][figure], yard["delivery_ms"][figure]
        target = f"<= {met['delivery_p99_limit_ms']}" if figure == "p99" else ""
        rows.append([f"delivery {figure} (ms)", target, a, b, common.ratio(a, b)])
    for figure in ("p50", "p99"):
        a, b = ours["ttfi_overhead_ms"][figure], yard["ttfi_overhead_ms"][figure]
        target = f"<= {met['ttfi_overhead_limit_ms']}" if figure == "p99" else ""
        rows.append([f"TTFI overhead {figure} (ms)", target, a, b, common.ratio(a, b)])
    a, b = ours["cpu_us_per_image"], yard["cpu_us_per_image"]
    rows.append(["server CPU per image (us)", "", a, b, common.ratio(a, b)])
    per_image = result["ours_store_per_image"]
    for key, value in per_image.items():
        rows.append([f"store {key} per image (ours)", "", value, None, None])
    common.print_table(["figure", "target", "ours", "yardstick", "ratio"], rows)
    sys.stdout.write(
        f"env {result['env'] or 'defaults'}: delivery target met: {met['delivery_p99_met']}; "
        f"TTFI target met: {met['ttfi_overhead_met']}\n"
    )
    if result.get("profile"):
        profiling.print_analysis(result["profile"])
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
