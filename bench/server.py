"""A server process for the benchmarks: our service or the yardstick, with the bench provider.

    python -m bench.server --kind ours --port 8123        # settings from the environment
    python -m bench.server --kind yardstick --port 8124 --capacity 5

``--kind ours`` is ``python -m web`` (settings from the environment, the same logging) with
:class:`bench.provider.BenchProvider` passed to ``run_server(provider=...)``. ``SIGUSR1`` opens
the provider's gate; ``SIGTERM`` or ``SIGINT`` stops the server. ``--gc-log`` logs every full
collection over 5 ms; ``--tracemalloc`` makes ``SIGUSR2`` log memory allocated since the first
``SIGUSR2``, by owner; the other ``--gc-*`` options, ``--switch-interval`` and
``--sqlite-inline`` are experiments (the last patches the SQLite store in this process only:
:func:`patch_sqlite_inline`). ``--replicate-url`` gives the yardstick
:class:`bench.provider.ReplicateCallProvider` against that (fake) Replicate server instead.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx
import trio

from actors.providers.replicate_settings import DEFAULT_MODEL as REPLICATE_MODEL
from bench.provider import BenchProvider, ReplicateCallProvider
from bench.yardstick import Yardstick

T = TypeVar("T")


class GcWatch:
    """Logs every collection of the oldest generation that takes over 5 ms (``--gc-log``)."""

    def __init__(self) -> None:
        self._started = 0.0
        self.logger = logging.getLogger("bench.gc")

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
            return
        took_ms = (time.perf_counter() - self._started) * 1000
        if took_ms > 5:
            self.logger.warning(
                "gc: generation 2 took %.1f ms (%d collected)", took_ms, info["collected"]
            )


class MemoryWatch:
    """``--tracemalloc``: the first ``SIGUSR2`` takes a baseline, the next ones log what was
    allocated since, by owner (``memory: <owner>\t<KiB>\t<blocks>`` lines, then ``memory: end``).
    """

    def __init__(self) -> None:
        self.baseline: tracemalloc.Snapshot | None = None
        self.logger = logging.getLogger("bench.memory")

    def snapshot(self) -> None:
        snapshot = tracemalloc.take_snapshot()
        if self.baseline is None:
            self.baseline = snapshot
            self.logger.warning("memory: baseline")
            return
        by_owner: dict[str, list[int]] = {}
        for diff in snapshot.compare_to(self.baseline, "filename"):
            owner = owner_of(diff.traceback[0].filename)
            sizes = by_owner.setdefault(owner, [0, 0])
            sizes[0] += diff.size_diff
            sizes[1] += diff.count_diff
        for owner, (size, count) in sorted(by_owner.items(), key=lambda item: -item[1][0]):
            self.logger.warning("memory: %s\t%.1f\t%d", owner, size / 1024, count)
        self.logger.warning("memory: end")


def owner_of(filename: str) -> str:
    """``hypercorn``, ``ours: web/``, ``stdlib: json``... for a source file's path."""
    if filename.startswith(("<attrs generated", "<cattrs generated")):
        # "<attrs generated methods trio._core._run.Task>": the class's package
        return filename.rsplit(" ", 1)[-1].split(".", 1)[0]
    path = Path(filename)
    parts = path.parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].removesuffix(".py")
    for ours in ("actors", "web", "bench"):
        if ours in parts and parts[parts.index(ours) - 1] == Path(__file__).parents[1].name:
            return "bench/ (yardstick or provider)" if ours == "bench" else f"ours: {ours}/"
    top = path.stem if path.parent.name.startswith("python3") else path.parent.name
    if top in sys.stdlib_module_names or path.parent.name.startswith("python3"):
        return f"stdlib: {top}"
    return filename


def patch_sqlite_inline() -> None:
    """An experiment on the SQLite store, in this process only (the product code is unchanged):
    run its transactions on the Trio thread instead of handing each to a worker thread
    (``SQLiteStore._in_thread``), blocking the event loop for as long as a transaction takes.
    """
    from actors.store import sqlite as store_sqlite  # noqa: PLC0415 (ours only)

    async def in_trio_thread(
        self: store_sqlite.SQLiteStore,  # noqa: ARG001 (replaces a method)
        function: Callable[..., T],
        *args: object,
    ) -> T:
        await trio.lowlevel.checkpoint()
        return function(*args)

    store_sqlite.SQLiteStore._in_thread = in_trio_thread  # type: ignore[method-assign]
    logging.getLogger("bench.experiment").warning("sqlite: transactions on the Trio thread")


async def _watch_signals(
    provider: BenchProvider, shutdown: trio.Event, memory: MemoryWatch | None
) -> None:
    wanted = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
    with trio.open_signal_receiver(*wanted) as signals:
        async for signum in signals:
            if signum == signal.SIGUSR1:
                provider.open_gate()
            elif signum == signal.SIGUSR2:
                if memory is not None:
                    memory.snapshot()
            else:
                shutdown.set()
                return


async def _run(args: argparse.Namespace) -> None:
    provider = BenchProvider(seed=args.seed)
    shutdown = trio.Event()
    memory = MemoryWatch() if args.tracemalloc else None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, provider, shutdown, memory)
        if args.kind == "ours":
            # Imported here: the yardstick's process never loads the framework.
            from web.logs import configure_logging  # noqa: PLC0415
            from web.serve import run_server  # noqa: PLC0415
            from web.settings import load_settings  # noqa: PLC0415

            settings = load_settings()
            configure_logging(settings.log_level, settings.log_format)
            if args.sqlite_inline:
                patch_sqlite_inline()
            await nursery.start(
                partial(
                    run_server,
                    settings,
                    provider=provider,
                    bind=f"127.0.0.1:{args.port}",
                    shutdown=shutdown,
                    handle_signals=False,
                )
            )
            if args.gc_freeze:
                gc.freeze()
        else:
            async with httpx.AsyncClient(
                base_url=args.replicate_url or "http://127.0.0.1", timeout=120
            ) as client:
                calls = (
                    ReplicateCallProvider(client, token=args.replicate_token, model=REPLICATE_MODEL)
                    if args.replicate_url
                    else None
                )
                base_url = f"http://127.0.0.1:{args.port}"
                yardstick = Yardstick(calls or provider, capacity=args.capacity, base_url=base_url)
                await nursery.start(yardstick.serve, args.port)
                if args.gc_freeze:
                    gc.freeze()
                await shutdown.wait()
                nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["ours", "yardstick"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--capacity", type=int, default=5, help="the yardstick's (ours: env)")
    parser.add_argument("--seed", type=int, default=7, help="the provider's random faults")
    parser.add_argument("--gc-log", action="store_true", help="log slow full collections")
    parser.add_argument(
        "--gc-freeze", action="store_true", help="gc.freeze() once serving (an experiment)"
    )
    parser.add_argument(
        "--gc-threshold", type=int, help="gc.set_threshold(N, 10, 10) (an experiment)"
    )
    parser.add_argument(
        "--tracemalloc", action="store_true", help="SIGUSR2: memory allocated since a baseline"
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        help="sys.setswitchinterval(S), the GIL's hand-over interval (an experiment; 0.005)",
    )
    parser.add_argument(
        "--sqlite-inline",
        action="store_true",
        help="SQLite transactions on the Trio thread, not a worker thread (an experiment)",
    )
    parser.add_argument(
        "--replicate-url",
        help="the yardstick's images from this (fake) Replicate server, not the bench provider",
    )
    parser.add_argument("--replicate-token", default="", help="with --replicate-url")
    args = parser.parse_args()
    if args.gc_threshold:
        gc.set_threshold(args.gc_threshold, 10, 10)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    logging.basicConfig(level=logging.INFO)
    if args.gc_log:
        gc.callbacks.append(GcWatch())
    if args.tracemalloc:
        tracemalloc.start()
    trio.run(_run, args)


if __name__ == "__main__":
    main()
