"""Scale-out: 1 process on SQLite, 1 on Redis and 2 on Redis, side by side in one run.

Each configuration runs ``python -m bench.server --kind ours`` processes (our service with the
bench provider; ``STORE=redis`` makes every process a node of one cluster on a fresh
``REDIS_PREFIX``), all in one work directory (one ``IMAGES_DIR``). For each:

- **throughput**: 10 clients spread over the nodes (round robin) create ``--jobs`` jobs of 5
  images (provider latency 0) and poll each on their own node until it has ended; images/s from
  the first create to the last final poll (median of ``--rounds`` after a warm-up round). With
  Redis, ``INFO commandstats`` around the rounds gives Redis commands per image.
- **fan-out**: one gated job (10 images, 50 ms + 20 ms apart) created on the first node, with
  ``--subscribers`` SSE subscribers spread evenly over the nodes; delivery is from the provider
  finishing an image (its URL carries the time) to its arrival, split into subscribers on the
  node that runs the job (same-node) and on the others (cross-node). With Redis, commands per
  delivered event (per event of the job, not per subscriber).

    .venv/bin/python -m bench.cluster --json bench/results/cluster.json
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from actors.store.redis import open_client
from bench import common
from bench.provider import prompt

TERMINAL = {"completed", "failed", "canceled"}
REDIS_URL = "redis://127.0.0.1:6379/0"
CONFIGS = (("sqlite", 1), ("redis", 1), ("redis", 2))


async def redis_commands() -> int:
    """Every command the Redis server has run (``INFO commandstats``), for deltas."""
    async with open_client(REDIS_URL) as client:
        info = await client.info("commandstats")
    return sum(int(stats["calls"]) for stats in info.values() if isinstance(stats, dict))


async def throughput_round(
    servers: list[common.Server], token: str, *, jobs: int, images: int, clients: int
) -> dict[str, Any]:
    per_client = [jobs // clients + (i < jobs % clients) for i in range(clients)]
    connections = [
        await common.HttpClient.connect(servers[i % len(servers)].port) for i in range(clients)
    ]
    completed = 0

    async def client(connection: common.HttpClient, count: int) -> None:
        nonlocal completed
        connection.token = token
        job_ids = [await connection.create(prompt(), images) for _ in range(count)]
        for job_id in job_ids:
            for _ in range(100_000):
                status, view = await connection.json("GET", f"/api/generate/{job_id}")
                if status != 200:
                    raise common.BenchError(f"poll answered {status}: {view}")
                if view["status"] in TERMINAL:
                    completed += view["progress"]["completed"]
                    break
                await trio.sleep(0.02)

    cpu0 = sum(server.cpu_s() for server in servers)
    wall0 = time.perf_counter()
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for connection, count in zip(connections, per_client, strict=True):
                nursery.start_soon(client, connection, count)
    wall = time.perf_counter() - wall0
    cpu = sum(server.cpu_s() for server in servers) - cpu0
    for connection in connections:
        await connection.__aexit__()
    return {"images_per_s": completed / wall, "completed": completed, "server_cpu_s": cpu}


async def runner_of(servers: list[common.Server], token: str, job_id: str) -> int:
    """Which server runs ``job_id`` (index; 0 without a cluster)."""
    if len(servers) == 1:
        return 0
    with trio.fail_after(30):
        while True:
            for index, server in enumerate(servers):
                async with await common.HttpClient.connect(server.port) as client:
                    client.token = token
                    _, status = await client.json("GET", "/api/status")
                if job_id in status.get("cluster", {}).get("jobs_held", ()):
                    return index
            await trio.sleep(0.02)


async def fan_out(servers: list[common.Server], token: str, *, subscribers: int) -> dict[str, Any]:
    """One gated job on the first node, ``subscribers`` SSE streams spread over the nodes."""
    num_images = 10
    first = servers[0]
    async with await common.HttpClient.connect(first.port) as client:
        client.token = token
        spec = prompt(latency_ms=50, gap_ms=20, gate=first.next_gate())
        job_id = await client.create(spec, num_images)
    runner = await runner_of(servers, token, job_id)
    recordings: list[tuple[int, list[tuple[int, bytes]]]] = []
    ready = 0
    all_ready = trio.Event()
    limiter = trio.CapacityLimiter(64)

    def one_ready() -> None:
        nonlocal ready
        limiter.release_on_behalf_of(trio.lowlevel.current_task())
        ready += 1
        if ready == subscribers:
            all_ready.set()

    async def subscribe(node: int) -> None:
        await limiter.acquire_on_behalf_of(trio.lowlevel.current_task())
        reads = await common.record_sse(
            servers[node].port, f"/api/generate/{job_id}/stream", token, on_ready=one_ready
        )
        recordings.append((node, reads))

    commands0 = await redis_commands()
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for index in range(subscribers):
                nursery.start_soon(subscribe, index % len(servers))
            await all_ready.wait()
            await trio.sleep(0.3)
            commands1 = await redis_commands()
            for server in servers:  # every node's gate count stays the same
                server.open_gate()
    commands2 = await redis_commands()
    same: list[float] = []
    cross: list[float] = []
    complete = 0
    for node, reads in recordings:
        events = common.parse_sse(reads)
        complete += [event.id for event in events] == list(range(1, num_images + 2))
        target = same if node == runner else cross
        target += [ms for event in events if (ms := event.delivery_ms) is not None]
    return {
        "subscribers": subscribers,
        "complete": complete,
        "same_node_ms": common.summarize(same) if same else None,
        "cross_node_ms": common.summarize(cross) if cross else None,
        "all_ms": common.summarize(same + cross),
        "redis_commands_subscribing": commands1 - commands0,
        "redis_commands_per_event": (commands2 - commands1) / (num_images + 1),
    }


async def one_config(
    work_dir: Path, store: str, nodes: int, args: argparse.Namespace
) -> dict[str, Any]:
    env = common.service_env(
        STORE=store,
        REDIS_URL=REDIS_URL,
        REDIS_PREFIX=f"bench:{secrets.token_hex(4)}:",
        DATABASE_PATH=str(work_dir / f"{store}-{nodes}.sqlite3"),
        MAX_STREAMS_PER_USER=100_000,
        LOG_LEVEL="WARNING",
    )
    async with AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(
                common.spawn_server("ours", work_dir, env=env, capacity=args.capacity)
            )
            for _ in range(nodes)
        ]
        token = await common.login(servers[0].port)
        kwargs = {"images": 5, "clients": 10}
        await throughput_round(servers, token, jobs=20, **kwargs)  # warm-up
        commands0 = await redis_commands()
        rounds = [
            await throughput_round(servers, token, jobs=args.jobs, **kwargs)
            for _ in range(args.rounds)
        ]
        commands = await redis_commands() - commands0
        images = sum(r["completed"] for r in rounds)
        fan = await fan_out(servers, token, subscribers=args.subscribers)
    return {
        "store": store,
        "nodes": nodes,
        "images_per_s": statistics.median(r["images_per_s"] for r in rounds),
        "server_cpu_us_per_image": 1e6 * sum(r["server_cpu_s"] for r in rounds) / images,
        "redis_commands_per_image": commands / images if store == "redis" else None,
        "fan_out": fan,
    }


def row(result: dict[str, Any], base: float) -> list[object]:
    fan = result["fan_out"]

    def p(key: str, q: str) -> object:
        return None if fan[key] is None else fan[key][q]

    return [
        f"{result['nodes']} x {result['store']}",
        result["images_per_s"],
        result["images_per_s"] / base,
        result["server_cpu_us_per_image"],
        result["redis_commands_per_image"] if result["store"] == "redis" else None,
        f"{fan['complete']}/{fan['subscribers']}",
        p("same_node_ms", "p50"),
        p("same_node_ms", "p99"),
        p("cross_node_ms", "p50"),
        p("cross_node_ms", "p99"),
        fan["redis_commands_per_event"] if result["store"] == "redis" else None,
    ]


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    results = [await one_config(work_dir, store, nodes, args) for store, nodes in CONFIGS]
    return {"machine": common.machine(), "capacity": args.capacity, "configs": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument(
        "--capacity", type=int, default=5, help="MAX_CONCURRENCY (cluster-wide with Redis)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    common.raise_nofile()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as work:
        result = trio.run(run, args, Path(work))
    base = result["configs"][0]["images_per_s"]
    common.print_table(
        [
            "config",
            "images/s",
            "x 1 sqlite",
            "cpu us/image",
            "redis cmd/image",
            "complete",
            "same p50",
            "same p99",
            "cross p50",
            "cross p99",
            "redis cmd/event",
        ],
        [row(config, base) for config in result["configs"]],
    )
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
