"""The Redis store (``STORE=redis``): jobs kept in a Redis server, under ``REDIS_PREFIX``.

Key layout (``P`` is the prefix, e.g. ``imagegen:``; every key of a deployment is under it, so
deployments and test runs share one server)::

    P seq                       string  the highest job seq stored (a new job's admission INCRs it)
    P jobs                      zset    every job id, scored by seq (load order)
    P job:<id>:record           hash    the job's fields (JobRecord; a None field is absent)
    P job:<id>:images           hash    image index -> JSON (ImageSnapshot)
    P job:<id>:remote           hash    image index -> JSON [prediction id, pending since]:
                                        the provider's journal (ids and creates in flight)
    P job:<id>:copies           hash    image index -> JSON [file name, provider URL, failed]:
                                        copies of outputs still to be made (or failed)
    P job:<id>:events           stream  the job's events; entry id ``<event id>-0``, field
                                        ``e`` the event's JSON, so ``Last-Event-ID: n`` is
                                        stream id ``n-0`` on any node (XRANGE/XREAD after it)
    P user:<owner>:jobs         zset    the user's job ids by seq (list order and cursors)
    P user:<owner>:idem         hash    idempotency key -> job id
    P user:<owner>:active       set     the user's unfinished jobs (the per-user limit)
    P finished                  zset    finished job ids by end time, ms (retention)
    P active                    hash    unfinished job id -> its number of images
    P active_images             string  the sum of ``P active`` (``MAX_QUEUED_IMAGES``)
    P bytes                     hash    job id -> bytes of its files in ``IMAGES_DIR``, as the
                                        nodes that wrote them counted (``IMAGES_MAX_BYTES``)
    P bytes_total               string  the sum of ``P bytes``
    P bytes_batch:<token>       string  a node's batch of bytes already added (an hour: a batch
                                        sent again after a lost answer is not added twice)
    P claim:<remote id>         string  ``<job id>\t<index>``: the image a prediction is taken
                                        for, so that no process gives it to a second image
    P job:<id>:claimed          set     the remote ids claimed for the job's images
    P health                    string  what ``check()`` writes to learn that writes work again

A cluster (``actors/cluster/``) adds the job queue, the leases and the nodes' wake streams.

Every name ends with a fixed part (``:record``, ``:jobs``, ...), so no id or owner can make one
key's name another's; ``P claim:<remote id>`` ends with a provider's id instead, and no job's
or user's key starts with ``claim:``. It is laid out for several nodes sharing the prefix: a
job's whole state and its event stream are reachable from any node, a user's list and
idempotency keys are global, and a new job's seq is allocated with INCR by its admission.

Writes: every operation queued while a batch was being written goes into the next batch, which
is one run of a Lua script (:data:`~actors.store.redis_scripts.BATCH`), atomic: it checks the
whole batch, then writes it, or writes nothing. Deleting a job removes every key of it. With a
node id (a cluster node's store) the script also fences: a job that exists is written only by
the node holding its lease, and a new job goes into the cluster's job queue with its first write.

Redis down, restarting or failing over: every call is bounded (:data:`CALL_TIMEOUT_S`); writes
fail with ``StoreUnavailable`` (a job waits and tries again, a new job gets 503), ``check()``
says what Redis answered, and the next write or check that gets through works again, without a
restart. What a Redis crash loses depends on its persistence settings (README).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import coredis
import coredis.exceptions
import coredis.retry
import trio
from coredis.response.types import StreamEntry

from actors.errors import StoreUnavailable
from actors.messages import ImageCopy, JobEvent, JobStatus
from actors.providers.base import Commit, RemoteWork
from actors.store import redis_scripts
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
    decode_image,
    encode_event,
    encode_image,
    parse_time,
    safe_text,
    time_text,
)
from actors.store.writer import BatchWriter
from actors.tasks import uncancelled

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How long one Redis call may take (a batch, a load chunk, a renewal) before it fails.
CALL_TIMEOUT_S = 5.0
#: How long opening a connection may take.
CONNECT_TIMEOUT_S = 2.0
#: How long ``check()`` waits for Redis.
HEALTH_TIMEOUT_S = 2.0
#: How long a job's lease lives without a renewal (``JOB_LEASE_S``; renewed every third of it).
JOB_LEASE_S = 5.0
#: How long closing the store may take to write what is still queued.
CLOSE_FLUSH_S = 10.0
#: Jobs read per pipelined round trip by ``load()``.
LOAD_CHUNK = 100

#: What a call can raise when Redis is unreachable, restarting, or answers an error.
_REDIS_ERRORS = (coredis.exceptions.RedisError, OSError, trio.BrokenResourceError, EOFError)


class RedisKeys:
    """The names of the keys under ``prefix`` (the layout is in the module docstring)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.seq = f"{prefix}seq"
        self.jobs = f"{prefix}jobs"
        self.health = f"{prefix}health"

    def job(self, job_id: str, part: str) -> str:
        return f"{self.prefix}job:{job_id}:{part}"

    def user(self, owner: str, part: str) -> str:
        return f"{self.prefix}user:{owner}:{part}"

    def lease(self, job_id: str) -> str:
        return f"{self.prefix}lease:{job_id}"


def redacted(url: str) -> str:
    """``url`` without its password (for messages and statistics)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit(parts._replace(netloc=f"{user}{host}"))


# --- operations as script arguments, and records back --------------------------------------


def _record_fields(record: JobRecord) -> list[str]:
    fields: dict[str, str | int | None] = {
        "seq": record.seq,
        "owner": safe_text(record.owner),
        "prompt": safe_text(record.prompt),
        "num_images": record.num_images,
        "idempotency_key": safe_text(record.idempotency_key),
        "status": record.status.value,
        "created_at": time_text(record.created_at),
        "finished_at": time_text(record.finished_at),
        "ttfi_ms": record.ttfi_ms,
        "total_ms": record.total_ms,
    }
    return [str(field) for pair in fields.items() if pair[1] is not None for field in pair]


def _key_arguments(idempotency_key: str | None) -> list[str]:
    idem = safe_text(idempotency_key)
    return ["0", ""] if idem is None else ["1", idem]


def batch_arguments(operations: Sequence[Operation]) -> list[str]:
    """``operations`` as the batch script's ARGV after its first three (see the script)."""
    args: list[str] = []
    for operation in operations:
        match operation:
            case PutJob(record):
                fields = _record_fields(record)
                args += ["J", record.job_id, str(record.seq), safe_text(record.owner) or ""]
                args += _key_arguments(record.idempotency_key)
                finished = record.finished_at if record.status.finished else None
                args += ["" if finished is None else str(round(finished.timestamp() * 1000))]
                args += [str(len(fields) // 2), *fields]
            case PutImages(job_id, images):
                args += ["I", job_id, str(len(images))]
                for image in images:
                    args += [str(image.index), encode_image(image)]
            case AppendEvent(job_id, event):
                args += ["E", job_id, str(event.id), encode_event(event)]
            case SetRemote(job_id, index, remote_id, pending_since):
                body = json.dumps([remote_id, time_text(pending_since)])
                args += ["R", job_id, str(index), body]
            case SetCopy(copy):
                body = json.dumps([copy.name, safe_text(copy.source), copy.failed])
                args += ["C", copy.job_id, str(copy.index), body]
            case DeleteJob(job_id):
                args += ["D", job_id]
    return args


def _optional_int(value: str | None) -> int | None:
    return None if value is None else int(value)


def decode_record(job_id: str, fields: dict[str, str]) -> JobRecord:
    created_at = parse_time(fields["created_at"])
    assert created_at is not None
    return JobRecord(
        job_id=job_id,
        seq=int(fields["seq"]),
        owner=fields["owner"],
        prompt=fields["prompt"],
        num_images=int(fields["num_images"]),
        idempotency_key=fields.get("idempotency_key"),
        status=JobStatus(fields["status"]),
        created_at=created_at,
        finished_at=parse_time(fields.get("finished_at")),
        ttfi_ms=_optional_int(fields.get("ttfi_ms")),
        total_ms=_optional_int(fields.get("total_ms")),
    )


def event_id(stream_id: str) -> int:
    """The event id of a job's stream entry (``<event id>-0``)."""
    return int(stream_id.partition("-")[0])


def _event(entry: StreamEntry) -> JobEvent:
    # The client decodes answers (decode_responses=True): these are str.
    return decode_event(event_id(str(entry.identifier)), str(entry.field_values["e"]))


#: One job as read: its record, images, remote work and copies (hashes), then its events.
_Row = tuple[dict[str, str], dict[str, str], dict[str, str], dict[str, str], Sequence[StreamEntry]]


def _stored_job(job_id: str, row: _Row) -> StoredJob:
    record, images, remote, copies, events = row
    job = decode_record(job_id, record)
    work = []
    for index, body in sorted(remote.items(), key=lambda item: int(item[0])):
        remote_id, pending = json.loads(body)
        work.append(
            RemoteWork(
                job_id=job_id,
                index=int(index),
                prompt=job.prompt,
                remote_id=remote_id,
                pending_since=parse_time(pending),
            )
        )
    return StoredJob(
        job=job,
        images=tuple(
            decode_image(job_id, body)
            for _, body in sorted(images.items(), key=lambda item: int(item[0]))
        ),
        events=tuple(_event(entry) for entry in events),
        remote=tuple(work),
        copies=tuple(
            _copy(job_id, int(index), body)
            for index, body in sorted(copies.items(), key=lambda item: int(item[0]))
        ),
    )


def _copy(job_id: str, index: int, body: str) -> ImageCopy:
    name, source, failed = json.loads(body)
    return ImageCopy(job_id=job_id, index=index, name=name, source=source, failed=failed)


# --- the store ---------------------------------------------------------------------------------


class RedisStore:
    """Jobs in Redis, written by one task in atomic batches.

    Args:
        client: An entered ``coredis.Redis`` with ``decode_responses=True``.
        url: Where Redis is (for messages; never shown with its password).
        prefix: The start of every key of this deployment.
        node: The id of the cluster node this store writes for: its writes of a job are fenced
            by the job's lease, and new jobs go into the job queue. ``None``: a store used
            alone (tests, tools), nothing fenced or queued.
        lease_s: How long a job's lease outlives its last renewal (a lapsed lease is taken
            again by the node's next write of the job).

    Concurrency: opened with :func:`open_redis_store`, which runs :meth:`run` (the writer).
    :meth:`write` is sync and only queues; the writer runs everything queued as one script
    call, then settles each :class:`Commit`. A refused batch is tried write by write (so a job
    whose lease another node holds fails alone, ``fenced``); a failing Redis fails the whole
    batch at once. Every call is bounded by :data:`CALL_TIMEOUT_S`.
    """

    name = "redis"
    resumable = True

    def __init__(
        self,
        client: coredis.Redis[str],
        *,
        url: str,
        prefix: str,
        node: str | None = None,
        lease_s: float = JOB_LEASE_S,
    ) -> None:
        self.url = redacted(url)
        self.keys = RedisKeys(prefix)
        self.node = node
        self._client = client
        self._lease_ms = max(1, round(lease_s * 1000))
        self._batch = client.register_script(redis_scripts.BATCH)
        self._claim = client.register_script(redis_scripts.CLAIM)
        self._writer = BatchWriter(self._transaction)
        #: Bounds of one call and of ``check()``'s wait (attributes, so tests can shorten them).
        self.call_timeout_s = CALL_TIMEOUT_S
        self.health_timeout_s = HEALTH_TIMEOUT_S
        self._last_error: str | None = None
        self._batches = 0
        self._calls = 0
        #: Since when (Trio's clock) this process's calls have reached Redis without one
        #: failing to; ``None`` from a failure until the next call that reaches it.
        self.reached_since: float | None = None

    @property
    def client(self) -> coredis.Redis[str]:
        """The entered client (shared with the cluster's calls and ``actors.limits``)."""
        return self._client

    # -- calls ----------------------------------------------------------------------------

    async def _call(
        self, what: str, call: Callable[[], Awaitable[T]], timeout_s: float | None = None
    ) -> T:
        """``call()`` within ``timeout_s`` (:attr:`call_timeout_s`); Redis's errors become
        ``StoreUnavailable``."""
        if timeout_s is None:
            timeout_s = self.call_timeout_s
        self._calls += 1
        try:
            with trio.fail_after(timeout_s):
                result = await uncancelled(call)  # (coredis loses a slot to a cancellation)
        except trio.TooSlowError:
            # The client keeps a connection whose answer is late (it multiplexes requests on
            # it, and a timeout does not close it): one that went silent for good (a vanished
            # host, no reset) would fail every later call. Start afresh instead.
            self._client.connection_pool.disconnect()
            self.lost_contact()
            raise StoreUnavailable(
                f"Redis at {self.url} did not answer {what} within {timeout_s:g} s"
            ) from None
        except coredis.exceptions.ResponseError as exc:
            if isinstance(exc, coredis.exceptions.ReadOnlyError):
                self.lost_contact()  # a replica answered: a failover is under way
            text = str(exc)
            if text.startswith("REFUSED "):
                raise StoreUnavailable(text.removeprefix("REFUSED "), refused=True) from None
            if text.startswith("FENCED "):
                job_id = text.removeprefix("FENCED ")
                raise StoreUnavailable(
                    f"job {job_id} is run by another node now", fenced=True
                ) from None
            raise StoreUnavailable(f"Redis at {self.url} answered {what}: {text}") from None
        except _REDIS_ERRORS as exc:
            self.lost_contact()
            detail = str(exc) or type(exc).__name__
            raise StoreUnavailable(f"Redis at {self.url} failed {what}: {detail}") from None
        if self.reached_since is None:
            self.reached_since = trio.current_time()
        return result

    def lost_contact(self) -> None:
        """Note that a call of this process failed to reach Redis (see :attr:`reached_since`)."""
        self.reached_since = None

    # -- the protocol ------------------------------------------------------------------------

    async def load(self) -> tuple[StoredJob, ...]:
        client = self._client
        job_ids: tuple[str, ...] = tuple(
            await self._call("reading the jobs", lambda: client.zrange(self.keys.jobs, 0, -1))
        )
        stored: list[StoredJob] = []
        for start in range(0, len(job_ids), LOAD_CHUNK):
            chunk = job_ids[start : start + LOAD_CHUNK]
            rows = await self._call("reading the jobs", partial(self._read, chunk))
            try:
                stored.extend(
                    _stored_job(job_id, row)
                    for job_id, row in zip(chunk, rows, strict=True)
                    # A job without its record is one deleted meanwhile.
                    if row[0]
                )
            except (KeyError, ValueError, TypeError, IndexError) as exc:
                # A job this release cannot read: refuse to start rather than run on without it.
                raise StoreUnavailable(
                    f"Redis at {self.url}: cannot read the stored jobs: {exc!r}"
                ) from None
        return tuple(stored)

    async def load_job(self, job_id: str, *, events: bool = True) -> StoredJob | None:
        """One job as stored now (any node's), or ``None`` if there is no such job; without
        ``events``, its events are not read (``events`` is empty).

        Raises:
            StoreUnavailable: Redis cannot be read.
        """
        jobs = await self._load_chunk([job_id], events=events)
        return jobs[0] if jobs else None

    async def load_page(
        self, owner: str, *, limit: int, before: int | None = None
    ) -> tuple[tuple[StoredJob, ...], int | None]:
        """``owner``'s jobs, newest first: up to ``limit`` with a seq below ``before``, and the
        cursor of the next page (``None`` on the last one).

        Raises:
            StoreUnavailable: Redis cannot be read.
        """
        top = 2**62 if before is None else before - 1  # seqs are integers
        key = self.keys.user(owner, "jobs")
        found = await self._call(
            "reading a list of jobs",
            partial(
                self._client.zrange,
                key,
                top,  # with REV, the range runs from the highest score down
                0,
                sortby=coredis.PureToken.BYSCORE,
                rev=True,
                offset=0,
                count=limit + 1,
            ),
        )
        job_ids = [str(member) for member in found]
        jobs = await self._load_chunk(job_ids[:limit], events=False)
        more = len(job_ids) > limit and len(jobs) == limit
        return jobs, jobs[-1].job.seq if more else None

    async def _load_chunk(
        self, job_ids: Sequence[str], *, events: bool = True
    ) -> tuple[StoredJob, ...]:
        if not job_ids:
            return ()
        rows = await self._call("reading jobs", partial(self._read, job_ids, events=events))
        try:
            return tuple(
                _stored_job(job_id, row)
                for job_id, row in zip(job_ids, rows, strict=True)
                if row[0]
            )
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise StoreUnavailable(f"Redis at {self.url}: cannot read a job: {exc!r}") from None

    async def _read(self, job_ids: Sequence[str], *, events: bool = True) -> list[_Row]:
        keys = self.keys
        async with self._client.pipeline(transaction=False) as pipe:
            pending = [
                (
                    pipe.hgetall(keys.job(job_id, "record")),
                    pipe.hgetall(keys.job(job_id, "images")),
                    pipe.hgetall(keys.job(job_id, "remote")),
                    pipe.hgetall(keys.job(job_id, "copies")),
                    pipe.xrange(keys.job(job_id, "events"), "-", "+") if events else None,
                )
                for job_id in job_ids
            ]
        rows: list[_Row] = []
        for record, images, remote, copies, stream in pending:
            rows.append(
                (
                    dict(await record),
                    dict(await images),
                    dict(await remote),
                    dict(await copies),
                    () if stream is None else await stream,
                )
            )
        return rows

    def write(self, *operations: Operation) -> Commit:
        return self._writer.write(*operations)

    def write_with_next(self, *operations: Operation) -> Commit:
        return self._writer.write_with_next(*operations)

    async def flush(self) -> None:
        """Return once everything queued before now was written, or failed (a node hands its
        jobs over after this). The writer task writes it: an empty write queued last settles
        once every batch before it is over. Held writes go too: the jobs' own next writes
        will not come from this node."""
        self._writer.release_held()
        with contextlib.suppress(StoreUnavailable):
            await self._writer.write().wait()

    async def _transaction(self, operations: Sequence[Operation]) -> StoreUnavailable | None:
        args = [self.keys.prefix, self.node or "", str(self._lease_ms)]
        args += batch_arguments(operations)
        try:
            await self._call("a write", lambda: self._batch(keys=[], args=args))
        except StoreUnavailable as exc:
            if exc.fenced:
                logger.info("store: write fenced: %s", exc)
                return exc
            if exc.refused:
                logger.warning("store: write refused: %s", exc)
                return exc
            if self._last_error is None:
                logger.error("store: write failed: %s", exc)
            self._last_error = str(exc)
            return exc
        if self._last_error is not None and operations:
            logger.info("store: writing again")
            self._last_error = None
        self._batches += 1
        return None

    async def admit(
        self,
        operations: Sequence[Operation],
        *,
        max_active: int,
        max_queued_images: int,
        take: int | None = None,
    ) -> tuple[str, str | None, int]:
        """Write a new job's first write (``operations``, its record first) if its owner may
        have one more unfinished job and its images fit in the queue, atomically with those
        checks and with its idempotency key's: one script call of its own (not through the
        writer: its answer is the caller's). With ``take`` (a cluster node that may run the
        job), the node takes the new job's queue entry and lease in the same call, unless
        other jobs wait in the queue for a node (the new one then queues behind them) or the
        node runs more than twice as many jobs as another node taking jobs, plus ``take``.
        A record of seq 0 is given the next seq in the same call, once every check has passed
        (``INCR P seq``: cluster-wide, newest largest).

        Returns:
            ``(outcome, detail, seq)``, ``seq`` the new job's once written: ``("admitted", None,
            seq)``; ``("taken", queue entry id, seq)``: admitted, and the job is this node's to
            run (its lease is held, its entry pending in the node's name); or, nothing written
            (seq 0), ``("held", job id, 0)``: the job's idempotency key is that job's,
            ``("limit", unfinished jobs, 0)``: the owner has ``max_active`` unfinished jobs or
            more, or ``("busy", images, 0)``: the images of unfinished jobs (every node's) and
            the new job's are more than ``max_queued_images``.

        Raises:
            StoreUnavailable: Redis cannot be reached, or refused the write.
        """
        first = operations[0]
        assert isinstance(first, PutJob), "a new job's first write starts with its record"
        record = first.record
        args = [self.keys.prefix, self.node or "", str(self._lease_ms)]
        args += ["A", record.job_id, safe_text(record.owner) or ""]
        args += [*_key_arguments(record.idempotency_key), str(max_active)]
        args += [str(record.num_images), str(max_queued_images), "" if take is None else str(take)]
        args += batch_arguments(operations)
        answer: Any = await self._call("admitting a job", lambda: self._batch(keys=[], args=args))
        if not isinstance(answer, list):  # (the script answers a list to every admission)
            raise StoreUnavailable(f"Redis at {self.url} answered admitting a job: {answer!r}")
        outcome, detail = str(answer[0]), str(answer[1])
        if outcome in ("admitted", "taken"):
            self._batches += 1
            return outcome, detail or None, int(answer[2])
        return outcome, detail, 0

    async def claim_remote(self, remote_id: str, job_id: str, index: int) -> bool:
        """Take ``remote_id`` for image ``index`` of ``job_id``, for every process on the
        prefix: ``True`` if it is that image's (now, or already), ``False`` if another image's.

        Raises:
            StoreUnavailable: Redis cannot be reached.
        """
        args = [self.keys.prefix, remote_id, job_id, str(index)]
        answer: Any = await self._call(
            "claiming a prediction", lambda: self._claim(keys=[], args=args)
        )
        return bool(int(answer))

    async def check(self) -> StoreHealth:
        try:
            await self._call("PING", self._client.ping, self.health_timeout_s)
            if self._last_error is not None:
                # The last write failed: write a key of our own, so that a Redis that takes
                # writes again (back up, or a replica promoted) says so without traffic.
                now = datetime.now(UTC).isoformat()
                await self._call(
                    "a write",
                    lambda: self._client.set(self.keys.health, now),
                    self.health_timeout_s,
                )
                logger.info("store: writing again")
                self._last_error = None
        except StoreUnavailable as exc:
            return StoreHealth(ok=False, detail=str(exc))
        return StoreHealth(ok=True, detail="ok")

    def statistics(self) -> StoreStatistics:
        return {
            "backend": self.name,
            "url": self.url,
            "prefix": self.keys.prefix,
            **self._writer.statistics(),
            "transactions": self._batches,
            "redis_calls": self._calls,
            "error": self._last_error,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._writer.run)
            task_status.started()


def open_client(url: str) -> coredis.Redis[str]:
    """A client for ``url`` (to be entered once, by the task that owns it).

    ``stream_timeout`` bounds every read of an answer, so it must outlast any blocking read
    (``XREAD BLOCK``) a later user of this client makes. Commands are not retried by the client:
    the writer's caller (a job) tries again, and a retried call would double the wait.
    """
    return coredis.Redis.from_url(
        url,
        decode_responses=True,
        connect_timeout=CONNECT_TIMEOUT_S,
        stream_timeout=CALL_TIMEOUT_S,
        retry_policy=coredis.retry.NoRetryPolicy(),
    )


async def redis_secret(url: str, prefix: str) -> str:
    """The signing key of access tokens kept under ``prefix`` (``P auth_secret``), made by the
    first node that asks: every node of a cluster then signs and checks tokens alike.

    Raises:
        StoreUnavailable: Redis cannot be reached.
    """
    key = f"{prefix}auth_secret"
    async with open_client(url) as client:
        store = RedisStore(client, url=url, prefix=prefix)
        made = secrets.token_urlsafe(48)
        await store._call(
            "keeping the signing key",
            partial(client.set, key, made, condition=coredis.PureToken.NX),
            CONNECT_TIMEOUT_S + CALL_TIMEOUT_S,
        )
        kept = await store._call("reading the signing key", partial(client.get, key))
    if kept is None:
        raise StoreUnavailable(f"Redis at {redacted(url)} lost the signing key as it was made")
    return str(kept)


@asynccontextmanager
async def open_redis_store(
    url: str, prefix: str, *, node: str | None = None, lease_s: float = JOB_LEASE_S
) -> AsyncIterator[RedisStore]:
    """The store under ``prefix`` on the Redis at ``url``, its writer running.

    Args:
        url: ``redis://[user:password@]host:port/db`` (or ``rediss://``, ``unix://``).
        prefix: The start of every key (``REDIS_PREFIX``).
        node: The cluster node the store writes for (see :class:`RedisStore`).
        lease_s: How long a job's lease outlives its last renewal (``JOB_LEASE_S``).

    Raises:
        StoreUnavailable: Redis cannot be reached.
    """
    unreachable: StoreUnavailable | None = None
    async with open_client(url) as client:
        store = RedisStore(client, url=url, prefix=prefix, node=node, lease_s=lease_s)
        try:
            await store._call("PING", client.ping, CONNECT_TIMEOUT_S + CALL_TIMEOUT_S)
        except StoreUnavailable as exc:
            # Raised outside the client's task group, which would wrap it in a group.
            unreachable = exc
        else:
            logger.info("store: redis %s, prefix %r", store.url, prefix)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(store.run)
                    try:
                        yield store
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                with trio.move_on_after(CLOSE_FLUSH_S, shield=True):
                    await store._writer.flush()
                store._writer.fail_queued()
    if unreachable is not None:
        raise unreachable
