"""Store cost: job throughput and event delivery with ``STORE=memory``, ``sqlite`` and ``redis``.

One run starts our service once per store of ``--stores`` (``python -m bench.server --kind
ours``, i.e. ``python -m web`` with the bench provider): with ``STORE=memory``; with
``STORE=sqlite`` and ``DATABASE_PATH`` in its own work directory (a temporary directory on the
same disk as ``/tmp``); with ``STORE=redis`` on ``--redis-url`` under a prefix of its own (its
keys deleted at the end). It keeps them all running. Then ``--rounds`` rounds go through them,
in one order then the reverse, so that drift of a shared machine falls on each alike; in each
round each server gets, in turn:

- **throughput**: :func:`bench.throughput.one_round`, unchanged: 10 clients on keep-alive
  connections create ``--jobs`` jobs of ``--images`` images (provider latency 0: the service is
  the bottleneck) and poll them to their end. jobs/s and images/s; server CPU per image (every
  thread of the process, so SQLite's worker thread counts).
- **delivery**: ``--delivery-jobs`` gated jobs one after the other (``bench.delivery``'s "few"
  method), each of ``--images`` images finishing 50 ms after the gate, then 20 ms apart, each
  followed by ``--sse`` SSE subscribers. Delivery = the subscriber's ``time.monotonic_ns()`` at
  the read that completed the event minus the provider's stamp in the image's URL.

Figures: the median round for throughput (and the median of the rounds' own store/memory
ratios); for delivery the percentiles of every round's deliveries together (each round's own p50
and p99 are in the JSON). The store's counters from ``GET /api/status`` (``store``: ``commits``,
``transactions``, ``largest_batch``) are read around each phase, so that SQLite's batching shows
as commits per transaction (for Redis: per batch, one script call each). Target: SQLite within
20 % of memory (rates >= 0.8x, times <= 1.2x); Redis is measured against the same yardstick.

Then, with both servers stopped, ``--breakdown`` times one event's commit in this process on an
idle store, piece by piece (the thread hop, the transaction at each ``DATABASE_SYNCHRONOUS``
level, the store's whole ``write().wait()``, and Redis's). ``--profile-rounds N`` samples each
server with py-spy over N more throughput rounds (not timed) and splits the samples of SQLite's
worker thread into waiting for the GIL, waiting for the disk, SQLite's C code and Python.

``--synchronous normal`` sets ``DATABASE_SYNCHRONOUS`` of the SQLite server; ``--server-args``
passes experiments to both servers (``--sqlite-inline``, ``--switch-interval``: see
``bench/server.py``). The JSON records the commit measured.

    .venv/bin/python -m bench.store --json bench/results/store.json
    .venv/bin/python -m bench.store --profile-rounds 5 --json bench/results/store-profile.json
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from actors.messages import ImageSnapshot, ImageStatus, JobStatus, ProgressEvent
from actors.store import sqlite as sqlite_store
from actors.store.base import AppendEvent, JobRecord, Operation, PutImages, PutJob
from actors.store.redis import open_client, open_redis_store
from bench import common, profiling, throughput

STORES = ("memory", "sqlite", "redis")
DATABASE_NAME = "imagegen.sqlite3"
#: SQLite/memory ratios within this much of 1 meet the target.
WITHIN = 0.20


def run_prefix(work: Path) -> str:
    """Where a run in ``work`` keeps its keys in Redis (deleted at its end)."""
    return f"bench-store:{work.name}:"


def redis_prefix(work_dir: Path) -> str:
    """The prefix of a Redis store used in ``work_dir`` (a directory of the run's)."""
    return f"{run_prefix(work_dir.parent)}{work_dir.name}:"


def store_env(
    store: str, work_dir: Path, synchronous: str | None = None, redis_url: str | None = None
) -> dict[str, str]:
    """``service_env`` for one store; SQLite's file goes into ``work_dir``."""
    if store == "redis":
        assert redis_url is not None
        prefix = redis_prefix(work_dir)
        return common.service_env(STORE="redis", REDIS_URL=redis_url, REDIS_PREFIX=prefix)
    if store != "sqlite":
        return common.service_env(STORE=store)
    env = common.service_env(STORE="sqlite", DATABASE_PATH=work_dir / DATABASE_NAME)
    if synchronous is not None:
        env["DATABASE_SYNCHRONOUS"] = synchronous
    return env


async def store_statistics(client: common.HttpClient) -> dict[str, Any]:
    """The ``store`` member of ``GET /api/status``."""
    status, view = await client.json("GET", "/api/status")
    if status != 200:
        raise common.BenchError(f"status answered {status}: {view}")
    stats = view["store"]
    assert isinstance(stats, dict)
    return stats


def counted(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Commits and transactions between two readings (memory has no transactions: 0)."""
    return {
        key: int(after.get(key) or 0) - int(before.get(key) or 0)
        for key in ("commits", "transactions", "failed_commits")
    }


async def delivery_round(
    server: common.Server, token: str, args: argparse.Namespace
) -> dict[str, Any]:
    """``--delivery-jobs`` gated jobs, one after the other, each with ``--sse`` subscribers."""
    measured = await common.run_gated_jobs(
        server,
        token,
        jobs=args.delivery_jobs,
        sse=args.sse,
        num_images=args.images,
        latency_ms=args.latency_ms,
        gap_ms=args.gap_ms,
    )
    return {
        "delivery_ms": measured.sse_ms,
        "complete": measured.complete,
        "subscribers": measured.subscribers,
    }


# --- the servers and the rounds ---------------------------------------------------------------


class Target:
    """One running service: its store's name, server, token and a connection for its status."""

    def __init__(
        self, store: str, work_dir: Path, server: common.Server, client: common.HttpClient
    ) -> None:
        self.store = store
        self.work_dir = work_dir
        self.server = server
        self.client = client
        self.rounds: list[dict[str, Any]] = []

    @property
    def token(self) -> str:
        assert self.client.token is not None
        return self.client.token

    def database_bytes(self) -> dict[str, int]:
        """Sizes of the SQLite file and its write-ahead log (none for memory)."""
        sizes: dict[str, int] = {}
        for suffix in ("", "-wal"):
            path = self.work_dir / f"{DATABASE_NAME}{suffix}"
            if path.exists():
                sizes[path.name] = path.stat().st_size
        return sizes


@asynccontextmanager
async def start(store: str, work_dir: Path, args: argparse.Namespace) -> AsyncIterator[Target]:
    """Our service with ``STORE=store`` running in ``work_dir`` (made by ``main``), logged in."""
    env = store_env(store, work_dir, args.synchronous, args.redis_url)
    capacity, server_args = args.capacity, args.server_args
    spawn = common.spawn_server(
        "ours", work_dir, env=env, capacity=capacity, extra_args=server_args
    )
    async with (
        spawn as server,
        await common.HttpClient.connect(server.port) as client,
    ):
        await client.login()
        yield Target(store, work_dir, server, client)


async def throughput_round(
    target: Target, args: argparse.Namespace, jobs: int | None = None
) -> dict[str, Any]:
    """:func:`bench.throughput.one_round` with this bench's settings."""
    return await throughput.one_round(
        target.server,
        target.token,
        jobs=args.jobs if jobs is None else jobs,
        images=args.images,
        clients=args.clients,
        poll_s=args.poll_ms / 1000,
    )


async def warm_up(target: Target, args: argparse.Namespace) -> None:
    """A small throughput round and a gated job, not measured."""
    await throughput_round(target, args, jobs=max(args.clients, args.jobs // 5))
    await common.run_gated_job(target.server, target.token, sse=args.sse, num_images=args.images)


async def measure_round(target: Target, args: argparse.Namespace, number: int) -> None:
    """One throughput round, then one delivery round, with the store's counters around each."""
    before = await store_statistics(target.client)
    jobs = await throughput_round(target, args)
    between = await store_statistics(target.client)
    delivery = await delivery_round(target.server, target.token, args)
    after = await store_statistics(target.client)
    target.rounds.append(
        {
            "round": number,
            "throughput": jobs,
            "throughput_store": counted(before, between),
            "delivery": delivery,
            "delivery_ms": common.summarize(delivery["delivery_ms"]),
            "delivery_store": counted(between, after),
        }
    )


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    targets: dict[str, Target] = {}
    t0 = time.perf_counter()
    async with AsyncExitStack() as stack:
        for store in args.stores:
            targets[store] = await stack.enter_async_context(start(store, work / store, args))
        for store in args.stores:
            await warm_up(targets[store], args)
        for number in range(args.rounds):
            order = args.stores if number % 2 == 0 else args.stores[::-1]
            for store in order:
                await measure_round(targets[store], args, number)
                print(
                    f"round {number + 1}/{args.rounds} {store}: "
                    f"{targets[store].rounds[-1]['throughput']['images_per_s']} images/s, "
                    f"delivery p50 {targets[store].rounds[-1]['delivery_ms'].get('p50')} ms",
                    flush=True,
                )
        result: dict[str, Any] = {}
        for store, target in targets.items():
            result[store] = summarize_store(target.rounds)
            result[store]["store_final"] = await store_statistics(target.client)
            result[store]["database_bytes"] = target.database_bytes()
            result[store]["full_gc"] = common.full_gc_pauses(target.server)
        if args.breakdown:
            result["breakdown"] = await breakdown(work, args.breakdown)
            if "redis" in args.stores:
                result["breakdown"] |= await redis_breakdown(work, args)
        if args.profile_rounds:
            result["profiles"] = {
                store: await profile(target, args, args.profile_dir / f"store-{store}.raw")
                for store, target in targets.items()
            }
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


# --- one event's commit, in this process -----------------------------------------------------


def event_operations(number: int) -> list[Operation]:
    """What a job writes when one image completes: its row, the image's row, the event."""
    now = datetime.now(UTC)
    job_id = f"breakdown-{number // 10}"
    index = number % 10
    url = f"/files/bench-{job_id}-{index}-{time.monotonic_ns()}.png"
    record = JobRecord(
        job_id=job_id,
        seq=number // 10 + 1,
        owner="test@example.com",
        prompt="bench latency=50 gap=20",
        num_images=10,
        idempotency_key=None,
        status=JobStatus.RUNNING,
        created_at=now,
    )
    image = ImageSnapshot(
        id=f"{job_id}-{index}",
        index=index,
        status=ImageStatus.COMPLETED,
        url=url,
        error=None,
        attempts=1,
        started_at=now,
        finished_at=now,
        wait_ms=0,
        provider_ms=50,
    )
    event = ProgressEvent(
        id=index + 1,
        index=index,
        status=ImageStatus.COMPLETED,
        url=url,
        error=None,
        attempts=1,
        started_at=now,
        finished_at=now,
    )
    return [PutJob(record), PutImages(job_id, (image,)), AppendEvent(job_id, event)]


def _timed_transactions(path: Path, synchronous: str, count: int) -> list[float]:
    connection = sqlite_store.open_database(path, synchronous)
    try:
        times = []
        for number in range(count):
            operations = event_operations(number)
            t0 = time.perf_counter()
            sqlite_store.write_transaction(connection, operations)
            times.append(1000 * (time.perf_counter() - t0))
        return times
    finally:
        connection.close()


async def breakdown(work: Path, count: int) -> dict[str, dict[str, float]]:
    """One event's commit on an idle store, in pieces (ms): the thread hop, the transaction with
    each ``DATABASE_SYNCHRONOUS`` level, and the store's whole ``write().wait()`` (default level).
    """

    def nothing() -> None:
        pass

    hops = []
    for _ in range(count):
        t0 = time.perf_counter()
        await trio.to_thread.run_sync(nothing)
        hops.append(1000 * (time.perf_counter() - t0))
    result = {"thread hop (trio.to_thread.run_sync of a no-op)": common.summarize(hops)}
    for synchronous in sqlite_store.SYNCHRONOUS:
        times = await trio.to_thread.run_sync(
            _timed_transactions, work / f"breakdown-{synchronous}.sqlite3", synchronous, count
        )
        key = f"write_transaction, synchronous={synchronous} (in its thread)"
        result[key] = common.summarize(times)
    waits = []
    async with sqlite_store.open_sqlite_store(work / "breakdown-store.sqlite3") as store:
        for number in range(count):
            operations = event_operations(number)
            t0 = time.perf_counter()
            await store.write(*operations).wait()
            waits.append(1000 * (time.perf_counter() - t0))
    result["SQLiteStore.write().wait() (full, idle store)"] = common.summarize(waits)
    return result


async def redis_breakdown(work: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """One event's commit on an idle Redis store, and a bare round trip (PING) for scale."""
    prefix = redis_prefix(work / "breakdown")
    pings, waits = [], []
    async with (
        open_redis_store(args.redis_url, prefix) as store,
        open_client(args.redis_url) as client,
    ):
        for _ in range(args.breakdown):
            t0 = time.perf_counter()
            await client.ping()
            pings.append(1000 * (time.perf_counter() - t0))
        for number in range(args.breakdown):
            operations = event_operations(number)
            t0 = time.perf_counter()
            await store.write(*operations).wait()
            waits.append(1000 * (time.perf_counter() - t0))
    return {
        "Redis PING round trip (coredis)": common.summarize(pings),
        "RedisStore.write().wait() (idle store, one script call)": common.summarize(waits),
    }


async def delete_redis_keys(url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` (what a run left in Redis)."""
    async with open_client(url) as client:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(keys[start : start + 1000])
    return len(keys)


# --- profiles ---------------------------------------------------------------------------------

#: Inclusive views of the store's own work, after :data:`bench.profiling.FEATURES`.
STORE_FEATURES: list[tuple[str, tuple[str, ...]]] = [
    ("store: SQLite (actors/store/sqlite.py)", ("(actors/store/sqlite.py",)),
    ("  transactions (write_transaction: worker thread, waits too)", ("write_transaction (",)),
    ("    event JSON (encode_event)", ("encode_event (actors/",)),
    ("  handing to the thread (to_thread_run_sync, Trio side)", ("to_thread_run_sync (trio/",)),
    ("store: memory (actors/store/memory.py)", ("(actors/store/memory.py",)),
    ("store: Redis (actors/store/redis.py)", ("(actors/store/redis.py",)),
    ("  Redis client (coredis)", ("(coredis/",)),
    ("job writes + publishing (JobActor._flush)", ("_flush (actors/job.py",)),
    ("new job stored (JobActor._store_new)", ("_store_new (actors/job.py",)),
]


def thread_samples(raw: Path) -> dict[str, int]:
    """The samples of Trio's worker threads (SQLite's transactions run there), by what they did.

    py-spy's own idle test does not see a thread that waits for the GIL (``take_gil`` is inlined:
    the stack ends in ``pthread_cond_timedwait``) or for the disk (``fdatasync``), so those are
    told apart here from the thread's CPU (SQLite's C code, Python). Idle cached threads (waiting
    for a job in ``PyThread_acquire_lock_timed``) are left out, as :func:`profiling.analyse`
    does. ``main thread: waiting for the GIL`` is the Trio thread's share of the same wait.
    """
    counts = dict.fromkeys(
        [
            "worker: waiting for the GIL",
            "worker: fdatasync (disk)",
            "worker: SQLite C code",
            "worker: Python (binding, JSON, datetimes)",
            "main thread: waiting for the GIL",
        ],
        0,
    )
    if not raw.exists():
        return counts
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit() or "PyThread_acquire_lock_timed" in stack:
            continue
        count = int(count_text)
        tail = " ".join(stack.split(";")[-2:])
        if "WorkerThread._work" not in stack:
            if "pthread_cond_timedwait" in tail and "epoll_wait (" not in stack:
                counts["main thread: waiting for the GIL"] += count
        elif "pthread_cond_timedwait" in tail:
            counts["worker: waiting for the GIL"] += count
        elif "fdatasync" in stack or "fsync (" in stack:
            counts["worker: fdatasync (disk)"] += count
        elif "(libsqlite3" in stack:
            counts["worker: SQLite C code"] += count
        else:
            counts["worker: Python (binding, JSON, datetimes)"] += count
    return counts


async def profile(target: Target, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """``--profile-rounds`` more throughput rounds under py-spy; what the samples say."""
    async with profiling.py_spy_record(target.server.pid, out, rate=args.rate):
        rounds = [await throughput_round(target, args) for _ in range(args.profile_rounds)]
    features = [*profiling.FEATURES, *STORE_FEATURES]
    analysis = profiling.analyse(out, features=features)
    analysis["images"] = sum(r["images_completed"] for r in rounds)
    analysis["threads"] = thread_samples(out)
    analysis["rounds"] = rounds
    analysis["rate"] = args.rate
    analysis["raw"] = str(out)
    return analysis


def print_profiles(profiles: dict[str, dict[str, Any]]) -> None:
    """Inclusive features side by side, as sampled time per image (samples / rate / images)."""
    if any("samples" not in analysis for analysis in profiles.values()):
        for analysis in profiles.values():
            profiling.print_analysis(analysis)
        return

    def us_per_image(analysis: dict[str, Any], pct: float) -> float:
        cpu_s = pct / 100 * int(analysis["samples"]) / int(analysis["rate"])
        return round(1e6 * cpu_s / max(int(analysis["images"]), 1), 1)

    memory, sqlite = profiles["memory"], profiles["sqlite"]
    rows: list[list[object]] = [
        ["all samples", us_per_image(memory, 100), us_per_image(sqlite, 100), 100.0, 100.0]
    ]
    for (feature, a), (_, b) in zip(
        memory["inclusive_pct_by_feature"], sqlite["inclusive_pct_by_feature"], strict=True
    ):
        rows.append([feature, us_per_image(memory, a), us_per_image(sqlite, b), a, b])
    for (label, a), b in zip(memory["threads"].items(), sqlite["threads"].values(), strict=True):
        rows.append(
            [
                f"(not CPU) {label}" if "wait" in label or "disk" in label else label,
                us_per_image(memory, 100 * a / memory["samples"]),
                us_per_image(sqlite, 100 * b / sqlite["samples"]),
                round(100 * a / memory["samples"], 1),
                round(100 * b / sqlite["samples"], 1),
            ]
        )
    sys.stdout.write("\nprofiles (py-spy, throughput rounds; samples of every thread)\n")
    headers = ["where (inclusive)", "memory us/image", "sqlite us/image", "memory %", "sqlite %"]
    common.print_table(headers, rows)
    for store, analysis in profiles.items():
        sys.stdout.write(f"\n{store}: self time by function (top 12)\n")
        common.print_table(["function", "%"], analysis["self_pct_by_function"][:12])


# --- figures ----------------------------------------------------------------------------------


def _median(rounds: list[dict[str, Any]], phase: str, key: str) -> float:
    return round(float(statistics.median(r[phase][key] for r in rounds)), 1)


def _sum(rounds: list[dict[str, Any]], phase: str, key: str) -> int:
    return sum(int(r[phase][key]) for r in rounds)


def summarize_store(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the throughput rounds, percentiles of every delivery, summed store counters."""
    deliveries = [ms for r in rounds for ms in r["delivery"]["delivery_ms"]]
    images = _sum(rounds, "throughput", "images_completed")
    counters: dict[str, Any] = {}
    for phase in ("throughput_store", "delivery_store"):
        commits = _sum(rounds, phase, "commits")
        transactions = _sum(rounds, phase, "transactions")
        counters[phase] = {
            "commits": commits,
            "transactions": transactions,
            "failed_commits": _sum(rounds, phase, "failed_commits"),
            "commits_per_transaction": round(commits / transactions, 2) if transactions else None,
        }
    counters["throughput_store"]["commits_per_image"] = round(
        counters["throughput_store"]["commits"] / max(images, 1), 2
    )
    return {
        "images_per_s": _median(rounds, "throughput", "images_per_s"),
        "jobs_per_s": _median(rounds, "throughput", "jobs_per_s"),
        "server_cpu_us_per_image": _median(rounds, "throughput", "server_cpu_us_per_image"),
        "server_cpu_pct": _median(rounds, "throughput", "server_cpu_pct"),
        "images_per_s_rounds": [r["throughput"]["images_per_s"] for r in rounds],
        "jobs_finished": _sum(rounds, "throughput", "jobs"),
        "images_completed": images,
        "delivery_ms": common.summarize(deliveries),
        "delivery_p50_rounds": [r["delivery_ms"].get("p50") for r in rounds],
        "delivery_p99_rounds": [r["delivery_ms"].get("p99") for r in rounds],
        "delivery_p99_median_round": statistics.median(
            r["delivery_ms"].get("p99", 0.0) for r in rounds
        ),
        "subscribers_complete": (
            f"{_sum(rounds, 'delivery', 'complete')}/{_sum(rounds, 'delivery', 'subscribers')}"
        ),
        **counters,
        "rounds": [
            {key: value for key, value in r.items() if key != "delivery"}
            | {"delivery": {k: v for k, v in r["delivery"].items() if k != "delivery_ms"}}
            for r in rounds
        ],
    }


def paired_ratio(memory: list[float], sqlite: list[float]) -> float | None:
    """The median of sqlite/memory over the rounds (each pair ran back to back)."""
    ratios = [b / a for a, b in zip(memory, sqlite, strict=True) if a]
    return round(statistics.median(ratios), 2) if ratios else None


def _git(*args: str) -> str:
    command = ["git", "-C", str(common.ROOT), *args]
    answer = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603 (fixed)
    return answer.stdout.strip()


def revision() -> dict[str, Any]:
    """The commit measured, and whether the product code (``actors/``, ``web/``) differs from it."""
    return {
        "commit": _git("rev-parse", "--short", "HEAD") or None,
        "product_code_modified": bool(_git("status", "--porcelain", "--", "actors", "web")),
    }


def verdict(ratio: float | None, higher_is_better: bool) -> str:
    if ratio is None:
        return "-"
    ok = ratio >= 1 - WITHIN if higher_is_better else ratio <= 1 + WITHIN
    return "yes" if ok else "no"


def table(result: dict[str, Any], stores: tuple[str, ...]) -> list[list[object]]:
    """One column per store, then each store's ratio to memory (the first store), then whether
    each ratio is within the target."""
    base, others = result[stores[0]], [result[store] for store in stores[1:]]
    columns = [result[store] for store in stores]
    rows: list[list[object]] = []
    compared: list[tuple[str, Callable[[dict[str, Any]], float], bool]] = [
        ("images/s (median round)", lambda s: s["images_per_s"], True),
        ("jobs/s (median round)", lambda s: s["jobs_per_s"], True),
        ("server CPU per image, us", lambda s: s["server_cpu_us_per_image"], False),
        ("delivery p50, ms", lambda s: s["delivery_ms"]["p50"], False),
        ("delivery p95, ms", lambda s: s["delivery_ms"]["p95"], False),
        ("delivery p99, ms", lambda s: s["delivery_ms"]["p99"], False),
        ("delivery max, ms", lambda s: s["delivery_ms"]["max"], False),
    ]
    for label, pick, higher in compared:
        rates = [common.ratio(pick(other), pick(base)) for other in others]
        targets = [verdict(rate, higher) if "max" not in label else "-" for rate in rates]
        rows.append([label, *(pick(column) for column in columns), *rates, " / ".join(targets)])

    def plain(label: str, values: list[object], rates: list[object] | None = None) -> None:
        rows.append([label, *values, *(rates or [None] * len(others)), "-"])

    plain(
        "images/s of each round",
        [" / ".join(f"{v:g}" for v in column["images_per_s_rounds"]) for column in columns],
    )
    plain(
        "throughput: images completed (all rounds)",
        [column["images_completed"] for column in columns],
    )
    plain(
        "images/s: median of the rounds' own ratios",
        [None] * len(columns),
        [
            paired_ratio(base["images_per_s_rounds"], other["images_per_s_rounds"])
            for other in others
        ],
    )
    plain(
        "SSE subscribers with every event", [column["subscribers_complete"] for column in columns]
    )
    for phase, label in (("throughput_store", "throughput"), ("delivery_store", "delivery")):
        plain(
            f"{label}: store commits / transactions (per txn)",
            [
                f"{c[phase]['commits']} / {c[phase]['transactions'] or '-'}"
                f" ({fmt_ratio(c[phase]['commits_per_transaction'])})"
                for c in columns
            ],
        )
    plain(
        "throughput: store commits per image",
        [column["throughput_store"]["commits_per_image"] for column in columns],
    )
    plain(
        "largest batch (commits in one transaction)",
        [column["store_final"].get("largest_batch", "-") for column in columns],
    )
    plain(
        "database file / WAL at the end, KiB",
        [
            " / ".join(f"{v / 1024:.0f}" for v in column["database_bytes"].values()) or "-"
            for column in columns
        ],
    )
    return rows


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per store")
    parser.add_argument("--jobs", type=int, default=200, help="jobs per throughput round")
    parser.add_argument("--images", type=int, default=10, help="images per job (5-20)")
    parser.add_argument("--clients", type=int, default=10, help="throughput's connections")
    parser.add_argument("--poll-ms", type=float, default=5, help="between polls of a running job")
    parser.add_argument("--capacity", type=int, default=10, help="MAX_CONCURRENCY of both")
    parser.add_argument("--delivery-jobs", type=int, default=8, help="gated jobs per round")
    parser.add_argument("--sse", type=int, default=3, help="SSE subscribers per gated job")
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--gap-ms", type=float, default=20, help="between a gated job's images")
    parser.add_argument(
        "--synchronous",
        choices=["full", "normal"],
        help="DATABASE_SYNCHRONOUS of the SQLite server (default: the service's, full)",
    )
    parser.add_argument(
        "--server-args",
        type=str.split,
        default=[],
        help="extra arguments of both python -m bench.server (experiments: "
        "'--sqlite-inline', '--switch-interval 0.0005')",
    )
    parser.add_argument(
        "--breakdown", type=int, default=500, help="in-process commits timed at the end (0: none)"
    )
    parser.add_argument(
        "--stores",
        type=lambda value: tuple(value.split(",")),
        default=STORES,
        help="comma-separated, memory first (the yardstick): memory,sqlite,redis",
    )
    parser.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/0", help="the Redis of STORE=redis"
    )
    parser.add_argument(
        "--profile-rounds",
        type=int,
        default=0,
        help="then py-spy each server over N more throughput rounds (not timed)",
    )
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--profile-dir", type=Path, default=Path("bench/results"), help="py-spy's raw samples"
    )
    parser.add_argument("--work-dir", type=Path, help="make the temporary work directory here")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.stores[0] != "memory" or not set(args.stores) <= set(STORES):
        parser.error(f"--stores: memory first, then any of {', '.join(STORES[1:])}")
    if args.profile_rounds:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=args.work_dir) as work:
        for store in args.stores:
            (Path(work) / store).mkdir()
        try:
            result = trio.run(run, args, Path(work))
        finally:
            if "redis" in args.stores:
                trio.run(delete_redis_keys, args.redis_url, run_prefix(Path(work)))
    result["settings"] = vars(args) | {
        "json": None,
        "work_dir": str(args.work_dir or ""),
        "profile_dir": str(args.profile_dir),
    }
    result["machine"] = common.machine()
    result["revision"] = revision()
    others = args.stores[1:]
    headers = ["figure", *args.stores, *(f"{store}/memory" for store in others), "within 20 %?"]
    sys.stdout.write(f"machine: {result['machine']}, revision: {result['revision']}\n")
    common.print_table(headers, table(result, args.stores))
    if result.get("breakdown"):
        sys.stdout.write(f"\none event's commit, in this process ({args.breakdown} times), ms\n")
        stats = ["p50", "p95", "p99", "mean"]
        common.print_table(
            ["piece", *stats],
            [
                [piece, *(values[stat] for stat in stats)]
                for piece, values in result["breakdown"].items()
            ],
        )
    if result.get("profiles"):
        print_profiles(result["profiles"])
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
