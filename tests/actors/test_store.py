"""The job store: one contract for every backend, then what only SQLite promises (real clock).

The Redis backend runs against the real Redis (tests/redis_support.py); what only it promises is
in test_store_redis.py.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import actors.store.sqlite as sqlite_backend
from actors.errors import StoreUnavailable
from actors.messages import (
    DoneEvent,
    ImageCopy,
    ImageSnapshot,
    ImageStatus,
    JobStatus,
    ProgressEvent,
)
from actors.store import (
    AppendEvent,
    DeleteJob,
    JobRecord,
    JobStore,
    MemoryStore,
    PutImages,
    PutJob,
    RemoteWork,
    SetCopy,
    SetRemote,
    SQLiteStore,
    StoredJob,
    commit,
    open_sqlite_store,
)
from actors.store.redis import open_redis_store
from actors.store.sqlite import SCHEMA_VERSION
from tests.redis_support import REDIS_URL, fresh_prefix, require_redis

#: Not UTC, with microseconds: a stored datetime must come back with both.
CREATED = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
LATER = CREATED + timedelta(seconds=7, microseconds=250)
PENDING = datetime(2026, 3, 1, 10, 31, 0, 5, tzinfo=UTC)


def job_record(job_id: str = "job-1", seq: int = 1, **changes: Any) -> JobRecord:
    record = JobRecord(
        job_id=job_id,
        seq=seq,
        owner="alice",
        prompt="a red fox",
        num_images=2,
        idempotency_key=f"key-{job_id}",
        status=JobStatus.RUNNING,
        created_at=CREATED,
    )
    return attrs.evolve(record, **changes)


def image(job_id: str = "job-1", index: int = 0, **changes: Any) -> ImageSnapshot:
    snapshot = ImageSnapshot(
        id=f"{job_id}-{index}",
        index=index,
        status=ImageStatus.RUNNING,
        url=None,
        error=None,
        attempts=1,
        started_at=CREATED,
        finished_at=None,
        wait_ms=15,
        provider_ms=0,
    )
    return attrs.evolve(snapshot, **changes)


def progress(event_id: int, index: int, **changes: Any) -> ProgressEvent:
    event = ProgressEvent(
        id=event_id,
        index=index,
        status=ImageStatus.COMPLETED,
        url=f"https://img.test/{index}.png",
        error=None,
        attempts=2,
        started_at=CREATED,
        finished_at=LATER,
    )
    return attrs.evolve(event, **changes)


DONE = DoneEvent(
    id=3, status=JobStatus.CANCELED, total_ms=7000, ttfi_ms=None, completed_count=0, failed_count=1
)


def new_job(job_id: str = "job-1", seq: int = 1) -> tuple[PutJob, PutImages]:
    return PutJob(job_record(job_id, seq)), PutImages(job_id, (image(job_id, 0), image(job_id, 1)))


async def only_job(store: JobStore) -> StoredJob:
    (stored,) = await store.load()
    return stored


@pytest.fixture(params=["memory", "sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    # Skipped here, outside Trio: a skip raised in an async fixture loses its reason.
    if request.param == "redis":
        require_redis()
    name: str = request.param
    return name


@pytest.fixture
async def store(backend: str, tmp_path: Path) -> AsyncIterator[JobStore]:
    if backend == "memory":
        yield MemoryStore()
        return
    if backend == "redis":
        async with fresh_prefix() as prefix, open_redis_store(REDIS_URL, prefix) as redis_store:
            yield redis_store
        return
    async with open_sqlite_store(tmp_path / "jobs.db") as sqlite_store:
        yield sqlite_store


# --- the contract (every backend) --------------------------------------------------------------


async def test_a_new_job_loads_as_written(store: JobStore) -> None:
    await commit(store, *new_job())

    assert await store.load() == (
        StoredJob(job=job_record(), images=(image(index=0), image(index=1)), events=()),
    )


async def test_datetimes_come_back_with_their_offset_and_microseconds(store: JobStore) -> None:
    await commit(store, *new_job(), SetRemote("job-1", 0, None, PENDING))

    stored = await only_job(store)

    assert stored.job.created_at.utcoffset() == timedelta(hours=2)
    assert stored.job.created_at.microsecond == 123456
    assert stored.images[0].started_at is not None
    assert stored.images[0].started_at.utcoffset() == timedelta(hours=2)
    assert stored.remote[0].pending_since is not None
    assert stored.remote[0].pending_since.utcoffset() == timedelta(0)
    assert stored.remote[0].pending_since.microsecond == 5


async def test_putting_a_job_again_updates_its_status_and_timings(store: JobStore) -> None:
    await commit(store, *new_job())
    finished = job_record(
        status=JobStatus.COMPLETED, finished_at=LATER, ttfi_ms=1500, total_ms=7000
    )

    await commit(store, PutJob(finished))

    assert (await only_job(store)).job == finished


async def test_putting_an_image_again_replaces_only_that_image(store: JobStore) -> None:
    await commit(store, *new_job())
    done = image(
        index=1,
        status=ImageStatus.FAILED,
        error="content policy",
        attempts=3,
        finished_at=LATER,
        provider_ms=2500,
    )

    await commit(store, PutImages("job-1", (done,)))

    assert (await only_job(store)).images == (image(index=0), done)


async def test_progress_and_done_events_round_trip_exactly(store: JobStore) -> None:
    failed = progress(2, 0, status=ImageStatus.FAILED, url=None, error="timed out", started_at=None)
    events = (progress(1, 1), failed, DONE)

    await commit(store, *new_job(), *(AppendEvent("job-1", event) for event in events))

    assert (await only_job(store)).events == events


async def test_remote_work_is_journaled_per_image_and_kept_when_images_change(
    store: JobStore,
) -> None:
    await commit(store, *new_job(), SetRemote("job-1", 1, None, PENDING))
    await commit(
        store, SetRemote("job-1", 1, "pred-1", None), SetRemote("job-1", 0, "pred-0", None)
    )

    await commit(store, PutImages("job-1", (image(index=0, attempts=2),)))

    assert (await only_job(store)).remote == (
        RemoteWork(
            job_id="job-1", index=0, prompt="a red fox", remote_id="pred-0", pending_since=None
        ),
        RemoteWork(
            job_id="job-1", index=1, prompt="a red fox", remote_id="pred-1", pending_since=None
        ),
    )


async def test_a_held_write_is_stored_with_its_jobs_next_write(store: JobStore) -> None:
    await commit(store, *new_job(), SetRemote("job-1", 0, None, PENDING))

    held = store.write_with_next(SetRemote("job-1", 0, "pred-0", None))
    await commit(store, PutImages("job-1", (image(index=0, status=ImageStatus.COMPLETED),)))

    assert held.settled
    await held.wait()
    (remote,) = (await only_job(store)).remote
    assert (remote.remote_id, remote.pending_since) == ("pred-0", None)


async def test_a_held_write_of_several_jobs_is_refused(store: JobStore) -> None:
    await commit(store, *new_job("job-1", 1), *new_job("job-2", 2))

    with pytest.raises(ValueError, match="exactly one job"):
        store.write_with_next(SetRemote("job-1", 0, "a", None), SetRemote("job-2", 0, "b", None))

    assert [stored.remote for stored in await store.load()] == [(), ()]


def image_copy(job_id: str = "job-1", index: int = 0, **changes: Any) -> ImageCopy:
    copy = ImageCopy(
        job_id=job_id,
        index=index,
        name=f"{job_id}-{index}.webp",
        source=f"https://replicate.delivery/{job_id}/out-{index}.webp",
    )
    return attrs.evolve(copy, **changes)


async def test_copies_are_journaled_per_image_the_last_write_of_one_winning(
    store: JobStore,
) -> None:
    await commit(store, *new_job(), SetCopy(image_copy(index=1)))
    await commit(
        store,
        SetCopy(image_copy(index=0)),
        SetCopy(image_copy(index=1, failed=True)),
        PutImages("job-1", (image(index=1, attempts=2),)),
    )

    assert (await only_job(store)).copies == (
        image_copy(index=0),
        image_copy(index=1, failed=True),
    )


async def test_deleting_a_job_removes_its_images_events_and_remote_work(store: JobStore) -> None:
    for job_id, seq in (("job-1", 1), ("job-2", 2)):
        await commit(
            store,
            *new_job(job_id, seq),
            AppendEvent(job_id, progress(1, 0)),
            SetRemote(job_id, 0, "pred", None),
            SetCopy(image_copy(job_id)),
        )

    await commit(store, DeleteJob("job-1"))

    assert [stored.job.job_id for stored in await store.load()] == ["job-2"]
    # Nothing of the deleted job lingers to be picked up by a job of the same id.
    await commit(store, PutJob(job_record("job-1", 3)))
    reborn = next(s for s in await store.load() if s.job.job_id == "job-1")
    assert (reborn.images, reborn.events, reborn.remote, reborn.copies) == ((), (), (), ())


async def test_jobs_load_oldest_first_by_seq_whatever_the_write_order(store: JobStore) -> None:
    for job_id, seq in (("c", 30), ("a", 10), ("b", 20)):
        await commit(store, PutJob(job_record(job_id, seq)))

    assert [stored.job.seq for stored in await store.load()] == [10, 20, 30]


async def test_writing_the_same_operations_again_stores_them_once(store: JobStore) -> None:
    operations = (
        *new_job(),
        AppendEvent("job-1", progress(1, 0)),
        AppendEvent("job-1", progress(2, 1)),
        SetRemote("job-1", 0, "pred-0", None),
        SetCopy(image_copy()),
    )
    await commit(store, *operations)
    once = await store.load()

    await commit(store, *operations)
    await commit(store, AppendEvent("job-1", progress(2, 1)))

    assert await store.load() == once
    assert [event.id for event in once[0].events] == [1, 2]


async def test_a_commit_is_visible_to_load_once_its_wait_returns(store: JobStore) -> None:
    pending = [store.write(PutJob(job_record(f"job-{n}", n))) for n in range(1, 6)]

    for each in pending:
        await each.wait()

    assert [stored.job.seq for stored in await store.load()] == [1, 2, 3, 4, 5]
    assert all(each.settled for each in pending)


async def test_cancelling_a_wait_does_not_cancel_the_write(store: JobStore) -> None:
    pending = store.write(*new_job())
    with trio.CancelScope() as cancel_scope:
        cancel_scope.cancel()
        await pending.wait()

    with trio.fail_after(5):
        await pending.wait()
    assert [stored.job.job_id for stored in await store.load()] == ["job-1"]


async def test_a_write_to_a_job_that_is_not_there_is_refused_whole(store: JobStore) -> None:
    await commit(store, PutJob(job_record("job-1", 1)))
    event = ProgressEvent(
        id=1,
        index=0,
        status=ImageStatus.COMPLETED,
        url="/files/x.png",
        error=None,
        attempts=1,
        started_at=None,
        finished_at=datetime(2026, 1, 1, tzinfo=UTC),
    )

    with pytest.raises(StoreUnavailable):
        await commit(store, AppendEvent("job-1", event), AppendEvent("ghost", event))

    (stored,) = await store.load()
    assert stored.events == ()
    assert (await store.check()).ok


async def test_an_idempotency_key_freed_by_a_delete_is_reused_in_the_same_batch(
    store: JobStore,
) -> None:
    await commit(store, PutJob(job_record("old", 1, idempotency_key="k")))
    # Retention forgets the old job and a new one takes its key, in one tick (one batch).
    delete = store.write(DeleteJob("old"))
    put = store.write(PutJob(job_record("new", 2, idempotency_key="k")))
    await delete.wait()
    await put.wait()

    assert [s.job.job_id for s in await store.load()] == ["new"]
    assert store.statistics()["failed_commits"] == 0


async def test_a_working_store_checks_ok(store: JobStore) -> None:
    await commit(store, *new_job())

    health = await store.check()

    assert (health.ok, health.detail) == (True, "ok")
    assert store.statistics()["backend"] == store.name


async def test_a_broken_memory_store_refuses_writes_and_reads_until_mended() -> None:
    store = MemoryStore()
    store.broken = "disk full"

    with pytest.raises(StoreUnavailable, match="disk full"):
        await commit(store, *new_job())
    with pytest.raises(StoreUnavailable, match="disk full"):
        await store.load()
    health = await store.check()
    assert (health.ok, health.detail) == (False, "disk full")

    store.broken = None
    await commit(store, *new_job())
    assert (await store.check()).ok
    assert len(await store.load()) == 1


# --- SQLite only -------------------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "jobs.db"


@pytest.fixture
def short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections give up on a lock after 50 ms instead of 5 s (same code path, faster)."""
    connect = sqlite_backend._connect

    def quick(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
        connection = connect(path, read_only=read_only)
        connection.execute("PRAGMA busy_timeout = 50")
        return connection

    monkeypatch.setattr(sqlite_backend, "_connect", quick)


async def test_a_locked_database_fails_a_whole_batch_at_once(
    db_path: Path, short_busy_timeout: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[int] = []
    write_transaction = sqlite_backend.write_transaction

    def counted(connection: sqlite3.Connection, operations: Any) -> None:
        attempts.append(len(operations))
        write_transaction(connection, operations)

    monkeypatch.setattr(sqlite_backend, "write_transaction", counted)
    async with open_sqlite_store(db_path) as store:
        blocker = sqlite3.connect(db_path, isolation_level=None)
        try:
            blocker.execute("BEGIN EXCLUSIVE")
            pending = [store.write(PutJob(job_record(f"job-{n}", n))) for n in range(1, 6)]
            for commit_ in pending:
                with pytest.raises(StoreUnavailable, match="database is locked"):
                    await commit_.wait()
        finally:
            blocker.close()

    # One attempt at the batch of five, not five more one by one (each waiting out the lock).
    assert attempts == [5]


async def test_writes_queued_in_one_tick_share_one_transaction(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        pending = [store.write(PutJob(job_record(f"job-{n}", n))) for n in range(1, 21)]
        for each in pending:
            await each.wait()
        stats = store.statistics()

    assert (stats["commits"], stats["transactions"], stats["largest_batch"]) == (20, 1, 20)
    assert (stats["failed_commits"], stats["error"], stats["queued"]) == (0, None, 0)


async def remote_ids_after_reopening(db_path: Path) -> list[tuple[int, str | None]]:
    """The one job's journaled remote ids, as a next start of the store finds them."""
    async with open_sqlite_store(db_path) as reopened:
        stored = await only_job(reopened)
    return [(work.index, work.remote_id) for work in stored.remote]


async def test_a_held_write_waits_for_its_job_and_shares_its_transaction(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        await commit(store, *new_job("job-1", 1), *new_job("job-2", 2))
        before = store.statistics()["transactions"]

        held = store.write_with_next(SetRemote("job-1", 0, "pred-0", None))
        await commit(store, PutImages("job-2", (image("job-2", 0, attempts=2),)))  # not its job
        assert not held.settled
        assert store.statistics()["held"] == 1
        assert [stored.remote for stored in await store.load()] == [(), ()]

        await commit(store, PutImages("job-1", (image("job-1", 0, attempts=2),)))
        assert [held.settled] == [True]  # (a list: mypy would take the assert above as final)
        stats = store.statistics()

    assert (before, stats["transactions"]) == (1, 3)  # job-2's, then job-1's carrying the note
    assert stats["held"] == 0
    async with open_sqlite_store(db_path) as reopened:
        job_1, _ = await reopened.load()
    assert [(work.index, work.remote_id) for work in job_1.remote] == [(0, "pred-0")]


async def test_a_held_write_is_held_again_when_its_carrier_fails_and_goes_with_the_retry(
    db_path: Path, short_busy_timeout: None
) -> None:
    async with open_sqlite_store(db_path) as store:
        await commit(store, *new_job())
        held = store.write_with_next(SetRemote("job-1", 0, "pred-0", None))
        blocker = sqlite3.connect(db_path, isolation_level=None)
        try:
            blocker.execute("BEGIN EXCLUSIVE")
            with pytest.raises(StoreUnavailable, match="database is locked"):
                await commit(store, PutImages("job-1", (image(attempts=2),)))
        finally:
            blocker.close()
        assert not held.settled  # held again, for the job's next try
        assert store.statistics()["held"] == 1

        await commit(store, PutImages("job-1", (image(attempts=2),)))
        await held.wait()

    assert await remote_ids_after_reopening(db_path) == [(0, "pred-0")]


async def test_a_held_write_with_no_next_write_is_stored_on_closing(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        await commit(store, *new_job())
        held = store.write_with_next(SetRemote("job-1", 1, "pred-1", None))

    await held.wait()
    assert await remote_ids_after_reopening(db_path) == [(1, "pred-1")]


async def test_a_bad_write_in_a_batch_fails_only_its_own_commit(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        good_job = store.write(*new_job())
        orphan = store.write(PutImages("no-such-job", (image("no-such-job", 0),)))
        good_event = store.write(AppendEvent("job-1", progress(1, 0)))

        await good_job.wait()
        with pytest.raises(StoreUnavailable, match="FOREIGN KEY"):
            await orphan.wait()
        await good_event.wait()

        stored = await only_job(store)
        health = await store.check()
        stats = store.statistics()

    assert (stored.job.job_id, stored.events) == ("job-1", (progress(1, 0),))
    assert (health.ok, health.detail) == (True, "ok")  # a refused write is no sign of ill health
    assert (stats["commits"], stats["failed_commits"], stats["error"]) == (2, 1, None)


async def test_a_locked_database_fails_writes_and_is_unhealthy_until_it_can_write_again(
    db_path: Path, short_busy_timeout: None
) -> None:
    async with open_sqlite_store(db_path) as store:
        await commit(store, *new_job())
        blocker = sqlite3.connect(db_path, isolation_level=None)
        try:
            blocker.execute("BEGIN EXCLUSIVE")
            with pytest.raises(StoreUnavailable, match="database is locked"):
                await commit(store, PutJob(job_record("job-2", 2)))
            failing = await store.check()
            assert store.statistics()["error"] == "database error: database is locked"
        finally:
            blocker.close()  # rolls the lock holder's transaction back
        # No job writes meanwhile: the check's own empty write finds the store working again.
        recovered = await store.check()
        await commit(store, PutJob(job_record("job-2", 2)))
        jobs = [stored.job.job_id for stored in await store.load()]

    assert (failing.ok, failing.detail) == (False, "database error: database is locked")
    assert (recovered.ok, recovered.detail) == (True, "ok")
    assert jobs == ["job-1", "job-2"]


async def test_a_second_store_on_the_same_database_is_refused(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        await commit(store, *new_job())
        with pytest.raises(
            StoreUnavailable, match=rf"in use by another process \(pid {os.getpid()}\)"
        ):
            async with open_sqlite_store(db_path):
                pytest.fail("two stores on one database")
    async with open_sqlite_store(db_path) as reopened:  # let go on close
        assert [stored.job.job_id for stored in await reopened.load()] == ["job-1"]


async def test_everything_stored_is_there_after_reopening(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        await commit(
            store,
            *new_job("job-1", 1),
            AppendEvent("job-1", progress(1, 1)),
            SetRemote("job-1", 0, None, PENDING),
            SetRemote("job-1", 1, "pred-1", None),
            SetCopy(image_copy(index=1, failed=True)),
        )
        await commit(
            store,
            PutJob(job_record("job-2", 2, status=JobStatus.COMPLETED, finished_at=LATER)),
            AppendEvent("job-2", DONE),
        )
        before = await store.load()

    async with open_sqlite_store(db_path) as reopened:
        after = await reopened.load()

    assert after == before
    assert len(after) == 2


def run_sql(path: Path, *statements: str) -> list[Any]:
    """Run ``statements`` on a connection of its own (blocking, for setting up and looking)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        rows: list[Any] = []
        for statement in statements:
            rows = connection.execute(statement).fetchall()
        return rows
    finally:
        connection.close()


def write_garbage(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"these are not the pages you are looking for\n" * 200)


async def test_a_database_of_a_newer_schema_is_refused_and_left_alone(db_path: Path) -> None:
    newer = SCHEMA_VERSION + 1
    run_sql(db_path, f"PRAGMA user_version = {newer}")

    with pytest.raises(StoreUnavailable, match=f"schema version {newer}, newer than"):
        async with open_sqlite_store(db_path):
            pytest.fail("a newer schema was opened")

    assert run_sql(db_path, "PRAGMA user_version") == [(newer,)]
    assert run_sql(db_path, "PRAGMA journal_mode") == [("delete",)]
    assert run_sql(db_path, "SELECT name FROM sqlite_master") == []


async def test_a_file_that_is_not_a_database_is_refused(db_path: Path) -> None:
    write_garbage(db_path)

    with pytest.raises(StoreUnavailable, match="not a database"):
        async with open_sqlite_store(db_path):
            pytest.fail("garbage was opened")


async def test_a_version_0_database_is_migrated_and_keeps_its_other_tables(db_path: Path) -> None:
    run_sql(db_path, "CREATE TABLE notes (text TEXT)", "INSERT INTO notes VALUES ('keep me')")

    async with open_sqlite_store(db_path) as store:
        await commit(store, *new_job())
        assert len(await store.load()) == 1

    assert run_sql(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    tables = {name for (name,) in run_sql(db_path, "SELECT name FROM sqlite_master")}
    assert {"jobs", "images", "events", "remote_work", "notes"} <= tables
    assert run_sql(db_path, "SELECT text FROM notes") == [("keep me",)]


async def test_a_version_1_database_is_migrated_with_its_jobs(db_path: Path) -> None:
    run_sql(db_path, *sqlite_backend.MIGRATIONS[0], "PRAGMA user_version = 1")
    run_sql(
        db_path,
        "INSERT INTO jobs (job_id, seq, owner, prompt, num_images, status, created_at) "
        "VALUES ('old', 1, 'alice', 'a fox', 5, 'completed', '2026-01-01T00:00:00+00:00')",
    )

    async with open_sqlite_store(db_path) as store:
        (stored,) = await store.load()

    assert (stored.job.job_id, stored.job.status) == ("old", JobStatus.COMPLETED)
    assert run_sql(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert SCHEMA_VERSION == 3


async def test_a_version_2_database_is_migrated_and_takes_copies(db_path: Path) -> None:
    run_sql(db_path, *sqlite_backend.MIGRATIONS[0], *sqlite_backend.MIGRATIONS[1])
    run_sql(db_path, "PRAGMA user_version = 2")
    run_sql(
        db_path,
        "INSERT INTO jobs (job_id, seq, owner, prompt, num_images, status, created_at) "
        "VALUES ('job-1', 1, 'alice', 'a fox', 2, 'running', '2026-01-01T00:00:00+00:00')",
    )

    async with open_sqlite_store(db_path) as store:
        await commit(store, SetCopy(image_copy()))
        (stored,) = await store.load()

    assert stored.copies == (image_copy(),)
    assert run_sql(db_path, "PRAGMA user_version") == [(3,)]


async def test_text_with_lone_surrogates_is_stored_not_fatal(store: JobStore) -> None:
    # A provider's error text can hold them (JSON "\udc80" decodes to one).
    failed = image(status=ImageStatus.FAILED, error="bad \udc80 output", finished_at=CREATED)

    await commit(store, *new_job(), PutImages("job-1", (failed,)))

    stored = await only_job(store)
    assert stored.images[0].error is not None
    assert stored.images[0].error.startswith("bad ")


async def test_writes_queued_just_before_closing_are_stored(db_path: Path) -> None:
    async with open_sqlite_store(db_path) as store:
        pending = [store.write(*new_job()), store.write(AppendEvent("job-1", progress(1, 0)))]
        assert not any(each.settled for each in pending)

    assert all(each.settled for each in pending)
    for each in pending:
        await each.wait()
    async with open_sqlite_store(db_path) as reopened:
        stored = await only_job(reopened)
    assert stored.events == (progress(1, 0),)


async def test_the_store_is_an_sqlite_store_with_the_path_it_was_opened_with(
    db_path: Path,
) -> None:
    async with open_sqlite_store(db_path) as store:
        assert isinstance(store, SQLiteStore)
        assert (store.name, store.resumable, store.statistics()["path"]) == (
            "sqlite",
            True,
            str(db_path),
        )
