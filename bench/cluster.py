"""Scale-out: 1 process on SQLite, 1 on Redis and 2 on Redis, side by side in one run.

Each configuration runs ``python -m bench.server --kind ours`` processes (our service with the
bench provider; ``STORE=redis`` makes every process a node of one cluster on a fresh
``REDIS_PREFIX``), all in one work directory (one ``IMAGES_DIR``). For each:

- **throughput**: 10 clients spread over the nodes (round robin; ``--clients-on first``: all on
  the first node) create ``--jobs`` jobs of 5
  images (provider latency 0) and poll each on their own node (every ``--poll-ms``) until it
  has ended; images/s from the first create to the last final poll (median of ``--rounds``
  after a warm-up round). Every configuration's servers are up for the whole run and their
  rounds are taken in turn (round 1 of each, round 2 of each, ...), so the **paired** ratios
  (the median of the ratios of rounds taken seconds apart, against the first configuration
  and against the one before) are little moved by a machine whose speed drifts. CPU per
  image of the servers, of the Redis server (``INFO cpu``) and of this process (the clients),
  as all share the machine's cores, and how many cores they kept busy together (CPU seconds
  over wall seconds: near the machine's count, the configuration is bound by the machine, not
  by the service). With Redis, how often all ``MAX_CONCURRENCY`` slots were held (``ZCARD``
  of the holders, every 50 ms: a slot handed on within a node stays held throughout), and
  ``INFO commandstats`` around the rounds gives Redis commands per image.
- **fan-out**: one gated job (10 images, 50 ms + 20 ms apart) created on the first node, with
  ``--subscribers`` SSE subscribers spread evenly over the nodes; delivery is from the provider
  finishing an image (its URL carries the time) to its arrival, split into subscribers on the
  node that runs the job (same-node) and on the others (cross-node). With Redis, commands per
  delivered event (per event of the job, not per subscriber). On a node saturated by its
  subscribers the split is skewed both ways: this one client reads the stream that arrived
  first first, and the provider's time stamp on a busy node is late.
- **cross-node delivery** (clusters): ``--apart-subscribers`` subscribers all on the node that
  runs a gated job, then as many all on another node, ``--apart-repeats`` times: equal loads
  for the client, below saturation, so the difference is the hop through Redis.

``--configs`` picks the configurations (``store:nodes``; the first is the base of the ratios).

``--node-cpus C`` holds every node of every configuration to C cores (a CFS quota in a cgroup
of its own, as a container's CPU limit does; needs root and a cgroup CPU controller). On a
machine where the Redis server and these clients share the nodes' cores, one node leaves the
machine's other cores to them, two nodes take those cores from them: the ratio is then bound
by the machine, not by the service (one node with Redis and the clients keeps about 1.27 of 2
cores busy, so two nodes that cost no more per image than one could reach at most
2 / 1.27 = 1.57x). With a budget per node that leaves Redis and the clients room in every
configuration (2 x C + their share < the machine's cores), the nodes are what binds, as they
are where Redis and the clients run on hosts of their own.

    .venv/bin/python -m bench.cluster --json bench/results/cluster.json
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from actors.store.redis import open_client
from bench import common
from bench.provider import prompt
from tests.redis_support import REDIS_URL, delete_prefix

TERMINAL = {"completed", "failed", "canceled"}
CONFIGS = (("sqlite", 1), ("redis", 1), ("redis", 2))
#: How often the rounds of a Redis configuration sample the slots held (``ZCARD``). Each sample
#: costs this process about 0.4 ms of CPU (a coredis call under Trio): every 5 ms, it took a
#: tenth of a core from the machine the servers share, in the Redis configurations only.
SAMPLE_S = 0.05


async def redis_commands() -> int:
    """Every command the Redis server has run (``INFO commandstats``), for deltas."""
    async with open_client(REDIS_URL) as client:
        info = await client.info("commandstats")
    return sum(int(stats["calls"]) for stats in info.values() if isinstance(stats, dict))


async def redis_cpu_s() -> float:
    """CPU seconds the Redis server has used (``INFO cpu``, its main thread and children)."""
    async with open_client(REDIS_URL) as client:
        info: dict[str, Any] = dict(await client.info("cpu"))
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def own_cpu_s() -> float:
    """CPU seconds this bench process (the clients) has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def throughput_round(
    servers: list[common.Server],
    token: str,
    *,
    jobs: int,
    images: int,
    clients: int,
    poll_s: float = 0.02,
    holders_key: str | None = None,
    capacity: int = 0,
    on_first: bool = False,
) -> dict[str, Any]:
    per_client = [jobs // clients + (i < jobs % clients) for i in range(clients)]
    spread = servers[:1] if on_first else servers
    connections = [
        await common.HttpClient.connect(spread[i % len(spread)].port) for i in range(clients)
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
                await trio.sleep(poll_s)

    samples: list[int] = []

    async def sample_holders(key: str) -> None:
        async with open_client(REDIS_URL) as redis:
            while True:
                samples.append(await redis.zcard(key))
                await trio.sleep(SAMPLE_S)

    cpu0 = sum(server.cpu_s() for server in servers)
    redis0, client0 = await redis_cpu_s(), own_cpu_s()
    wall0 = time.perf_counter()
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            if holders_key is not None:
                nursery.start_soon(sample_holders, holders_key)
            async with trio.open_nursery() as clients_nursery:
                for connection, count in zip(connections, per_client, strict=True):
                    clients_nursery.start_soon(client, connection, count)
            nursery.cancel_scope.cancel()
    wall = time.perf_counter() - wall0
    cpu = sum(server.cpu_s() for server in servers) - cpu0
    client_cpu = own_cpu_s() - client0
    redis_cpu = await redis_cpu_s() - redis0
    for connection in connections:
        await connection.__aexit__()
    return {
        "images_per_s": completed / wall,
        "completed": completed,
        "wall_s": wall,
        "server_cpu_s": cpu,
        "redis_cpu_s": redis_cpu,
        "client_cpu_s": client_cpu,
        "slots_full": (
            sum(held >= capacity for held in samples) / len(samples) if samples else None
        ),
    }


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


async def fan_out(
    servers: list[common.Server], token: str, *, subscribers: int, placement: str = "spread"
) -> dict[str, Any]:
    """One gated job on the first node, ``subscribers`` SSE streams: spread over the nodes
    (``spread``), all on the node that runs the job (``same``), or all on another (``cross``).
    """
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
                if placement == "same":
                    node = runner
                elif placement == "cross":
                    node = (runner + 1) % len(servers)
                else:
                    node = index % len(servers)
                nursery.start_soon(subscribe, node)
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
        "placement": placement,
        "complete": complete,
        "same_node_ms": common.summarize(same) if same else None,
        "cross_node_ms": common.summarize(cross) if cross else None,
        "all_ms": common.summarize(same + cross),
        "same_ms_all": same,
        "cross_ms_all": cross,
        "redis_commands_subscribing": commands1 - commands0,
        "redis_commands_per_event": (commands2 - commands1) / (num_images + 1),
    }


async def apart_delivery(
    servers: list[common.Server], token: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Cross-node delivery against same-node: ``--apart-subscribers`` subscribers all on the
    node that runs a gated job, then as many all on another node, ``--apart-repeats`` times
    (alternating). The one client process then serves equal loads in both, and the count stays
    below what saturates a node (see the fan-out for that), so the difference is the hop from
    the job's node through Redis to the subscriber's."""
    runs: dict[str, list[dict[str, Any]]] = {"same": [], "cross": []}
    for _ in range(args.apart_repeats):
        for placement in ("same", "cross"):
            runs[placement].append(
                await fan_out(
                    servers, token, subscribers=args.apart_subscribers, placement=placement
                )
            )
    return {
        "subscribers": args.apart_subscribers,
        "repeats": args.apart_repeats,
        "complete": {p: sum(r["complete"] for r in rs) for p, rs in runs.items()},
        "same_node_ms": common.summarize([ms for r in runs["same"] for ms in r.pop("same_ms_all")]),
        "cross_node_ms": common.summarize(
            [ms for r in runs["cross"] for ms in r.pop("cross_ms_all")]
        ),
    }


class Config:
    """One configuration's servers (its nodes), up for the whole run."""

    def __init__(self, store: str, nodes: int) -> None:
        self.store, self.nodes = store, nodes
        self.prefix = f"bench:{secrets.token_hex(4)}:"
        self.servers: list[common.Server] = []
        self.token = ""
        self.kwargs: dict[str, Any] = {}
        self.rounds: list[dict[str, Any]] = []
        self.commands = 0

    async def start(self, stack: AsyncExitStack, work_dir: Path, args: argparse.Namespace) -> None:
        env = common.service_env(
            STORE=self.store,
            REDIS_URL=REDIS_URL,
            REDIS_PREFIX=self.prefix,
            DATABASE_PATH=str(work_dir / f"{self.store}-{self.nodes}.sqlite3"),
            MAX_STREAMS_PER_USER=100_000,
            LOG_LEVEL="WARNING",
        )
        self.servers = [
            await stack.enter_async_context(
                common.spawn_server("ours", work_dir, env=env, capacity=args.capacity)
            )
            for _ in range(self.nodes)
        ]
        if args.node_cpus:  # each node its own CPU budget, as a container's limit gives it
            for server in self.servers:
                stack.enter_context(
                    common.cpu_limit(server.pid, args.node_cpus, round(args.cpu_period_ms * 1000))
                )
        self.token = await common.login(self.servers[0].port)
        self.kwargs = {"images": 5, "clients": 10, "poll_s": args.poll_ms / 1000}
        self.kwargs["on_first"] = args.clients_on == "first"
        if self.store == "redis":  # the cluster-wide slots of MAX_CONCURRENCY (actors/limits/)
            self.kwargs |= {
                "holders_key": f"{self.prefix}limits:capacity:holders",
                "capacity": args.capacity,
            }
        await self.round(jobs=20)  # warm-up

    async def round(self, *, jobs: int) -> dict[str, Any]:
        return await throughput_round(self.servers, self.token, jobs=jobs, **self.kwargs)

    async def measured_round(self, args: argparse.Namespace) -> None:
        commands0 = await redis_commands()
        self.rounds.append(await self.round(jobs=args.jobs))
        self.commands += await redis_commands() - commands0

    async def finish(self, args: argparse.Namespace) -> dict[str, Any]:
        fan = await fan_out(self.servers, self.token, subscribers=args.subscribers)
        del fan["same_ms_all"], fan["cross_ms_all"]
        apart = await apart_delivery(self.servers, self.token, args) if self.nodes > 1 else None
        rounds, redis = self.rounds, self.store == "redis"
        images = sum(r["completed"] for r in rounds)
        return {
            "store": self.store,
            "nodes": self.nodes,
            "images_per_s": statistics.median(r["images_per_s"] for r in rounds),
            "rounds_images_per_s": [r["images_per_s"] for r in rounds],
            "server_cpu_us_per_image": 1e6 * sum(r["server_cpu_s"] for r in rounds) / images,
            "redis_cpu_us_per_image": 1e6 * sum(r["redis_cpu_s"] for r in rounds) / images,
            "client_cpu_us_per_image": 1e6 * sum(r["client_cpu_s"] for r in rounds) / images,
            # How much of the machine the rounds kept busy: servers, Redis and clients together.
            "cores_busy": sum(
                r["server_cpu_s"] + r["redis_cpu_s"] + r["client_cpu_s"] for r in rounds
            )
            / sum(r["wall_s"] for r in rounds),
            # How often all MAX_CONCURRENCY slots were held (sampled in Redis): near 1, every
            # slot is in use or on its way between holders.
            "slots_full": statistics.mean(r["slots_full"] for r in rounds) if redis else None,
            # (the other configurations' idle nodes add their few background calls a second)
            "redis_commands_per_image": self.commands / images if redis else None,
            "fan_out": fan,
            "apart": apart,
        }


async def run_configs(
    work_dir: Path, configs: list[Config], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every configuration's servers up together, their throughput rounds taken in turn
    (round 1 of each, then round 2 of each, ...: a machine that slows for a while slows them
    alike, so the ratios pair rounds taken a few seconds apart), then each one's fan-out."""
    try:
        async with AsyncExitStack() as stack:
            for config in configs:
                await config.start(stack, work_dir, args)
            for _ in range(args.rounds):
                for config in configs:
                    await config.measured_round(args)
            return [await config.finish(args) for config in configs]
    finally:
        with trio.CancelScope(shield=True):
            for config in configs:
                await delete_prefix(config.prefix)  # its keys (jobs, queue, limits) go with it


def row(result: dict[str, Any], base: float) -> list[object]:
    fan = result["fan_out"]

    def p(key: str, q: str) -> object:
        return None if fan[key] is None else fan[key][q]

    return [
        f"{result['nodes']} x {result['store']}",
        result["images_per_s"],
        result["images_per_s"] / base,
        result["paired_x_first"],
        result["paired_x_previous"],
        result["server_cpu_us_per_image"],
        result["redis_cpu_us_per_image"],
        result["client_cpu_us_per_image"],
        result["cores_busy"],
        result["slots_full"],
        result["redis_commands_per_image"] if result["store"] == "redis" else None,
        f"{fan['complete']}/{fan['subscribers']}",
        p("same_node_ms", "p50"),
        p("same_node_ms", "p99"),
        p("cross_node_ms", "p50"),
        p("cross_node_ms", "p99"),
        fan["redis_commands_per_event"] if result["store"] == "redis" else None,
    ]


def apart_row(result: dict[str, Any]) -> list[object]:
    apart = result["apart"]
    expected = apart["subscribers"] * apart["repeats"]
    return [
        f"{result['nodes']} x {result['store']}",
        f"{apart['subscribers']} x {apart['repeats']}",
        f"{apart['complete']['same']}+{apart['complete']['cross']}/{2 * expected}",
        apart["same_node_ms"]["p50"],
        apart["same_node_ms"]["p99"],
        apart["cross_node_ms"]["p50"],
        apart["cross_node_ms"]["p99"],
    ]


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    configs = [
        Config(store, int(nodes)) for store, _, nodes in (c.partition(":") for c in args.configs)
    ]
    results = await run_configs(work_dir, configs, args)

    def paired(mine: dict[str, Any], other: dict[str, Any]) -> float:
        """The median of the ratios of rounds taken in turn: less moved by a machine whose
        speed drifts than the ratio of the medians."""
        pairs = zip(mine["rounds_images_per_s"], other["rounds_images_per_s"], strict=True)
        return float(statistics.median(a / b for a, b in pairs))

    for before, result in zip([None, *results], results, strict=False):
        result["paired_x_first"] = paired(result, results[0])
        result["paired_x_previous"] = None if before is None else paired(result, before)
    return {"machine": common.machine(), "capacity": args.capacity, "configs": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument(
        "--capacity", type=int, default=5, help="MAX_CONCURRENCY (cluster-wide with Redis)"
    )
    parser.add_argument(
        "--apart-subscribers",
        type=int,
        default=50,
        help="subscribers of each same-node-only and cross-node-only run (clusters only)",
    )
    parser.add_argument("--apart-repeats", type=int, default=5)
    parser.add_argument(
        "--poll-ms", type=float, default=20.0, help="how often a client polls its job (ms)"
    )
    parser.add_argument(
        "--node-cpus",
        type=float,
        help="hold each node to this many cores (a CFS quota in a cgroup of its own, as a "
        "container's CPU limit; needs root): the nodes, not the Redis server and the clients "
        "sharing their machine, are then what the machine's cores bind",
    )
    parser.add_argument(
        "--cpu-period-ms", type=float, default=10.0, help="the quota's period (--node-cpus)"
    )
    parser.add_argument(
        "--clients-on",
        choices=["spread", "first"],
        default="spread",
        help="throughput clients spread over the nodes, or all on the first (a load balancer "
        "that sends one node everything: the others get their jobs from the queue)",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[f"{store}:{nodes}" for store, nodes in CONFIGS],
        help="store:nodes, run in turn (the first is the base of the ratios)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.node_cpus is not None and not 0 < args.node_cpus <= (os.cpu_count() or 1):
        parser.error(f"--node-cpus must be above 0 and at most {os.cpu_count()} (the cores)")
    common.raise_nofile()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as work:
        result = trio.run(run, args, Path(work))
    base = result["configs"][0]["images_per_s"]
    common.print_table(
        [
            "config",
            "images/s",
            "x first",
            "paired x first",
            "paired x previous",
            "cpu us/image",
            "redis cpu",
            "client cpu",
            "cores busy",
            "slots full",
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
    apart = [config for config in result["configs"] if config["apart"]]
    if apart:
        sys.stdout.write("\nsubscribers all on the job's node, then all on another\n")
        common.print_table(
            ["config", "subscribers", "complete", "same p50", "same p99", "cross p50", "cross p99"],
            [apart_row(config) for config in apart],
        )
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
