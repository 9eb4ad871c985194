"""How long ``python -m web`` holds a connection after its client has gone.

For each kind of connection (an idle keep-alive connection after an answer, an SSE stream, an
accepted WebSocket) and each way of leaving (the client closes its socket: a FIN; or resets it:
an RST), ``--repeat`` connections are opened one at a time, held for a moment, then left; the
time until the service's count of open descriptors falls back is the figure (polled every 5 ms,
at most ``--bound-s``). The service runs at its shipped connection settings (``HEARTBEAT_S`` 15 s,
Hypercorn's keep-alive timeout 5 s; ``STORE=memory``, the local provider with a long job to
follow). Prints a table and one JSON line.

    .venv/bin/python -m bench.release --json bench/results/release.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from bench import common
from tests.e2e.live_service import LiveService, live_service
from tests.e2e.raw_socket import (
    connect,
    receive_until_closed,
    request,
    reset,
    send,
    upgrade_request,
)

KINDS = ("keep-alive", "sse", "websocket")
ENDINGS = ("close", "reset")
#: A job that outlasts the bench (200 images of 2 to 3 s, one at a time).
ENVIRON = {"MAX_IMAGES": "200", "LOCAL_LATENCY_MS": "2000-3000", "MAX_CONCURRENCY": "1"}
POLL_S = 0.005


async def hold(service: LiveService, job_id: str, kind: str) -> trio.SocketStream:
    """A connection of ``kind`` the service is holding for its client."""
    stream = await connect(service.port)
    token = service.token
    if kind == "keep-alive":
        await send(stream, request())
        until = b'"store":"ok"}}'
    elif kind == "sse":
        await send(stream, request(target=f"/api/generate/{job_id}/stream?token={token}"))
        until = b"retry:"
    else:
        await send(stream, upgrade_request(f"/api/generate/{job_id}?token={token}"))
        until = b"\r\n\r\n"
    received = await receive_until_closed(stream, wait_s=5, until=until)
    if until not in received.data:
        raise common.BenchError(f"{kind}: no answer ({received})")
    await trio.sleep(0.2)  # the answer is over: the service waits on the client now
    return stream


async def released_after_ms(
    service: LiveService, job_id: str, kind: str, ending: str, bound_s: float
) -> float:
    pid = service.process.pid
    stream = await hold(service, job_id, kind)
    held = common.open_fds(pid)
    start = time.monotonic()
    if ending == "reset":
        await reset(stream)
    else:
        await stream.aclose()
    while common.open_fds(pid) >= held and time.monotonic() - start < bound_s:  # noqa: ASYNC110 (/proc, no event)
        await trio.sleep(POLL_S)
    return round((time.monotonic() - start) * 1000, 1)


async def measure(service: LiveService, job_id: str, args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for kind in KINDS:
        for ending in ENDINGS:
            times_ms = [
                await released_after_ms(service, job_id, kind, ending, args.bound_s)
                for _ in range(args.repeat)
            ]
            figures[f"{kind} {ending}"] = {
                "p50_ms": common.percentile(times_ms, 0.5),
                "max_ms": max(times_ms),
                "all_ms": times_ms,
            }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="connections per kind and ending")
    parser.add_argument("--bound-s", type=float, default=30.0, help="longest wait for one")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="bench-release-") as work,
        live_service(Path(work), ENVIRON) as service,
    ):
        job_id = service.submit(200)
        figures = trio.run(measure, service, job_id, args)
        service.client.delete(f"/api/generate/{job_id}")
    rows = [[name, f["p50_ms"], f["max_ms"]] for name, f in figures.items()]
    common.print_table(["connection, client's end", "p50 ms", "max ms"], rows)
    result = {"released_ms": figures, "settings": vars(args) | {"json": None}}
    result["machine"] = common.machine()
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
