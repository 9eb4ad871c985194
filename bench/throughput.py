"""Throughput: images/s and jobs/s with a provider that does no work, and where the time goes.

The server runs as a subprocess (``python -m bench.server``: our service as ``python -m web``
runs it, default settings and INFO logging to a file, with the bench provider at latency 0,
which awaits one checkpoint and returns a URL; or the yardstick with the same provider). 10
clients, each on its own keep-alive connection, create 100 jobs of 5 images between them, then
poll each of their jobs until it has ended. A round's time runs from the first create to the
last final poll; server CPU is read from ``/proc/<pid>/stat`` around it. After a warm-up round,
``--rounds`` rounds are measured and the median is reported.

``--provider replicate`` runs our service as ``python -m web`` with the Replicate provider
against the fake Replicate server (``python -m tests.fake_replicate --latency 0``, a third
process) instead: the real provider path, HTTP calls included; the yardstick then calls the
same fake with :class:`bench.provider.ReplicateCallProvider`. Our create pace is Replicate's
600 a minute unless ``--env REPLICATE_MAX_CREATES_PER_MIN=60000`` lifts it.

``--profile-rounds N`` then samples the server with py-spy (``--rate`` Hz, CPU only) for N more
rounds and sums the samples by layer and by function.

    .venv/bin/python -m bench.throughput --json bench/results/throughput.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from bench import common, profiling
from bench.defaults import parse_env
from bench.provider import prompt
from tests.fake_replicate import TOKEN as FAKE_TOKEN

TERMINAL = {"completed", "failed", "canceled"}


async def one_round(
    server: common.Server, token: str, *, jobs: int, images: int, clients: int, poll_s: float
) -> dict[str, Any]:
    """Create ``jobs`` jobs from ``clients`` connections, then poll them all to their end."""
    per_client = [jobs // clients + (i < jobs % clients) for i in range(clients)]
    finished: list[dict[str, Any]] = []
    polls = 0
    connections = [await common.HttpClient.connect(server.port) for _ in range(clients)]
    for connection in connections:
        connection.token = token

    async def client(connection: common.HttpClient, count: int) -> None:
        nonlocal polls
        job_ids = [await connection.create(prompt(), images) for _ in range(count)]
        for job_id in job_ids:
            for _ in range(10_000):
                polls += 1
                status, view = await connection.json("GET", f"/api/generate/{job_id}")
                if status != 200:
                    raise common.BenchError(f"poll answered {status}: {view}")
                if view["status"] in TERMINAL:
                    finished.append(view)
                    break
                await trio.sleep(poll_s)

    cpu0, wall0, client0 = server.cpu_s(), time.perf_counter(), time.process_time()
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for connection, count in zip(connections, per_client, strict=True):
                nursery.start_soon(client, connection, count)
    wall = time.perf_counter() - wall0
    cpu = server.cpu_s() - cpu0
    client_cpu = time.process_time() - client0
    for connection in connections:
        await connection.__aexit__()
    completed = sum(view["progress"]["completed"] for view in finished)
    requests = jobs + polls
    return {
        "wall_s": round(wall, 4),
        "jobs": len(finished),
        "images_completed": completed,
        "images_per_s": round(completed / wall, 1),
        "jobs_per_s": round(len(finished) / wall, 1),
        "requests": requests,
        "requests_per_s": round(requests / wall, 1),
        "polls": polls,
        "server_cpu_s": round(cpu, 3),
        "server_cpu_pct": round(100 * cpu / wall, 1),
        "server_cpu_us_per_image": round(1e6 * cpu / max(completed, 1), 1),
        "server_cpu_us_per_request": round(1e6 * cpu / requests, 1),
        "client_cpu_s": round(client_cpu, 3),
    }


async def measure(
    server: common.Server, token: str, args: argparse.Namespace, rounds: int
) -> list[dict[str, Any]]:
    kwargs = {"images": args.images, "clients": args.clients, "poll_s": args.poll_ms / 1000}
    await one_round(server, token, jobs=max(args.clients, args.jobs // 5), **kwargs)  # warm-up
    return [await one_round(server, token, jobs=args.jobs, **kwargs) for _ in range(rounds)]


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(rounds, key=lambda r: r["images_per_s"])
    middle = dict(ordered[len(ordered) // 2])
    middle["images_per_s_all"] = [r["images_per_s"] for r in rounds]
    middle["images_per_s_median"] = statistics.median(r["images_per_s"] for r in rounds)
    return middle


async def profile(
    server: common.Server, token: str, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    """Run ``--profile-rounds`` more rounds under py-spy; what the samples say."""
    async with profiling.py_spy_record(server.pid, out, rate=args.rate):
        rounds = await measure(server, token, args, args.profile_rounds)
    analysis = profiling.analyse(out)
    analysis["rounds"] = rounds
    analysis["raw"] = str(out)
    return analysis


# --- main -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"settings": vars(args) | {"json": None, "profile": None}}
    if args.provider == "replicate":
        async with common.spawn_fake_replicate(0) as fake_port:
            fake_url = f"http://127.0.0.1:{fake_port}"
            env = common.service_env(
                REPLICATE_API_TOKEN=FAKE_TOKEN, REPLICATE_BASE_URL=fake_url, **parse_env(args.env)
            )
            yard_args = ["--replicate-url", fake_url, "--replicate-token", FAKE_TOKEN]
            await measure_kinds(
                result,
                args,
                work_dir,
                ours={"env": env, "command": [sys.executable, "-m", "web"]},
                yardstick={"extra_args": yard_args},
            )
        return result
    ours = {"env": common.service_env(**parse_env(args.env))}
    await measure_kinds(result, args, work_dir, ours=ours, yardstick={})
    return result


async def measure_kinds(
    result: dict[str, Any],
    args: argparse.Namespace,
    work_dir: Path,
    **spawn_kwargs: dict[str, Any],
) -> None:
    """Measure each server (``ours``, ``yardstick``: :func:`common.spawn_server` keywords)
    into ``result``, then profile ours if asked."""
    for kind, kwargs in spawn_kwargs.items():
        async with common.spawn_server(kind, work_dir, **kwargs) as server:
            token = await common.login(server.port)
            result[kind] = median_round(await measure(server, token, args, args.rounds))
            result[kind]["rss_kb"] = server.rss_kb()
            if kind == "ours" and args.profile_rounds:
                raw = args.profile or work_dir / "raw"
                result["profile"] = await profile(server, token, args, raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--poll-ms", type=float, default=5, help="between polls of a running job")
    parser.add_argument("--provider", choices=["bench", "replicate"], default="bench")
    parser.add_argument("--profile-rounds", type=int, default=0, help="py-spy over N more rounds")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--profile", type=Path, help="keep py-spy's raw samples here")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="our service's settings"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as work:
        result = trio.run(run, args, Path(work))
    result["machine"] = common.machine()
    ours, yard = result["ours"], result.get("yardstick")
    rows: list[list[object]] = []
    targets = {
        "images_per_s": ">= 200 and >= 0.5x yardstick",
        "jobs_per_s": "",
        "requests_per_s": "",
        "server_cpu_us_per_image": "",
        "server_cpu_us_per_request": "",
        "server_cpu_pct": "",
        "client_cpu_s": "",
        "wall_s": "",
    }
    for key, target in targets.items():
        a = ours[key]
        b = yard[key] if yard else None
        rows.append([key, target, a, b, common.ratio(a, b)])
    common.print_table(["figure (median round)", "target", "ours", "yardstick", "ratio"], rows)
    if result.get("profile"):
        profiling.print_analysis(result["profile"])
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
