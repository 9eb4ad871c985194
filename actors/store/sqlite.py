"""The embedded SQLite store (``STORE=sqlite``, the default): jobs survive restarts and crashes.

WAL mode with ``synchronous=FULL`` (``DATABASE_SYNCHRONOUS``): a commit is on disk when it
returns, and readers never block the writer. Every call into SQLite runs in a worker thread,
never on the Trio thread. One task writes: whatever was queued while the previous transaction
ran goes into the next one, so a burst of events from many jobs costs one fsync, not one per
event. The schema carries a version (``PRAGMA user_version``) and is migrated forward on open; a
file from a newer release is refused.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import trio

from actors.errors import StoreUnavailable
from actors.messages import ImageCopy, ImageSnapshot, ImageStatus, JobEvent, JobStatus
from actors.providers.base import Commit, RemoteWork
from actors.store.base import (
    AppendEvent,
    DeleteJob,
    JobRecord,
    Operation,
    PutImages,
    PutJob,
    SetCopy,
    SetRemote,
    StoredJob,
    StoreHealth,
    StoreStatistics,
)
from actors.store.codec import (
    decode_event,
    encode_event,
    parse_time as _parse_time,
    safe_text as _text,
    time_text as _time,
)
from actors.store.writer import BatchWriter

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Schema migrations: ``MIGRATIONS[n]`` takes a database from version ``n`` to ``n + 1``.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE jobs (
            job_id TEXT PRIMARY KEY,
            seq INTEGER NOT NULL UNIQUE,
            owner TEXT NOT NULL,
            prompt TEXT NOT NULL,
            num_images INTEGER NOT NULL,
            idempotency_key TEXT,
            status TEXT NOT NULL,
            created_at TEXT NOT NULL,
            finished_at TEXT,
            ttfi_ms INTEGER,
            total_ms INTEGER,
            UNIQUE (owner, idempotency_key)
        )""",
        """CREATE TABLE images (
            job_id TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            status TEXT NOT NULL,
            url TEXT,
            error TEXT,
            attempts INTEGER NOT NULL,
            started_at TEXT,
            finished_at TEXT,
            wait_ms INTEGER NOT NULL,
            provider_ms INTEGER NOT NULL,
            PRIMARY KEY (job_id, idx)
        ) WITHOUT ROWID""",
        """CREATE TABLE remote_work (
            job_id TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            remote_id TEXT,
            pending_since TEXT,
            PRIMARY KEY (job_id, idx)
        ) WITHOUT ROWID""",
        """CREATE TABLE events (
            job_id TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
            id INTEGER NOT NULL,
            body TEXT NOT NULL,
            PRIMARY KEY (job_id, id)
        ) WITHOUT ROWID""",
    ),
    # 2: a row /health rewrites to learn whether the store can write again after a failure.
    ("CREATE TABLE health (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at TEXT NOT NULL)",),
    # 3: copies of provider outputs still to be made (or failed), so a restart finishes them.
    (
        """CREATE TABLE copies (
            job_id TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            name TEXT NOT NULL,
            source TEXT NOT NULL,
            failed INTEGER NOT NULL,
            PRIMARY KEY (job_id, idx)
        ) WITHOUT ROWID""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

HEALTH_TIMEOUT_S = 2.0
#: How long closing the store may take to write what is still queued.
CLOSE_FLUSH_S = 10.0


def _connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    if read_only:
        uri = f"{path.resolve().as_uri()}?mode=ro"
        connection = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    else:
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA busy_timeout = 5000")
    return connection


#: ``PRAGMA synchronous`` levels offered: ``full`` syncs the WAL on every commit (a commit
#: survives a power cut); ``normal`` only at checkpoints (a commit survives a crash or ``kill -9``
#: of the process, not a power cut, and costs no fsync).
SYNCHRONOUS = ("full", "normal")


def open_database(path: Path, synchronous: str = "full") -> sqlite3.Connection:
    """Open (creating it if needed) and migrate the database at ``path``; blocking.

    Raises:
        StoreUnavailable: The file cannot be opened, is not a database, or is too new.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = _connect(path)
    except (OSError, sqlite3.Error) as exc:
        raise StoreUnavailable(f"cannot open the database {str(path)!r}: {exc}") from None
    try:
        # A file from a newer release is refused before anything about it changes.
        _check_version(connection)
        connection.execute("PRAGMA journal_mode = WAL")
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, not {synchronous!r}")
        connection.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        connection.execute("PRAGMA foreign_keys = ON")
        migrate(connection)
    except sqlite3.Error as exc:
        connection.close()
        raise StoreUnavailable(f"cannot use the database {str(path)!r}: {exc}") from None
    except StoreUnavailable:
        connection.close()
        raise
    return connection


def _check_version(connection: sqlite3.Connection) -> int:
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise StoreUnavailable(
            f"the database has schema version {version}, newer than this service knows "
            f"({SCHEMA_VERSION}); run the newer release or another DATABASE_PATH"
        )
    assert isinstance(version, int)
    return version


def migrate(connection: sqlite3.Connection) -> None:
    """Bring the schema to :data:`SCHEMA_VERSION`, one transaction per step."""
    version = _check_version(connection)
    for step in range(version, SCHEMA_VERSION):
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[step]:
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {step + 1}")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        logger.info("store: database migrated to schema version %d", step + 1)


_JOB_COLUMNS = (
    "job_id, seq, owner, prompt, num_images, idempotency_key, status, created_at, finished_at, "
    "ttfi_ms, total_ms"
)
_JOB_UPDATE = (
    " ON CONFLICT (job_id) DO UPDATE SET status = excluded.status, "
    "finished_at = excluded.finished_at, ttfi_ms = excluded.ttfi_ms, total_ms = excluded.total_ms"
)
_IMAGE_COLUMNS = (
    "job_id, idx, status, url, error, attempts, started_at, finished_at, wait_ms, provider_ms"
)
#: Rows per multi-row statement (SQLite allows 32,766 parameters in one).
_ROWS_PER_STATEMENT = 500

Row = tuple[object, ...]


def _job_row(record: JobRecord) -> Row:
    return (
        record.job_id,
        record.seq,
        _text(record.owner),
        _text(record.prompt),
        record.num_images,
        _text(record.idempotency_key),
        record.status.value,
        _time(record.created_at),
        _time(record.finished_at),
        record.ttfi_ms,
        record.total_ms,
    )


def _image_row(job_id: str, image: ImageSnapshot) -> Row:
    return (
        job_id,
        image.index,
        image.status.value,
        _text(image.url),
        _text(image.error),
        image.attempts,
        _time(image.started_at),
        _time(image.finished_at),
        image.wait_ms,
        image.provider_ms,
    )


def _insert(connection: sqlite3.Connection, head: str, rows: list[Row], tail: str = "") -> None:
    """``head VALUES (...), (...), ... tail``: many rows in one statement (one step of SQLite,
    so one release of the GIL, instead of one per row)."""
    if not rows:
        return
    width = len(rows[0])
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start : start + _ROWS_PER_STATEMENT]
        values = ", ".join(["(" + ", ".join("?" * width) + ")"] * len(chunk))
        parameters = [value for row in chunk for value in row]
        connection.execute(f"{head} VALUES {values}{tail}", parameters)


class _Rows:
    """Rows gathered for one multi-row statement per table (the last write of a row wins)."""

    def __init__(self) -> None:
        self.jobs: dict[str, Row] = {}
        self.images: dict[tuple[str, int], Row] = {}
        self.remote: dict[tuple[str, int], Row] = {}
        self.copies: dict[tuple[str, int], Row] = {}
        self.events: dict[tuple[str, int], Row] = {}

    def write(self, connection: sqlite3.Connection) -> None:
        """Parents first; then start afresh."""
        _insert(
            connection, f"INSERT INTO jobs ({_JOB_COLUMNS})", [*self.jobs.values()], _JOB_UPDATE
        )
        _insert(
            connection, f"INSERT OR REPLACE INTO images ({_IMAGE_COLUMNS})", [*self.images.values()]
        )
        _insert(
            connection,
            "INSERT OR REPLACE INTO remote_work (job_id, idx, remote_id, pending_since)",
            [*self.remote.values()],
        )
        _insert(
            connection,
            "INSERT OR REPLACE INTO copies (job_id, idx, name, source, failed)",
            [*self.copies.values()],
        )
        _insert(
            connection, "INSERT OR REPLACE INTO events (job_id, id, body)", [*self.events.values()]
        )
        for table in (self.jobs, self.images, self.remote, self.copies, self.events):
            table.clear()


def write_transaction(connection: sqlite3.Connection, operations: Iterable[Operation]) -> None:
    """Apply ``operations`` in one transaction (all or nothing), in order; blocking.

    Writes are upserts by primary key, so between two deletions only the last write of each row
    counts: those rows are gathered per table and written with one multi-row statement each (one
    step of SQLite, so one release of the GIL, instead of one per row).
    """
    rows = _Rows()
    connection.execute("BEGIN IMMEDIATE")
    try:
        for operation in operations:
            match operation:
                case PutJob(record):
                    rows.jobs[record.job_id] = _job_row(record)
                case PutImages(job_id, batch):
                    for image in batch:
                        rows.images[job_id, image.index] = _image_row(job_id, image)
                case AppendEvent(job_id, event):
                    body = _text(encode_event(event))
                    rows.events[job_id, event.id] = (job_id, event.id, body)
                case SetRemote(job_id, index, remote_id, pending_since):
                    row = (job_id, index, _text(remote_id), _time(pending_since))
                    rows.remote[job_id, index] = row
                case SetCopy(copy):
                    rows.copies[copy.job_id, copy.index] = (
                        copy.job_id,
                        copy.index,
                        copy.name,
                        _text(copy.source),
                        copy.failed,
                    )
                case DeleteJob(job_id):
                    rows.write(connection)
                    connection.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
        rows.write(connection)
        connection.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (a full disk, an I/O error).
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def read_all(connection: sqlite3.Connection) -> tuple[StoredJob, ...]:
    """Every job with its images, events and journal, in ``seq`` order; blocking."""
    images: dict[str, list[ImageSnapshot]] = {}
    for row in connection.execute(
        "SELECT job_id, idx, status, url, error, attempts, started_at, finished_at, wait_ms, "
        "provider_ms FROM images ORDER BY job_id, idx"
    ):
        images.setdefault(row[0], []).append(
            ImageSnapshot(
                id=f"{row[0]}-{row[1]}",
                index=row[1],
                status=ImageStatus(row[2]),
                url=row[3],
                error=row[4],
                attempts=row[5],
                started_at=_parse_time(row[6]),
                finished_at=_parse_time(row[7]),
                wait_ms=row[8],
                provider_ms=row[9],
            )
        )
    events: dict[str, list[JobEvent]] = {}
    for job_id, event_id, body in connection.execute(
        "SELECT job_id, id, body FROM events ORDER BY job_id, id"
    ):
        events.setdefault(job_id, []).append(decode_event(event_id, body))
    remote: dict[str, list[tuple[int, str | None, str | None]]] = {}
    for job_id, index, remote_id, pending in connection.execute(
        "SELECT job_id, idx, remote_id, pending_since FROM remote_work ORDER BY job_id, idx"
    ):
        remote.setdefault(job_id, []).append((index, remote_id, pending))
    copies: dict[str, list[ImageCopy]] = {}
    for job_id, index, name, source, failed in connection.execute(
        "SELECT job_id, idx, name, source, failed FROM copies ORDER BY job_id, idx"
    ):
        copies.setdefault(job_id, []).append(
            ImageCopy(job_id=job_id, index=index, name=name, source=source, failed=bool(failed))
        )
    jobs = []
    for row in connection.execute(
        "SELECT job_id, seq, owner, prompt, num_images, idempotency_key, status, created_at, "
        "finished_at, ttfi_ms, total_ms FROM jobs ORDER BY seq"
    ):
        created_at = _parse_time(row[7])
        assert created_at is not None
        record = JobRecord(
            job_id=row[0],
            seq=row[1],
            owner=row[2],
            prompt=row[3],
            num_images=row[4],
            idempotency_key=row[5],
            status=JobStatus(row[6]),
            created_at=created_at,
            finished_at=_parse_time(row[8]),
            ttfi_ms=row[9],
            total_ms=row[10],
        )
        work = tuple(
            RemoteWork(
                job_id=record.job_id,
                index=index,
                prompt=record.prompt,
                remote_id=remote_id,
                pending_since=_parse_time(pending),
            )
            for index, remote_id, pending in remote.get(record.job_id, ())
        )
        jobs.append(
            StoredJob(
                job=record,
                images=tuple(images.get(record.job_id, ())),
                events=tuple(events.get(record.job_id, ())),
                remote=work,
                copies=tuple(copies.get(record.job_id, ())),
            )
        )
    return tuple(jobs)


def _write_probe(connection: sqlite3.Connection) -> None:
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute(
            "INSERT OR REPLACE INTO health (id, checked_at) VALUES (1, ?)",
            (datetime.now(UTC).isoformat(),),
        )
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _probe(path: Path) -> None:
    """Open the file afresh, read-only, and read its header and a table; blocking."""
    connection = _connect(path, read_only=True)
    try:
        connection.execute("PRAGMA user_version").fetchone()
        connection.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()
    finally:
        connection.close()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"database error: {text}"


class SQLiteStore:
    """Jobs in one SQLite file, written by one task in batched transactions.

    Concurrency: opened with :func:`open_sqlite_store`, which owns the writer task and the
    connection. :meth:`write` is sync and only queues; the writer takes everything queued, runs it
    as one transaction in a worker thread (one thread at a time uses the connection), then settles
    each :class:`Commit`. If a batch is refused (a write the store will never take), each write
    in it is tried alone, so one bad write cannot fail another job's; if the database fails
    (locked, full, I/O), the whole batch fails at once. Closing writes what is still queued
    (bounded by :data:`CLOSE_FLUSH_S`) before the connection closes.
    """

    name = "sqlite"
    resumable = True

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._connection = connection
        self._thread = trio.CapacityLimiter(1)
        self._probes = trio.CapacityLimiter(1)
        self._writer = BatchWriter(self._transaction)
        self._last_error: str | None = None
        self._transactions = 0

    async def _in_thread(self, function: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(function, *args, limiter=self._thread)

    async def load(self) -> tuple[StoredJob, ...]:
        try:
            return await self._in_thread(read_all, self._connection)
        except (sqlite3.Error, ValueError, KeyError, TypeError) as exc:
            # A row this release cannot read: refuse to start rather than run on without it.
            raise StoreUnavailable(f"cannot read the stored jobs: {_describe(exc)}") from None

    def write(self, *operations: Operation) -> Commit:
        return self._writer.write(*operations)

    def write_with_next(self, *operations: Operation) -> Commit:
        return self._writer.write_with_next(*operations)

    async def check(self) -> StoreHealth:
        with trio.move_on_after(HEALTH_TIMEOUT_S):
            try:
                # A connection of its own, so a slow check never holds the writer up.
                # Its own thread limit: probes stuck on a hung file system pile up nowhere else.
                await trio.to_thread.run_sync(
                    _probe, self.path, abandon_on_cancel=True, limiter=self._probes
                )
            except (OSError, sqlite3.Error) as exc:
                return StoreHealth(ok=False, detail=_describe(exc))
            if self._last_error is not None:
                # The last write failed: write a row of its own (a page into the WAL, so a full
                # disk still fails), so that a store that works again says so without traffic.
                try:
                    await self._in_thread(_write_probe, self._connection)
                except sqlite3.Error as exc:
                    self._last_error = _describe(exc)
                else:
                    logger.info("store: writing again")
                    self._last_error = None
            if self._last_error is not None:
                return StoreHealth(ok=False, detail=self._last_error)
            return StoreHealth(ok=True, detail="ok")
        # Still the last write's error if there was one (a locked database also holds the probe).
        detail = self._last_error or f"no answer within {HEALTH_TIMEOUT_S:g} s"
        return StoreHealth(ok=False, detail=detail)

    def statistics(self) -> StoreStatistics:
        return {
            "backend": self.name,
            "path": str(self.path),
            **self._writer.statistics(),
            "transactions": self._transactions,
            "error": self._last_error,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until cancelled."""
        task_status.started()
        await self._writer.run()

    async def _transaction(self, operations: Sequence[Operation]) -> StoreUnavailable | None:
        try:
            await self._in_thread(write_transaction, self._connection, operations)
        except (sqlite3.IntegrityError, sqlite3.InterfaceError, ValueError, TypeError) as exc:
            # A write that contradicts the data or cannot be bound (a bug, or a job deleted
            # meanwhile): refused alone, and no sign that the store itself is unwell.
            logger.warning("store: write refused: %s", exc)
            return StoreUnavailable(_describe(exc), refused=True)
        except Exception as exc:  # sqlite3.Error above all: the writer must never die
            if not isinstance(exc, sqlite3.Error):
                logger.exception("store: write failed")
            if self._last_error is None:
                logger.error("store: write failed: %s", exc)
            self._last_error = _describe(exc)
            return StoreUnavailable(self._last_error)
        if self._last_error is not None and operations:  # an empty write proves nothing
            logger.info("store: writing again")
            self._last_error = None
        self._transactions += 1
        return None

    async def flush(self) -> None:
        """Write everything queued now (the writer task may be gone: closing does this)."""
        await self._writer.flush()

    def close(self) -> None:
        self._connection.close()


def lock_database(path: Path) -> int:
    """Hold ``{path}.lock`` exclusively for this process (a file descriptor; closing it lets go);
    blocking.

    Two processes on one database would each carry on the other's unfinished jobs (and resume
    the same predictions), so a second one is refused.

    Raises:
        StoreUnavailable: Another process holds the lock.
    """
    lock_path = path.with_name(f"{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreUnavailable(f"cannot open {str(lock_path)!r}: {exc}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(descriptor)
        raise StoreUnavailable(
            f"the database {str(path)!r} is in use by another process (pid {holder}); "
            "one service process per DATABASE_PATH"
        ) from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return descriptor


@asynccontextmanager
async def open_sqlite_store(path: Path, *, synchronous: str = "full") -> AsyncIterator[SQLiteStore]:
    """The store in ``path`` (created and migrated as needed), its writer running.

    Args:
        path: The database file.
        synchronous: ``full`` (the default) or ``normal``; see :data:`SYNCHRONOUS`.

    Raises:
        StoreUnavailable: The database cannot be opened or migrated.
    """
    lock = await trio.to_thread.run_sync(lock_database, path)
    try:
        connection = await trio.to_thread.run_sync(open_database, path, synchronous)
    except BaseException:
        os.close(lock)
        raise
    store = SQLiteStore(path, connection)
    logger.info(
        "store: sqlite %s (schema version %d, synchronous %s)", path, SCHEMA_VERSION, synchronous
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            try:
                yield store
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(CLOSE_FLUSH_S, shield=True):
            await store.flush()
        store._writer.fail_queued()
        with trio.move_on_after(CLOSE_FLUSH_S, shield=True):
            await trio.to_thread.run_sync(store.close, limiter=store._thread)
        os.close(lock)
