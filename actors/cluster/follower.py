"""StreamFollower: one blocking read per node for the events of every job its subscribers follow."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import coredis
import trio

from actors.errors import StoreUnavailable
from actors.eventlog import EventLog
from actors.messages import DoneEvent, JobEvent
from actors.store.codec import decode_event
from actors.store.redis import RedisKeys, event_id
from actors.tasks import uncancelled

logger = logging.getLogger(__name__)

#: How long one blocking XREAD waits (it must stay under the client's stream timeout).
BLOCK_MS = 2000
#: Entries one XREAD answers at most (a lagging job gets the rest at the next read).
READ_COUNT = 500
#: How long a node's wake stream outlives its last entry.
WAKE_TTL_MS = 3_600_000
#: Between reads that fail (Redis down): the first wait, and the longest.
RETRY_S = (0.1, 2.0)

#: Reads a job's stored events after an id (the store's XRANGE), or ``None``: no such job.
LoadEvents = Callable[[str], Awaitable[tuple[JobEvent, ...] | None]]


@attrs.define(eq=False)
class _Followed:
    log: EventLog
    refs: int = 0

    @property
    def cursor(self) -> str:
        return f"{self.log.last_id}-0"


class StreamFollower:
    """Feeds one :class:`EventLog` per followed job from its Redis stream, for every local
    subscriber of it at once: 10,000 subscribers of a job cost Redis what one does.

    Args:
        client: An entered client of this follower's own (its connection blocks in XREAD).
        calls: The node's client for short calls (waking the reader).
        keys: The deployment's key names.
        wake: This node's wake stream (read along with the jobs' streams: an entry there ends
            the blocking read at once, so a newly followed job is read without delay).
        load_events: Reads a job's stored events (the replay of a new follow).
        on_cancel: Called (sync) with a job id another node asked this one to cancel.

    Concurrency: :meth:`run` is the one reading task (started by the node, ends by
    cancellation); :meth:`acquire` and :meth:`release` are called by subscribers' tasks,
    :meth:`offer` by a local job as it publishes (the same event arriving from Redis later is
    ignored by id, so every event is in a log once). While Redis cannot be read, the logs just
    wait (their subscribers send heartbeats), and reading resumes after the last id of each.
    """

    def __init__(
        self,
        client: coredis.Redis[str],
        *,
        calls: coredis.Redis[str],
        keys: RedisKeys,
        wake: str,
        load_events: LoadEvents,
        on_cancel: Callable[[str], None],
    ) -> None:
        self._client = client
        self._calls = calls
        self._keys = keys
        self._wake_key = wake
        self._wake_cursor = "0-0"  # node ids are unique: the stream is this node's alone
        self._load_events = load_events
        self._on_cancel = on_cancel
        self._jobs: dict[str, _Followed] = {}
        self.reads = 0
        self.failing: str | None = None

    @property
    def followed(self) -> int:
        return len(self._jobs)

    async def acquire(
        self, job_id: str, *, known: tuple[JobEvent, ...] | None = None
    ) -> EventLog | None:
        """The log of ``job_id``'s events, followed until :meth:`release`; ``None``: no such job.

        ``known``: the job's events so far when this node runs it (its own log): Redis is then
        not read for them, so its streams start while Redis is down too.

        Raises:
            StoreUnavailable: Redis cannot be read (and ``known`` was not given).
        """
        followed = self._jobs.get(job_id)
        if followed is None:
            events = known if known is not None else await self._load_events(job_id)
            if events is None:
                return None
            followed = self._jobs.get(job_id)  # another subscriber may have come meanwhile
            if followed is None:
                followed = self._jobs[job_id] = _Followed(EventLog())
                for event in events:
                    self._add(followed.log, event)
                if not followed.log.closed:
                    try:
                        await self._wake()
                    except StoreUnavailable as exc:
                        # The reader includes the job at its next read anyway (within BLOCK_MS
                        # once Redis answers); the wake only spares that wait.
                        logger.debug("cluster: job %s followed without a wake: %s", job_id, exc)
        else:
            await trio.lowlevel.checkpoint()
        followed.refs += 1
        return followed.log

    def release(self, job_id: str) -> None:
        """One subscriber of ``job_id`` is gone (sync); the last one stops its reading."""
        followed = self._jobs.get(job_id)
        if followed is not None:
            followed.refs -= 1
            if followed.refs <= 0:
                del self._jobs[job_id]

    def offer(self, job_id: str, event: JobEvent) -> None:
        """A local job published ``event``: its followers get it now, not one read later."""
        followed = self._jobs.get(job_id)
        if followed is not None:
            self._add(followed.log, event)

    @staticmethod
    def _add(log: EventLog, event: JobEvent) -> None:
        if log.closed or event.id != log.next_id:
            return  # had already (or out of turn: the stream brings it in order)
        log.append(event)
        if isinstance(event, DoneEvent):
            log.close()

    async def _wake(self) -> None:
        """End the blocking read, so that the next one includes what changed."""
        calls = self._calls

        async def wake() -> None:
            await calls.xadd(
                self._wake_key,
                {"follow": "1"},
                trim_strategy=coredis.PureToken.MAXLEN,
                threshold=64,
                trim_operator=coredis.PureToken.APPROXIMATELY,
            )
            await calls.pexpire(self._wake_key, WAKE_TTL_MS)

        try:
            with trio.fail_after(5):
                await uncancelled(wake)  # a subscriber's task: coredis must not see it cancelled
        except (coredis.exceptions.RedisError, OSError, trio.TooSlowError) as exc:
            raise StoreUnavailable(f"Redis failed waking the event reader: {exc}") from None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read until cancelled."""
        task_status.started()
        delay = RETRY_S[0]
        while True:
            try:
                await self._read_once()
            except (
                coredis.exceptions.RedisError,
                OSError,
                trio.BrokenResourceError,
                EOFError,
            ) as exc:
                if self.failing is None:
                    logger.warning("cluster: cannot read events: %s", exc)
                self.failing = str(exc) or type(exc).__name__
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_S[1])
                continue
            if self.failing is not None:
                logger.info("cluster: reading events again")
                self.failing = None
            delay = RETRY_S[0]

    async def _read_once(self) -> None:
        streams = {self._wake_key: self._wake_cursor}
        for job_id, followed in self._jobs.items():
            if not followed.log.closed:
                streams[self._keys.job(job_id, "events")] = followed.cursor
        self.reads += 1
        answer: Any = await self._client.xread(streams, count=READ_COUNT, block=BLOCK_MS)
        if not answer:
            return
        events_prefix = self._keys.prefix + "job:"
        for key, entries in answer.items():
            if key == self._wake_key:
                for entry in entries:
                    self._wake_cursor = str(entry.identifier)
                    job_id = entry.field_values.get("cancel")
                    if job_id is not None:
                        self._on_cancel(str(job_id))
                continue
            job_id = key.removeprefix(events_prefix).rpartition(":")[0]
            target = self._jobs.get(job_id)
            if target is None:
                continue
            for entry in entries:
                try:
                    event = decode_event(
                        event_id(str(entry.identifier)), str(entry.field_values["e"])
                    )
                except Exception:
                    # Not an event this release wrote or can read: this job's followers here
                    # end (their streams close; the node and other jobs' followers go on).
                    logger.exception(
                        "cluster: job %s: cannot read its event %s; its streams here end",
                        job_id,
                        entry.identifier,
                    )
                    target.log.close()
                    break
                self._add(target.log, event)
