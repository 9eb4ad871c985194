"""ClusterNode: one process of a cluster sharing a Redis prefix; any node accepts, one node runs.

Keys it adds under the prefix ``P`` (``actors/store/redis.py`` has the rest)::

    P queue                 stream  the job queue: an entry ``job=<id>`` per job to run (added
                                    with the job's first write, or when a node hands it over);
                                    consumer group ``nodes``, each node a consumer. An entry
                                    stays pending while its job runs, and is removed at its end
    P entries               hash    job id -> its entry in the job queue (until removed)
    P lease:<id>            string  the node running the job (PX JOB_LEASE_S, renewed)
    P job:<id>:cancel       string  set when the job is to be cancelled (until it ends)
    P node:<node>:wake      stream  entries that end the node's blocking event read: a job
                                    newly followed there, or one to cancel
    P job:<id>:ended_by     string  the node that wrote the job's end (the store's batch; a
                                    day, PX): that node may write it again
    P gone:<id>             string  a job a node deleted (a day, PX): not written again
    P takers                zset    node -> until when (ms) it takes jobs: each renewal of a node
                                    with room and not draining puts it there for a lease

A node that is gone for good (each start is a new node id) stays a consumer of ``P queue`` until
a node removes it (:data:`CONSUMER_IDLE_S` unseen, nothing pending: ``FORGET_CONSUMERS``).

How a job moves: the node that accepts it writes it (and its queue entry) in one batch. If that
node has room, no other job waits in the queue, and the node runs no more than twice as many
jobs as the least busy other node taking jobs plus :data:`KEEP_AHEAD` (``P takers``; a node
runs the jobs whose entries are pending in its name), the same script call reads the new entry
in the node's name and takes the job's lease: the node runs the job it accepted at once, from
memory (:meth:`ClusterNode.room_for_one`), and the clients that created it, polling or
following it there, read it without Redis. Otherwise a node with room takes the entry
(``XREADGROUP``), takes the job's lease (``ADMIT``), loads the job and runs it. A job cancelled
while no node holds it (queued) is taken by the node asked to cancel it (``CANCEL``), which
ends it at once and removes its queue entry, as any node ending a job does. Each node renews
the leases of all its jobs in one script call every third of the lease, which also keeps their
queue entries fresh and tells whether the node takes jobs. A node that dies stops renewing:
once its entries have been idle for a lease, another node claims them (``XAUTOCLAIM``) and, its
lease taken, goes on with the job from what is stored (each image's remote work resumed by id).
A node claims only once its own calls have reached Redis for a lease without a failure: after Redis
was out of reach, the nodes that were cut off with it renew first and go on with their jobs where
they ran. Every write of a job is fenced by its lease (the store's batch script), so a node that
lost a lease while cut off writes nothing more of that job and stops running it; a lease that lapsed
is taken back by its node only if no other node ended the job, and no node deleted it, meanwhile.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from typing import Any

import coredis
import coredis.exceptions
import trio

from actors.cluster import scripts
from actors.cluster.follower import WAKE_TTL_MS, StreamFollower
from actors.errors import StoreUnavailable
from actors.store.redis import RedisStore, open_client
from actors.tasks import TaskFailures, keep_running, uncancelled

logger = logging.getLogger(__name__)

#: Jobs one node runs at once at most (the rest wait in the queue for any node with room).
MAX_JOBS_PER_NODE = 200
#: How long one blocking XREADGROUP waits (under the client's stream timeout).
TAKE_BLOCK_MS = 2000
#: Queue entries taken per XREADGROUP at most (a burst of jobs is taken in few round trips).
TAKE_COUNT = 4
#: A node runs a job it accepts itself only while it runs no more than twice as many jobs as the
#: least busy other node taking jobs, plus this many (:meth:`ClusterNode.room_for_one`).
KEEP_AHEAD = 8
#: Entries claimed from dead nodes per XAUTOCLAIM.
CLAIM_COUNT = 20
#: Claim calls at most per tick (half a lease) while they claim nothing: 10,000 entries looked at.
CLAIM_CALLS = 50
#: How long a consumer of the job queue (a node) with no pending entry goes unseen before any
#: node removes it from the group: generous, as a live node is seen every ``TAKE_BLOCK_MS``
#: (or holds entries), and one removed anyway is made again by its next read.
CONSUMER_IDLE_S = 3600.0
#: How often each node looks for such consumers.
CONSUMER_SWEEP_S = 300.0
#: What :meth:`ClusterNode.cancel` answers when it took a queued job to end it here.
CANCEL_TAKEN = 3
#: ... when there is no such job, or when it had finished.
CANCEL_GONE, CANCEL_FINISHED = 0, 1
#: Finished jobs forgotten per retention pass at most.
EXPIRE_BATCH = 200
#: How often a node adds the bytes of the image files it wrote to the cluster's count.
BYTES_FLUSH_S = 2.0
#: How long reading the cluster's queue counts for a status page may take.
QUEUED_TIMEOUT_S = 1.0

#: Starts running a job this node took: ``(job id, cancelled)``; False if it could not.
StartJob = Callable[[str, bool], Awaitable[bool]]

_REDIS_ERRORS = (coredis.exceptions.RedisError, OSError, trio.BrokenResourceError, EOFError)


def _ignore(job_id: str) -> None:
    pass


def new_node_id() -> str:
    """An id unique to this process start, that an operator can trace to a host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class ClusterNode:
    """This process's membership of the cluster: the queue it takes jobs from, the leases of
    the jobs it runs, and the one reader of the events its subscribers follow.

    Args:
        store: The Redis store (written with this node's id, so its writes are fenced).
        url: Redis's URL (the event reader has a connection of its own).
        lease_s: How long a lease outlives its node's last renewal (``JOB_LEASE_S``).
        max_jobs: Jobs this node runs at once at most.

    Concurrency: :meth:`run` (started by the supervisor with the callbacks that start, stop
    and cancel its jobs) owns the tasks that take jobs, claim dead nodes' jobs, renew leases
    and read events. The other methods are called from request handlers and jobs.
    """

    def __init__(
        self,
        store: RedisStore,
        *,
        url: str,
        lease_s: float,
        max_jobs: int = MAX_JOBS_PER_NODE,
    ) -> None:
        assert store.node is not None, "a cluster node's store writes with the node's id"
        self.store = store
        self.node_id = store.node
        self.keys = store.keys
        self.lease_s = lease_s
        self.max_jobs = max_jobs
        self._url = url
        self._lease_ms = max(1, round(lease_s * 1000))
        client = store.client
        self._admit = client.register_script(scripts.ADMIT)
        self._renew = client.register_script(scripts.RENEW)
        self._release = client.register_script(scripts.RELEASE)
        self._cancel = client.register_script(scripts.CANCEL)
        self._expired = client.register_script(scripts.EXPIRED)
        self._forget_consumers = client.register_script(scripts.FORGET_CONSUMERS)
        self._add_bytes = client.register_script(scripts.ADD_BYTES)
        #: job id -> bytes of files this node wrote for it, not yet counted in Redis.
        self._bytes: dict[str, int] = {}
        #: The batch being added (its token and bytes), until Redis has answered it.
        self._bytes_batch: tuple[str, dict[str, int]] | None = None
        self._bytes_batches = itertools.count(1)
        #: Told (sync) of a job whose file this node wrote after the job was forgotten: its
        #: files are garbage (the supervisor deletes them).
        self.on_forgotten_files: Callable[[str], None] = _ignore
        self.queue_key = f"{self.keys.prefix}queue"
        self.wake_key = f"{self.keys.prefix}node:{self.node_id}:wake"
        #: job id -> its queue entry id, for every job this node runs.
        self.held: dict[str, str] = {}
        #: Room kept for jobs being accepted here, to run here if their admission takes them.
        self._reserved = 0
        #: Room promised to the blocking read of the queue under way (what it may take).
        self._reading = 0
        self._room = trio.Event()
        self._room.set()
        self._draining = trio.Event()
        self._start_job: StartJob | None = None
        self._on_lost: Callable[[str], None] = _ignore
        self._on_cancel: Callable[[str], None] = _ignore
        self.follower: StreamFollower | None = None
        self.taken = 0
        self.kept = 0
        self.claimed = 0
        self.renewals = 0
        self.failures = TaskFailures()

    # --- running ----------------------------------------------------------------------------

    async def run(
        self,
        *,
        start_job: StartJob,
        on_lost: Callable[[str], None],
        on_cancel: Callable[[str], None],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Take, claim, renew and follow until cancelled."""
        self._start_job, self._on_lost, self._on_cancel = start_job, on_lost, on_cancel
        await self._create_group()
        async with open_client(self._url) as reader:
            self.follower = StreamFollower(
                reader,
                calls=self.store.client,
                keys=self.keys,
                wake=self.wake_key,
                load_events=self._load_events,
                on_cancel=on_cancel,
            )
            async with trio.open_nursery() as nursery:
                for name, loop in (
                    ("event reader", self.follower.run),
                    ("lease renewal", self._keep_leases),
                    ("job queue reader", self._take_jobs),
                    ("takeover", self._claim_jobs),
                    ("consumer cleanup", self._forget_dead_nodes),
                    ("image byte count", self._count_bytes),
                ):
                    # A bug in one is logged and counted, and it starts again (actors/tasks.py).
                    nursery.start_soon(
                        partial(keep_running, f"cluster's {name}", loop, self.failures, log=logger),
                        name=f"cluster {name}",
                    )
                logger.info(
                    "cluster: node %s on prefix %r (lease %g s)",
                    self.node_id,
                    self.keys.prefix,
                    self.lease_s,
                )
                task_status.started()

    async def _create_group(self) -> None:
        try:
            await self.store._call(
                "creating the job queue",
                partial(
                    self.store.client.xgroup_create,
                    self.queue_key,
                    scripts.GROUP,
                    "0",
                    mkstream=True,
                ),
            )
        except StoreUnavailable as exc:
            # coredis answers BUSYGROUP (the group exists: another node made it) in its words.
            if "BUSYGROUP" not in str(exc) and "already exists" not in str(exc):
                raise

    async def _load_events(self, job_id: str) -> Any:
        stored = await self.store.load_job(job_id)
        return None if stored is None else stored.events

    @property
    def draining(self) -> bool:
        """Whether this node takes no more jobs (:meth:`stop_taking`)."""
        return self._draining.is_set()

    def stop_taking(self) -> None:
        """Take no more jobs (draining): the queue is left to the other nodes."""
        self._draining.set()
        self._room.set()

    def _free(self) -> int:
        return self.max_jobs - len(self.held) - self._reserved

    def _update_room(self) -> None:
        if self._free() > 0:
            self._room.set()
        elif self._room.is_set():
            self._room = trio.Event()

    @contextlib.contextmanager
    def room_for_one(self) -> Iterator[int | None]:
        """Whether a job this node is accepting may run here without the queue: while the
        node takes jobs and has room, which is kept for the job until the block ends,
        :data:`KEEP_AHEAD` (``take`` of :meth:`RedisStore.admit`: the job is taken here unless
        jobs wait in the queue, or this node runs more than twice as many jobs as another node
        taking jobs plus that many, so that a node accepting more jobs than the others passes
        them to the queue, for any node with room; the answer tells whether it was: then
        :meth:`hold_accepted`), else ``None``. The room promised to the queue's blocking read
        under way is not used: that read may answer with as many entries."""
        if self._draining.is_set() or self._free() - self._reading <= 0:
            yield None
            return
        self._reserved += 1
        self._update_room()
        try:
            yield KEEP_AHEAD
        finally:
            self._reserved -= 1
            self._update_room()

    def hold_accepted(self, job_id: str, entry_id: str) -> None:
        """The admission of ``job_id`` took its queue entry and lease for this node (sync)."""
        self.held[job_id] = entry_id
        self.kept += 1
        self._update_room()

    async def _take_jobs(self) -> None:
        """Take new (and handed-over) jobs from the queue while this node has room."""
        delay = 0.1
        while not self._draining.is_set():
            await self._room.wait()
            if self._draining.is_set():
                return
            self._reading = max(1, min(TAKE_COUNT, self._free()))
            try:
                answer: Any = await self.store.client.xreadgroup(
                    scripts.GROUP,
                    self.node_id,
                    streams={self.queue_key: ">"},
                    count=self._reading,
                    block=TAKE_BLOCK_MS,
                )
            except _REDIS_ERRORS as exc:
                self._reading = 0
                self.store.lost_contact()
                # Once per outage (the store's calls and /health tell the rest of it).
                log = logger.warning if delay == 0.1 else logger.debug
                log("cluster: cannot read the job queue: %s", exc)
                if "NOGROUP" in str(exc) or "no such key" in str(exc).lower():
                    # Redis lost the queue (restarted without persistence): make it again.
                    with contextlib.suppress(StoreUnavailable):
                        await self._create_group()
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            entries = [entry for read in (answer or {}).values() for entry in read]
            # The room stays promised to each entry read until it is held or let go.
            self._reading = len(entries)
            try:
                for entry in entries:
                    await self._admit_entry(str(entry.identifier), entry.field_values)
                    self._reading -= 1
            finally:
                self._reading = 0

    async def _claim_jobs(self) -> None:
        """Claim the entries of jobs whose node stopped renewing (dead, or cut off for a lease)."""
        start = "0-0"
        while not self._draining.is_set():
            await trio.sleep(self.lease_s / 2)
            if not await self._reached_redis_for_a_lease():
                continue
            # One call looks at no more than ten times its count of pending entries (Redis 7):
            # the next goes on from where it stopped, at once while nothing was claimed, until
            # it has been round (or :data:`CLAIM_CALLS` calls: the rest at the next tick).
            for _ in range(CLAIM_CALLS):
                if self._draining.is_set() or self._free() <= 0:
                    break
                try:
                    start, entries = await self._claim(start)
                except StoreUnavailable as exc:
                    logger.debug("cluster: cannot claim: %s", exc)
                    break
                for entry in entries:
                    if entry is None or not entry.field_values:
                        continue  # deleted meanwhile
                    self.claimed += 1
                    await self._admit_entry(str(entry.identifier), entry.field_values)
                if entries or start == "0-0":
                    break

    async def _claim(self, start: str) -> tuple[str, Any]:
        """One ``XAUTOCLAIM`` from ``start``: where the next goes on from, and the entries.

        Bounded by a third of a lease, as the renewals are: a claim that waited longer (Redis
        stalled) could find the entries of live nodes idle from the stall alone, and its answer
        is not used: what it claimed stays unadmitted, live nodes' renewals take their entries
        back, and a dead node's are claimed again once idle for another lease.

        Raises:
            StoreUnavailable: Redis did not answer in time.
        """
        answer: Any = await self.store._call(
            "claiming jobs",
            partial(
                self.store.client.xautoclaim,
                self.queue_key,
                scripts.GROUP,
                self.node_id,
                min_idle_time=self._lease_ms,
                start=start,
                count=CLAIM_COUNT,
            ),
            timeout_s=self.lease_s / 3,
        )
        return str(answer[0]), answer[1]

    async def _reached_redis_for_a_lease(self) -> bool:
        """Whether this node's calls have reached Redis for a lease without a failure.

        Only then does an entry idle for a lease tell of a dead node. A node cut off from Redis
        (Redis down, restarting, failing over, or the network) finds every entry idle once it is
        back, those of the nodes that were cut off like it too; waiting a lease lets those renew
        their leases (every third of one) and go on with their jobs where they ran, instead of
        racing them for their jobs. After a failure, a ``PING`` tells when Redis is reached again.
        """
        since = self.store.reached_since
        if since is None:
            await self.store.check()  # a PING: sets reached_since if Redis answers
            return False
        await trio.lowlevel.checkpoint()
        return trio.current_time() - since >= self.lease_s

    async def _admit_entry(self, entry_id: str, fields: Any) -> None:
        job_id = str(fields.get("job", ""))
        if not job_id or job_id in self.held:
            return
        try:
            answer: Any = await self.store._call(
                "taking a job",
                lambda: self._admit(
                    keys=[],
                    args=[self.keys.prefix, self.node_id, str(self._lease_ms), job_id, entry_id],
                ),
            )
        except StoreUnavailable as exc:
            logger.warning("cluster: cannot take job %s: %s", job_id, exc)
            return  # its entry stays pending: claimed again once idle for a lease
        outcome, cancelled = str(answer[0]), bool(int(answer[1]))
        if outcome == "ok":
            await self._run_taken(job_id, entry_id, cancelled=cancelled)

    async def _run_taken(self, job_id: str, entry_id: str, *, cancelled: bool) -> None:
        """Run a job whose lease this node took (``entry_id`` its queue entry)."""
        assert self._start_job is not None
        self.held[job_id] = entry_id
        self._update_room()
        self.taken += 1
        if not await self._start_job(job_id, cancelled):
            # Not startable now (the store failed to read it): the lease lapses, and the job is
            # claimed again.
            self.held.pop(job_id, None)
            self._update_room()

    async def _forget_dead_nodes(self) -> None:
        """Remove dead nodes from the job queue's group, now and then (every node does)."""
        while True:
            await trio.sleep(CONSUMER_SWEEP_S)
            with contextlib.suppress(StoreUnavailable):
                await self.forget_idle_consumers(idle_s=CONSUMER_IDLE_S)

    async def forget_idle_consumers(self, *, idle_s: float) -> list[str]:
        """Remove every other consumer of the job queue with no pending entry that has not
        been seen for ``idle_s``; returns their names.

        Raises:
            StoreUnavailable: Redis cannot be reached.
        """
        args = [self.keys.prefix, str(round(idle_s * 1000)), self.node_id]
        answer: Any = await self.store._call(
            "forgetting dead nodes", lambda: self._forget_consumers(keys=[], args=args)
        )
        removed = [str(name) for name in answer]
        if removed:
            logger.info("cluster: forgot %d dead nodes: %s", len(removed), ", ".join(removed))
        return removed

    async def _keep_leases(self) -> None:
        """Renew every lease this node holds, in one call, every third of the lease, telling
        the cluster from the start whether this node takes jobs (``P takers``)."""
        period = self.lease_s / 3
        while True:
            await self._renew_leases(period)
            await trio.sleep(period)

    async def _renew_leases(self, period: float) -> None:
        taking = not self._draining.is_set() and self._free() > 0
        args = [self.keys.prefix, self.node_id, str(self._lease_ms), "1" if taking else "0"]
        for job_id, entry_id in self.held.items():
            args += [job_id, entry_id]
        try:
            answer: Any = await self.store._call(
                "renewing leases", partial(self._renew, keys=[], args=args), timeout_s=period
            )
        except StoreUnavailable as exc:
            if self.held:
                logger.warning("cluster: %s", exc)
            return
        self.renewals += 1
        lost, cancelled = answer
        for job_id in lost:
            logger.warning(
                "cluster: job %s is another node's now (taken over, or ended or deleted "
                "there while this node was cut off): stopped here",
                job_id,
            )
            self.held.pop(str(job_id), None)
            self._on_lost(str(job_id))
        for job_id in cancelled:
            self._on_cancel(str(job_id))
        self._update_room()

    # --- calls of the supervisor ----------------------------------------------------------

    async def release(self, job_id: str, *, requeue: bool) -> None:
        """Let go of a job this node ran: ended (``requeue`` False) or handed over."""
        entry_id = self.held.pop(job_id, None)
        self._update_room()
        if entry_id is None:
            await trio.lowlevel.checkpoint()
            return
        args = [self.keys.prefix, self.node_id, job_id, entry_id, "1" if requeue else "0"]
        try:
            await self.store._call("releasing a job", lambda: self._release(keys=[], args=args))
        except StoreUnavailable as exc:
            # The lease lapses and the entry is claimed: the job is found ended (or carried on).
            logger.warning("cluster: releasing job %s: %s", job_id, exc)

    async def cancel(self, job_id: str) -> int:
        """Ask whichever node runs ``job_id`` to cancel it: 0 no such job, 1 finished, 2 asked,
        3 ended here (no node held it: it was queued, and ends now, not once a node has room).

        Raises:
            StoreUnavailable: Redis cannot be reached.
        """
        args = [self.keys.prefix, job_id, str(WAKE_TTL_MS), self.node_id, str(self._lease_ms)]
        answer: Any = await self.store._call(
            "cancelling a job", lambda: self._cancel(keys=[], args=args)
        )
        code = int(answer[0])
        if code == CANCEL_TAKEN:
            # Shielded (a store read, bounded): cut half-way, this node would hold the job's
            # lease, renewing it, with no job running.
            with trio.CancelScope(shield=True):
                await self._run_taken(job_id, str(answer[1]), cancelled=True)
        return code

    async def queued(self) -> dict[str, int] | None:
        """Cluster-wide, what ``MAX_QUEUED_IMAGES`` counts: the unfinished jobs of every node
        and their images; ``None`` if Redis does not answer within :data:`QUEUED_TIMEOUT_S`.

        For a status page: the read is bounded by a deadline of its own, and a late answer
        leaves the connection alone (the store's calls would drop every connection of this
        process, cutting its leases' renewals and blocking reads too).
        """
        client, prefix = self.store.client, self.keys.prefix

        async def read() -> dict[str, int]:
            async with client.pipeline(transaction=False) as pipe:
                jobs = pipe.hlen(f"{prefix}active")
                images = pipe.get(f"{prefix}active_images")
            return {"jobs_unfinished": int(await jobs), "images_queued": int(await images or 0)}

        with trio.move_on_after(QUEUED_TIMEOUT_S):
            try:
                return await uncancelled(read)  # (coredis loses a slot to a cancellation)
            except _REDIS_ERRORS:
                return None
        return None

    def note_bytes(self, job_id: str, change: int) -> None:
        """This node wrote a file of ``job_id`` (sync): its bytes count towards the image
        directory's budget on every node, once added to Redis (every :data:`BYTES_FLUSH_S`)."""
        self._bytes[job_id] = self._bytes.get(job_id, 0) + change

    async def flush_bytes(self) -> None:
        """Add the bytes noted since the last call to the cluster's count: the batch a failed
        call left first (the same batch, so that it is counted once), then the rest.

        Raises:
            StoreUnavailable: Redis cannot be reached (the bytes are kept for the next call).
        """
        for _ in range(2):
            if self._bytes_batch is None:
                noted = {job_id: change for job_id, change in self._bytes.items() if change}
                self._bytes = {}
                if not noted:
                    break
                self._bytes_batch = (f"{self.node_id}-{next(self._bytes_batches)}", noted)
            token, batch = self._bytes_batch
            args = [self.keys.prefix, token]
            for job_id, change in batch.items():
                args += [job_id, str(change)]
            gone: Any = await self.store._call(
                "counting image bytes", partial(self._add_bytes, keys=[], args=args)
            )
            self._bytes_batch = None
            for job_id in gone:
                self.on_forgotten_files(str(job_id))
        await trio.lowlevel.checkpoint()

    async def _count_bytes(self) -> None:
        try:
            while True:
                await trio.sleep(BYTES_FLUSH_S)
                with contextlib.suppress(StoreUnavailable):
                    await self.flush_bytes()
        finally:
            with trio.move_on_after(2, shield=True), contextlib.suppress(StoreUnavailable):
                await self.flush_bytes()  # leaving: what it wrote last still counts

    async def expired(
        self, *, retention_s: float, keep: int, max_bytes: int | None = None
    ) -> list[str]:
        """Finished jobs (any node's) to forget now: older than ``retention_s``, over ``keep``,
        or the oldest whose image files take the directory over ``max_bytes``.

        Raises:
            StoreUnavailable: Redis cannot be reached.
        """
        horizon = round((datetime.now(UTC).timestamp() - retention_s) * 1000)
        args = [self.keys.prefix, str(horizon), str(keep), str(EXPIRE_BATCH)]
        args.append("" if max_bytes is None else str(max_bytes))
        answer: Any = await self.store._call(
            "finding expired jobs", lambda: self._expired(keys=[], args=args)
        )
        return [str(job_id) for job_id in answer]

    def statistics(self) -> dict[str, object]:
        follower = self.follower
        return {
            "node_id": self.node_id,
            "jobs_held": sorted(self.held),
            "lease_s": self.lease_s,
            "taking": not self._draining.is_set(),
            "taken_total": self.taken,
            "kept_total": self.kept,
            "claimed_total": self.claimed,
            "renewals_total": self.renewals,
            "jobs_followed": 0 if follower is None else follower.followed,
            "event_reads_total": 0 if follower is None else follower.reads,
            "events_error": None if follower is None else follower.failing,
            "task_failures_total": self.failures.total,
            "last_task_failure": self.failures.last,
        }
