"""Delivery: from the provider finishing an image to a subscriber receiving its event.

Our service and the yardstick each run as a subprocess with the bench provider (passed to
``run_server(provider=...)`` for ours). The provider stamps every image's URL with
``time.monotonic_ns()`` as it returns (one clock for every process of the machine); a
subscriber stamps the read that completed the event and subtracts.

- **few**: ``--jobs`` jobs one after the other, each followed by ``--sse`` SSE subscribers
  (raw sockets) and ``--ws`` WebSocket subscribers (trio-websocket). Target: p99 < 10 ms.
- **1,000**: one job followed by ``--many`` SSE subscribers. Target: p99 < 100 ms.

Every job has ``--images`` images that wait for a gate until all subscribers are connected,
then finish ``latency + i * gap`` later, one by one. Target for both: p99 within 2x of the
yardstick's.

    .venv/bin/python -m bench.delivery --json bench/results/delivery.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench import common


async def few(server: common.Server, token: str, args: argparse.Namespace) -> dict[str, Any]:
    measured = await common.run_gated_jobs(
        server,
        token,
        jobs=args.jobs,
        sse=args.sse,
        ws=args.ws,
        num_images=args.images,
        latency_ms=args.latency_ms,
        gap_ms=args.gap_ms,
    )
    return {
        "sse_ms": common.summarize(measured.sse_ms),
        "ws_ms": common.summarize(measured.ws_ms),
        "all_ms": common.summarize(measured.sse_ms + measured.ws_ms),
        "complete_subscribers": f"{measured.complete}/{measured.subscribers}",
    }


async def many(server: common.Server, token: str, args: argparse.Namespace) -> dict[str, Any]:
    run = await common.run_gated_job(
        server,
        token,
        sse=args.many,
        num_images=args.images,
        latency_ms=args.latency_ms,
        gap_ms=args.many_gap_ms,
    )
    return {
        "sse_ms": common.summarize(run.delivery_ms(run.sse)),
        "complete_subscribers": f"{sum(map(run.complete, run.sse))}/{args.many}",
    }


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for kind in ("ours", "yardstick"):
        env = common.service_env() if kind == "ours" else {}
        figures: dict[str, Any] = {}
        async with common.spawn_server(kind, work_dir, env=env, capacity=args.images) as server:
            token = await common.login(server.port)
            await common.run_gated_job(server, token, sse=2, ws=1, num_images=5)  # warm-up
            figures["few"] = await few(server, token, args)
        async with common.spawn_server(kind, work_dir, env=env, capacity=args.images) as server:
            token = await common.login(server.port)
            await common.run_gated_job(server, token, sse=20, num_images=5)  # warm-up
            figures["many"] = await many(server, token, args)
            figures["full_gc"] = common.full_gc_pauses(server)
        result[kind] = figures
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20, help="jobs of the 'few' scenario")
    parser.add_argument("--sse", type=int, default=3, help="SSE subscribers per job (few)")
    parser.add_argument("--ws", type=int, default=3, help="WebSocket subscribers per job (few)")
    parser.add_argument("--many", type=int, default=1000, help="SSE subscribers on one job")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--gap-ms", type=float, default=20, help="between images (few)")
    parser.add_argument("--many-gap-ms", type=float, default=200, help="between images (many)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    result = common.run_in_work_dir(run, args, "bench-delivery-")
    ours, yard = result["ours"], result["yardstick"]
    rows: list[list[object]] = []
    scenarios = [
        (f"few ({args.sse} SSE + {args.ws} WS) SSE", "few", "sse_ms", "< 10"),
        (f"few ({args.sse} SSE + {args.ws} WS) WS", "few", "ws_ms", "< 10"),
        (f"{args.many} SSE", "many", "sse_ms", "< 100"),
    ]
    for label, scenario, key, target in scenarios:
        for stat in ("min", "p50", "p95", "p99", "max"):
            a, b = ours[scenario][key][stat], yard[scenario][key][stat]
            goal = f"{target}, <= 2x" if stat == "p99" else ""
            rows.append([f"{label} {stat} (ms)", goal, a, b, common.ratio(a, b)])
    rows.extend(
        [
            f"{scenario}: subscribers with every event",
            "all",
            ours[scenario]["complete_subscribers"],
            yard[scenario]["complete_subscribers"],
            None,
        ]
        for scenario in ("few", "many")
    )
    rows.append(
        [
            f"{args.many} SSE: full GC pauses > 5 ms (count, max ms)",
            "",
            f"{ours['full_gc']['count']}, {ours['full_gc']['max_ms']}",
            f"{yard['full_gc']['count']}, {yard['full_gc']['max_ms']}",
            None,
        ]
    )
    common.print_table(["figure", "target", "ours", "yardstick", "ratio"], rows)
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
