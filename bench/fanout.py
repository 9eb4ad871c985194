"""Fan-out: 100, 1,000 and 3,000 SSE subscribers on one job; delivery and memory per subscriber.

For each size, a fresh server subprocess (our service, then the yardstick) gets one job of
``--images`` images whose images wait for a gate; the subscribers connect (at most
``--connecting`` connections being set up at a time), the server's ``VmRSS`` is read before
and after, then the gate opens and image ``i`` finishes ``latency + i * gap`` later (the gap
is ``--gap-ms``, or by default 0.2 ms per subscriber, at least 20 ms, so that one event has
reached everyone before the next: delivery, not backlog). Every subscriber must get every
event in order, then ``done`` and the end of the response. A warm-up job with ``--warmup``
subscribers runs first, so that one-time allocations are not counted per subscriber.

Delivery is from the moment the provider finished an image (its URL carries
``time.monotonic_ns()``) to the read that completed the event at the subscriber.

    .venv/bin/python -m bench.fanout --json bench/results/fanout.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from bench import common, profiling


def gap_for(size: int, gap_ms: float | None) -> float:
    return gap_ms if gap_ms is not None else max(20.0, 0.2 * size)


async def one_size(
    kind: str, size: int, args: argparse.Namespace, work_dir: Path, *, profile: bool = False
) -> dict[str, Any]:
    env = common.service_env() if kind == "ours" else {}
    async with (
        common.spawn_server(
            kind, work_dir, env=env, capacity=args.images, extra_args=args.server_args
        ) as server,
        AsyncExitStack() as stack,
    ):
        token = await common.login(server.port)
        await common.run_gated_job(server, token, sse=args.warmup, num_images=5, gap_ms=5)

        async def start_profile() -> None:
            if profile:
                sampling = profiling.py_spy_record(server.pid, args.profile, rate=args.rate)
                await stack.enter_async_context(sampling)

        run = await common.run_gated_job(
            server,
            token,
            sse=size,
            num_images=args.images,
            latency_ms=args.latency_ms,
            gap_ms=gap_for(size, args.gap_ms),
            connecting=args.connecting,
            before_gate=start_profile,
        )
        await stack.aclose()
        full_gc = common.full_gc_pauses(server)
    complete = sum(run.complete(events) for events in run.sse)
    delivery = run.delivery_ms(run.sse)
    per_subscriber_kb = (run.rss_subscribed_kb - run.rss_before_kb) / size
    return {
        "subscribers": size,
        "complete_subscribers": complete,
        "events_received": sum(len(events) for events in run.sse),
        "events_expected": size * (args.images + 1),
        "delivery_ms": common.summarize(delivery),
        "rss_before_kb": run.rss_before_kb,
        "rss_subscribed_kb": run.rss_subscribed_kb,
        "rss_after_kb": run.rss_after_kb,
        "rss_per_subscriber_kb": round(per_subscriber_kb, 2),
        "connect_s": round(run.connect_s, 2),
        "gap_ms": gap_for(size, args.gap_ms),
        "full_gc": full_gc,
    }


async def memory_by_owner(
    kind: str, size: int, args: argparse.Namespace, work_dir: Path
) -> dict[str, Any]:
    """Where a subscriber's memory goes (tracemalloc in the server: a run of its own)."""
    env = common.service_env() if kind == "ours" else {}
    extra = [*args.server_args, "--tracemalloc"]
    async with common.spawn_server(
        kind, work_dir, env=env, capacity=args.images, extra_args=extra
    ) as server:
        token = await common.login(server.port)
        await common.run_gated_job(server, token, sse=args.warmup, num_images=5, gap_ms=5)
        await common.memory_snapshot(server)  # the baseline
        owners: list[tuple[str, float, int]] = []

        async def snapshot() -> None:
            owners.extend(await common.memory_snapshot(server))

        await common.run_gated_job(
            server, token, sse=size, num_images=args.images, gap_ms=5, before_gate=snapshot
        )
    total = sum(kib for _, kib, _ in owners)
    return {
        "subscribers": size,
        "traced_kib_per_subscriber": round(total / size, 2),
        "by_owner_kib_per_subscriber": [
            (owner, round(kib / size, 2), round(blocks / size, 1)) for owner, kib, blocks in owners
        ],
    }


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"ours": {}, "yardstick": {}}
    for size in args.sizes:
        for kind in ("ours", "yardstick"):
            result[kind][str(size)] = await one_size(kind, size, args, work_dir)
    if args.memory:
        result["memory"] = {
            kind: await memory_by_owner(kind, args.memory, args, work_dir)
            for kind in ("ours", "yardstick")
        }
    if args.profile is not None:
        # A run of its own: py-spy pauses the server at every sample, so its figures are slower.
        profiled = await one_size("ours", max(args.sizes), args, work_dir, profile=True)
        result["profile"] = profiling.analyse(args.profile)
        result["profile"]["run"] = profiled
    return result


def rows_for(result: dict[str, Any], sizes: list[int]) -> list[list[object]]:
    rows: list[list[object]] = []
    for size in sizes:
        ours, yard = result["ours"][str(size)], result["yardstick"][str(size)]
        rows.append(
            [
                f"{size}: subscribers with every event",
                "all",
                f"{ours['complete_subscribers']}/{size}",
                f"{yard['complete_subscribers']}/{size}",
                None,
            ]
        )
        for stat in ("min", "p50", "p95", "p99", "max"):
            a, b = ours["delivery_ms"][stat], yard["delivery_ms"][stat]
            target = "<= 1.5x yardstick" if stat == "p99" else ""
            rows.append([f"{size}: delivery {stat} (ms)", target, a, b, common.ratio(a, b)])
        a, b = ours["rss_per_subscriber_kb"], yard["rss_per_subscriber_kb"]
        rows.append(
            [f"{size}: RSS per subscriber (KiB)", "< 20, <= 1.5x", a, b, common.ratio(a, b)]
        )
        a, b = ours["connect_s"], yard["connect_s"]
        rows.append([f"{size}: time to connect all (s)", "", a, b, common.ratio(a, b)])
        gc_ours, gc_yard = ours["full_gc"], yard["full_gc"]
        rows.append(
            [
                f"{size}: full GC pauses > 5 ms (count, max ms)",
                "",
                f"{gc_ours['count']}, {gc_ours['max_ms']}",
                f"{gc_yard['count']}, {gc_yard['max_ms']}",
                None,
            ]
        )
    return rows


def print_memory(memory: dict[str, Any]) -> None:
    ours, yard = memory["ours"], memory["yardstick"]
    sys.stdout.write(
        f"\nmemory per subscriber by owner (tracemalloc, {ours['subscribers']} subscribers):"
        f" ours {ours['traced_kib_per_subscriber']} KiB traced,"
        f" yardstick {yard['traced_kib_per_subscriber']} KiB traced\n"
    )
    rows: list[list[object]] = []
    for kind, figures in (("ours", ours), ("yardstick", yard)):
        rows += [
            [kind, owner, kib, blocks]
            for owner, kib, blocks in figures["by_owner_kib_per_subscriber"][:12]
        ]
    common.print_table(["server", "allocated by", "KiB", "blocks"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=lambda text: [int(n) for n in text.split(",")], default=[100, 1000, 3000]
    )
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--gap-ms", type=float, help="between images (default: by size)")
    parser.add_argument("--connecting", type=int, default=64, help="connections set up at once")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--server-args",
        type=str.split,
        default=[],
        help="extra arguments of python -m bench.server (experiments: '--gc-threshold 50000')",
    )
    parser.add_argument(
        "--profile", type=Path, help="one more run of ours at the largest size under py-spy"
    )
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--memory", type=int, default=0, help="one more run per server: tracemalloc, N subscribers"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    nofile = common.raise_nofile()
    if nofile < 2 * max(args.sizes) + 100:
        sys.stderr.write(f"warning: open-files limit {nofile} is low for these sizes\n")
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as work:
        result = trio.run(run, args, Path(work))
    result["settings"] = vars(args) | {"json": None, "profile": str(args.profile)}
    result["machine"] = common.machine() | {"nofile": nofile}
    common.print_table(
        ["figure", "target", "ours", "yardstick", "ratio"], rows_for(result, args.sizes)
    )
    if "memory" in result:
        print_memory(result["memory"])
    if "profile" in result:
        profiling.print_analysis(result["profile"])
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
