"""HTTP/2 against HTTP/1.1 over TLS: delivery and fan-out of SSE events.

Our service (``bench.server --kind ours``, the bench provider) serves HTTPS itself
(``TLS_CERTFILE``/``TLS_KEYFILE``, a certificate made by trustme for 127.0.0.1); each scenario
gets a fresh server per protocol:

- **http/1.1 (TLS)**: every subscriber has a TLS connection of its own (ALPN ``http/1.1``), as a
  browser's ``EventSource``s do over HTTP/1.1 (and only six per origin).
- **h2**: subscribers are streams multiplexed on shared TLS connections (ALPN ``h2``), at most
  ``--streams`` per connection (Hypercorn's ``h2_max_concurrent_streams`` is 100).
- **http/1.1 (plain)**: the reference, as in ``bench.delivery``.

Scenarios: **few**: ``--jobs`` gated jobs one after the other, each followed by ``--few``
subscribers (six: what a browser page can hold open over HTTP/1.1; over h2, one connection);
**many**: one gated job followed by ``--many`` subscribers. Delivery is from the provider
finishing an image to the read that completed its event at the subscriber (one clock); also the
time for every subscriber to get its stream, the server's CPU time from the gate to the end,
and its RSS per subscriber.

    .venv/bin/python -m bench.http2 --json bench/results/http2.json
"""

from __future__ import annotations

import argparse
import math
import ssl
from pathlib import Path
from typing import Any

import trustme

from bench import common

PROTOCOLS = ("h2", "http/1.1 (TLS)", "http/1.1 (plain)")


def client_context(authority: trustme.CA, alpn: str) -> ssl.SSLContext:
    context = ssl.create_default_context()
    authority.configure_trust(context)
    context.set_alpn_protocols([alpn])
    return context


async def scenario(
    protocol: str,
    work_dir: Path,
    authority: trustme.CA,
    args: argparse.Namespace,
    *,
    subscribers: int,
    jobs: int,
    gap_ms: float,
) -> dict[str, Any]:
    env = common.service_env()
    tls = protocol != "http/1.1 (plain)"
    if tls:
        certificate = work_dir / "server.pem"
        authority.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
            str(certificate)
        )
        env |= {"TLS_CERTFILE": str(certificate), "TLS_KEYFILE": str(certificate)}
    context = client_context(authority, "http/1.1") if tls else None
    streams = min(args.streams, subscribers) if protocol == "h2" else 0
    delivery: list[float] = []
    connect: list[float] = []
    cpu_s = 0.0
    complete = 0
    rss_per_subscriber: list[float] = []
    async with common.spawn_server(
        "ours", work_dir, env=env, capacity=args.images, ssl_context=context
    ) as server:
        if tls:
            server.h2_context = client_context(authority, "h2")
        token = await common.login(server.port, context)
        await common.run_gated_job(server, token, sse=4, num_images=5, h2_streams=min(streams, 4))
        for _ in range(jobs):
            at_gate: list[float] = []

            async def note_cpu(times: list[float] = at_gate) -> None:
                times.append(server.cpu_s())

            run = await common.run_gated_job(
                server,
                token,
                sse=subscribers,
                num_images=args.images,
                latency_ms=args.latency_ms,
                gap_ms=gap_ms,
                before_gate=note_cpu,
                h2_streams=streams,
            )
            cpu_s += server.cpu_s() - at_gate[0]
            delivery += run.delivery_ms(run.sse)
            connect.append(run.connect_s * 1000)
            complete += sum(map(run.complete, run.sse))
            rss_per_subscriber.append((run.rss_subscribed_kb - run.rss_before_kb) / subscribers)
    return {
        "delivery_ms": common.summarize(delivery),
        "connect_all_ms": common.summarize(connect),
        "connections": math.ceil(subscribers / streams) if streams else subscribers,
        "server_cpu_ms_per_event": round(
            cpu_s * 1000 / (jobs * subscribers * (args.images + 1)), 4
        ),
        "rss_kib_per_subscriber": round(max(rss_per_subscriber), 2),
        "complete_subscribers": f"{complete}/{jobs * subscribers}",
    }


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    authority = trustme.CA()
    result: dict[str, Any] = {}
    for protocol in PROTOCOLS:
        result[protocol] = {
            "few": await scenario(
                protocol,
                work_dir,
                authority,
                args,
                subscribers=args.few,
                jobs=args.jobs,
                gap_ms=args.gap_ms,
            ),
            "many": await scenario(
                protocol,
                work_dir,
                authority,
                args,
                subscribers=args.many,
                jobs=1,
                gap_ms=max(args.gap_ms, 0.2 * args.many),
            ),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20, help="jobs of the 'few' scenario")
    parser.add_argument("--few", type=int, default=6, help="subscribers per job (few)")
    parser.add_argument("--many", type=int, default=500, help="subscribers on one job (many)")
    parser.add_argument("--streams", type=int, default=100, help="h2 streams per connection")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--gap-ms", type=float, default=20, help="between images (few)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    result = common.run_in_work_dir(run, args, "bench-http2-")
    rows: list[list[object]] = []
    counts = ("connections", "server_cpu_ms_per_event", "rss_kib_per_subscriber")
    for label, name in [(f"{args.few} SSE", "few"), (f"{args.many} SSE", "many")]:
        figures = {p: result[p][name] for p in PROTOCOLS}
        rows += [
            [f"{label}: delivery {stat} (ms)"] + [f["delivery_ms"][stat] for f in figures.values()]
            for stat in ("p50", "p95", "p99", "max")
        ]
        rows.append(
            [f"{label}: all streams open (ms)"]
            + [f["connect_all_ms"]["p50"] for f in figures.values()]
        )
        rows += [[f"{label}: {key}"] + [f[key] for f in figures.values()] for key in counts]
        rows.append(
            [f"{label}: complete subscribers"]
            + [f["complete_subscribers"] for f in figures.values()]
        )
    common.print_table(["figure", *PROTOCOLS], rows)
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
