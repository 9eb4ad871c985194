"""The cluster-wide ``MAX_CONCURRENCY`` alone: attempts/s through ``RedisCapacity``.

``--processes`` processes (each a ``RedisCapacity`` on one fresh prefix of the Redis at
127.0.0.1:6379, as the nodes of a cluster) start together and each runs ``--rounds`` rounds,
one after the other, of ``--jobs`` jobs of ``--attempts`` attempts that hold their slot for no
time at all, so what is measured is how fast the slots change hands. Printed: attempts/s over
all processes (from the common start to the last one done), their CPU per attempt, and how the
slots given back went (handed on within the process, or back through Redis). Run with 1 then
2 processes to see what the second adds:

    .venv/bin/python -m bench.capacity --processes 1
    .venv/bin/python -m bench.capacity --processes 2
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from actors.limits.redis_capacity import open_redis_capacity
from actors.store.redis import open_client
from bench import common
from tests.redis_support import REDIS_URL, delete_prefix

ROOT = Path(__file__).resolve().parent.parent


async def one_process(prefix: str, args: argparse.Namespace, start: float) -> None:
    """One process's share of the run; prints its figures as one JSON line."""
    async with (
        open_client(REDIS_URL) as client,
        open_redis_capacity(client, prefix=prefix, capacity=args.capacity) as limiter,
    ):
        await trio.sleep(max(0.0, start - time.time()))
        wall0, cpu0 = time.perf_counter(), time.process_time()

        async def attempt(job: str, index: int) -> None:
            async with limiter.slot(job, priority=index):
                await trio.lowlevel.checkpoint()

        for round_ in range(args.rounds):
            async with trio.open_nursery() as nursery:
                for job in range(args.jobs):
                    for index in range(args.attempts):
                        nursery.start_soon(attempt, f"{limiter.node}-{round_}-{job}", index)
        result = {
            "attempts": args.rounds * args.jobs * args.attempts,
            "wall_s": time.perf_counter() - wall0,
            "cpu_s": time.process_time() - cpu0,
            # (a release from before slots were handed on has neither count)
            "handed_on": getattr(limiter, "handed_on", 0),
            "given_back": getattr(limiter, "given_back", 0),
        }
    sys.stdout.write(json.dumps(result) + "\n")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"bench:{secrets.token_hex(4)}:capacity:"
    start = time.time() + 2.0  # every process connected and renewed by then
    command = [sys.executable, "-m", "bench.capacity", "--one", prefix, str(start)]
    command += ["--capacity", str(args.capacity), "--jobs", str(args.jobs)]
    command += ["--attempts", str(args.attempts), "--rounds", str(args.rounds)]
    try:
        async with trio.open_nursery() as nursery:
            answers: list[subprocess.CompletedProcess[bytes]] = []

            async def spawn() -> None:
                answers.append(
                    await trio.run_process(command, cwd=ROOT, capture_stdout=True, check=True)
                )

            for _ in range(args.processes):
                nursery.start_soon(spawn)
    finally:
        with trio.CancelScope(shield=True):
            await delete_prefix(prefix)
    results = [json.loads(answer.stdout.decode().splitlines()[-1]) for answer in answers]
    attempts = sum(r["attempts"] for r in results)
    given = sum(r["handed_on"] + r["given_back"] for r in results)
    return {
        "machine": common.machine(),
        "processes": args.processes,
        "capacity": args.capacity,
        "attempts": attempts,
        "attempts_per_s": attempts / max(r["wall_s"] for r in results),
        "cpu_us_per_attempt": 1e6 * sum(r["cpu_s"] for r in results) / attempts,
        "handed_on_share": sum(r["handed_on"] for r in results) / given if given else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--capacity", type=int, default=5, help="MAX_CONCURRENCY")
    parser.add_argument("--jobs", type=int, default=20, help="jobs per process")
    parser.add_argument("--attempts", type=int, default=25, help="attempts per job")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of jobs per process")
    parser.add_argument("--one", nargs=2, metavar=("PREFIX", "START"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.one:
        prefix, start = args.one
        trio.run(one_process, prefix, args, float(start))
        return
    result = trio.run(run, args)
    common.print_table(
        ["processes", "capacity", "attempts", "attempts/s", "cpu us/attempt", "handed on"],
        [
            [
                result["processes"],
                result["capacity"],
                result["attempts"],
                result["attempts_per_s"],
                result["cpu_us_per_attempt"],
                result["handed_on_share"],
            ]
        ],
    )
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
