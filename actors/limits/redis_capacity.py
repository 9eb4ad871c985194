"""``MAX_CONCURRENCY`` across every process: a Redis semaphore of leased slots, fair across jobs.

A slot is an entry in a sorted set of holders scored by the end of its lease; the process that
holds it renews the leases of all its slots in one call every third of ``CAPACITY_LEASE_S``, so
the slot of a process that died (``kill -9``, a host gone) is free again once its lease ends. A
slot is handed out by a Lua script, so the count of holders never exceeds the capacity whatever
the number of processes, and it goes to the waiting job that holds the fewest slots across all
of them, ties to the one served least lately, then to the oldest; within a job, the lowest
priority, then the first to ask (the semantics of :class:`~actors.capacity.FairCapacity`).
The scripts are in :mod:`actors.limits.scripts`.

A slot given back by a process goes to a waiter of the same process at once, without Redis in
between, while the process holds no more than its share rounded down: the capacity's max-min
fair shares across the jobs holding or waiting (a job's share is the smaller of its demand,
its slots held and waiting up to the capacity, and the water level that shares the capacity
out), summed over the process's own jobs (each job runs on one process). Within a process it
goes as :class:`~actors.capacity.FairCapacity` would send it: to the job holding the fewest,
served least lately, oldest. Every other slot given back goes to Redis, which hands it to the
waiting job holding the fewest cluster-wide. So the whole shares turn over at a process's own
speed, and the rest of the capacity (the shares' fractions, and any share a process does not
use) goes round in the exact cluster-wide order. The process learns the level from each answer
of Redis, so a share may be a round trip out of date: a job that starts waiting on another
process counts from the answer to this process's next call (every hand-on is told in one). Cut
off from Redis, a process goes on within the share it last heard of while its leases surely
run (its latest answered renewal was sent within two thirds of a lease), and hands nothing on
after that.

A process's requests (queue a waiter, give a slot back, tell of a slot handed on) go to Redis
from two tasks of its own: each sends all the requests made so far, in the order its tasks
made them, in one script run, so a request goes at once while one call is on its way, and
those made while both are go together (a job starting asks for its images' slots at once;
slots given back while Redis answers go together). The two calls may cross on their way, and
a request retried after a failed call may follow later ones; that is harmless: a slot is given
back only after it was granted, a slot handed on to a waiter whose queueing has not reached
Redis yet is held by it all the same, a place given up reaches Redis as a mark (kept two
leases, longer than a call may take) that stops a queueing request or a hand-on still on its
way, and a queueing request is not sent again once its waiter left or holds a slot. A task
giving its slot back does not wait for Redis.

A waiter is woken by the process handing it a slot, by the answer of its own process's call
that queued it or that freed the slot it was granted, or else by the entry the script run that
granted it adds to its process's grants stream (which the process reads with one blocking
``XREAD``). The renewal also answers which of this process's waiters hold a slot now, so a
grant missed while Redis was unreachable costs at most a third of a lease. (The grants are
published on a channel too, for processes of an earlier release during a rolling deploy.)

Redis down: the requests are sent again (with growing waits, in their order) until Redis
answers them; waiters wait; slots held go on being held (their work is running); a slot given
back meanwhile would in any case be freed when its lease ends. A lease that ran out while this
process could not reach Redis is taken again by the next renewal, so for that long the holders
may number more than the capacity.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Any

import attrs
import coredis
import trio

from actors.errors import LimitsUnavailable
from actors.limits import scripts
from actors.limits.calls import REDIS_ERRORS, RETRY_S, RedisCalls
from actors.messages import CapacityStatistics
from actors.tasks import TaskFailures, keep_running

logger = logging.getLogger("actors.limits")

#: How long a slot outlives its holder's last renewal (``CAPACITY_LEASE_S``).
CAPACITY_LEASE_S = 5.0
#: How long a process that stops may take to give its slots back.
RELEASE_TIMEOUT_S = 2.0
#: How long one blocking read of the grants stream waits (under the client's stream timeout).
GRANTS_BLOCK_MS = 2000
#: Calls of requests on their way at once: a request goes while another call is on its way,
#: those made meanwhile wait for one of the two to answer and go together.
SENDERS = 2
#: Grants entries one read answers at most.
GRANTS_READ_COUNT = 100


def node_id() -> str:
    """A name for this process, unique per start, that an operator can trace to a host."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


@attrs.define(eq=False)
class _Waiting:
    job: str
    priority: int
    granted: trio.Event = attrs.Factory(trio.Event)


@attrs.define(eq=False)
class _Job:
    """One job's slots on this process: what a hand-on chooses by."""

    seq: int
    in_use: int = 0
    waiting: int = 0
    last_grant: int = -1
    #: Its waiters, lowest (priority, arrival) first; ids of waiters gone are skipped.
    queue: list[tuple[int, int, str]] = attrs.Factory(list)


class RedisCapacity:
    """``capacity`` slots shared by every process that uses ``prefix`` on one Redis.

    Args:
        client: An entered ``coredis.Redis`` with ``decode_responses=True``.
        prefix: The start of the capacity's keys (e.g. ``imagegen:limits:capacity:``).
        capacity: Slots held at once across all processes (``MAX_CONCURRENCY``); every process
            sharing the prefix must be given the same.
        lease_s: How long a slot outlives its holder's last renewal.

    Concurrency: opened with :func:`open_redis_capacity`, which runs :meth:`run` (the
    senders of the requests, the renewal and the reader of the grants stream); any number of
    tasks use :meth:`slot` at once.
    """

    def __init__(
        self,
        client: coredis.Redis[str],
        *,
        prefix: str,
        capacity: int,
        lease_s: float = CAPACITY_LEASE_S,
    ) -> None:
        self.prefix = prefix
        self.capacity = capacity
        self.lease_s = lease_s
        self.node = node_id()
        self._calls = RedisCalls(client, "capacity")
        self._requests = client.register_script(scripts.CAPACITY_CALLS)
        self._renew = client.register_script(scripts.CAPACITY_RENEW)
        self._ids = itertools.count(1)
        self._waiting: dict[str, _Waiting] = {}
        self._holding: dict[str, str] = {}  # slot id -> job
        self._jobs: dict[str, _Job] = {}  # the jobs holding or waiting here
        self._grants = itertools.count()
        #: The water level of the fair shares, as of Redis's latest answer (0 until one came:
        #: nothing is handed on before Redis has counted this process's jobs).
        self._level = 0.0
        #: Slots handed on to a waiter of this process without Redis in between.
        self.handed_on = 0
        #: When this process's latest answered renewal was sent (``None``: none yet).
        self._renewed_at: float | None = None
        #: Slots handed on whose request Redis has not answered yet.
        self._untold: set[str] = set()
        #: For a holder given its slot by a hand-on: the slots it replaced, newest first, as
        #: far as Redis may not have had their hand-ons yet (Redis still has one of them held).
        self._stands_for: dict[str, list[str]] = {}
        #: Slots given back to Redis (beyond this process's share, or none waits here).
        self.given_back = 0
        #: Slots given back whose request Redis has not answered yet.
        self._unreleased: set[str] = set()
        #: Requests not sent yet, in order: ``("A", id, job, priority)``, ``("R", id)`` or
        #: ``("H", released, heir, job, chain)``; at most two per slot asked for (its queueing,
        #: and its giving back or handing on), so bounded by the attempts under way.
        self._pending: list[tuple[str, ...]] = []
        self._requested = trio.Event()
        #: Cluster-wide figures as of the latest renewal: slots held, waiters, jobs waiting.
        self._seen = (0, 0, 0)
        #: Its renewal and grants reader failed (a bug) and were started again.
        self.failures = TaskFailures()

    @property
    def _base(self) -> list[str]:
        return [self.prefix, str(self.capacity), str(max(1, round(self.lease_s * 1000)))]

    @asynccontextmanager
    async def slot(self, tenant_key: str, *, priority: int = 0) -> AsyncIterator[None]:
        """Hold one slot, taken in ``tenant_key``'s fair turn across all processes."""
        number = next(self._ids)
        slot_id = f"{self.node}/{number}"
        waiting = self._waiting[slot_id] = _Waiting(tenant_key, priority)
        job = self._jobs.get(tenant_key)
        if job is None:
            job = self._jobs[tenant_key] = _Job(seq=number)
        job.waiting += 1
        if len(job.queue) > 2 * job.waiting + 16:  # waiters granted by Redis or gone, dropped
            job.queue = [entry for entry in job.queue if entry[2] in self._waiting]
            heapq.heapify(job.queue)
        heapq.heappush(job.queue, (priority, number, slot_id))
        try:
            self._request("A", slot_id, tenant_key, str(priority))
            await waiting.granted.wait()
        except BaseException:
            self._give_back(slot_id)
            raise
        try:
            yield
        finally:
            self._give_back(slot_id)

    def _grant(self, slot_id: str) -> bool:
        """Make a waiter of this process a holder and wake it (False: it waits no more)."""
        waiting = self._waiting.pop(slot_id, None)
        if waiting is None:
            return False
        job = self._jobs[waiting.job]
        job.waiting -= 1
        job.in_use += 1
        job.last_grant = next(self._grants)
        self._holding[slot_id] = waiting.job
        waiting.granted.set()
        return True

    def _give_back(self, slot_id: str) -> None:
        """Give the slot back, or the place in the queue: a slot goes to a waiter of this
        process if it is within this process's share, else to Redis with the next call."""
        self._unreleased.add(slot_id)
        tenant = self._holding.pop(slot_id, None)
        if tenant is None:  # a place given up
            waiting = self._waiting.pop(slot_id)
            self._jobs[waiting.job].waiting -= 1
            self._forget_if_idle(waiting.job)
            self._request("R", slot_id)
            return
        self._jobs[tenant].in_use -= 1
        self._forget_if_idle(tenant)
        chain = [prior for prior in self._stands_for.pop(slot_id, ()) if prior in self._untold]
        heir = self._heir(holding=len(self._holding) + 1)
        if heir is None:
            self.given_back += 1
            self._request("R", slot_id)
            return
        self.handed_on += 1
        self._untold.add(slot_id)
        self._stands_for[heir] = [slot_id, *chain]
        self._request("H", slot_id, heir, self._holding[heir], " ".join(chain))

    def _forget_if_idle(self, tenant: str) -> None:
        job = self._jobs[tenant]
        if job.in_use == 0 and job.waiting == 0:
            del self._jobs[tenant]

    def _heir(self, *, holding: int) -> str | None:
        """The waiter a slot given back goes to without Redis (made a holder), if ``holding``
        slots are within this process's share: ``None`` if not, or if none waits here."""
        waiting = [job for job in self._jobs.values() if job.waiting]
        if not waiting:
            return None
        share = sum(
            min(self.capacity, job.in_use + job.waiting, self._level) for job in self._jobs.values()
        )
        if holding > math.floor(share + 1e-9) or not self._leases_hold():
            return None
        job = min(waiting, key=lambda job: (job.in_use, job.last_grant, job.seq))
        while True:
            _, _, slot_id = heapq.heappop(job.queue)
            if self._grant(slot_id):
                return slot_id

    def _request(self, *request: str) -> None:
        self._pending.append(request)
        self._requested.set()

    def statistics(self) -> CapacityStatistics:
        """Cluster-wide figures as of the latest renewal (a third of a lease old at most)."""
        held, waiters, jobs = self._seen
        return CapacityStatistics(
            total=self.capacity, in_use=held, waiting=waiters, jobs_waiting=jobs
        )

    def local_statistics(self) -> dict[str, Any]:
        """This process's side of the slots (``/api/status``, ``cluster.slots``)."""
        return {
            "holding": len(self._holding),
            "waiting": len(self._waiting),
            "handed_on_total": self.handed_on,
            "given_back_total": self.given_back,
            "level": self._level,
            "redis_calls_total": self._calls.calls,
            "error": self._calls.failing,
        }

    # -- the background tasks -------------------------------------------------------------

    async def _send_requests(self) -> None:
        """Send the requests made so far in one call, again and again (one of
        :data:`SENDERS` tasks); tried again (in their order, with growing waits) while Redis
        does not answer."""
        delay = RETRY_S[0]
        while True:
            await self._requested.wait()
            self._requested = trio.Event()
            requests, self._pending = self._pending, []
            # A place asked for by a waiter that left meanwhile (a retry, after a call that
            # failed or timed out) is not asked for again: Redis forgets a give-up after two
            # leases, and the place would then be queued for nobody.
            requests = [r for r in requests if r[0] != "A" or r[1] in self._waiting]
            requests = [sent for request in requests for sent in self._as_sent(request)]
            if not requests:  # the other sender took them, or none is wanted any more
                continue
            args = [*self._base]
            for request in requests:
                args += request
            try:
                answer: list[Any] = await self._calls.once(
                    "queueing for and giving back slots",
                    partial(self._requests, keys=[], args=args),
                )
                self._level = float(answer[0])
                granted = [str(slot_id) for slot_id in answer[1:]]
            except Exception as exc:
                # Redis down is logged once by the calls; anything else is a bug, and the
                # task that sends every request of this process must outlive it.
                if not isinstance(exc, LimitsUnavailable):
                    logger.exception("capacity: sending requests failed")
                self._pending[:0] = requests
                self._requested.set()
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_S[1])
                continue
            delay = RETRY_S[0]
            told = [r[1] for r in requests if r[0] in "RH"]
            told += [prior for r in requests if r[0] == "H" for prior in r[4].split()]
            self._unreleased.difference_update(told)
            self._untold.difference_update(told)
            self._wake(granted)

    def _as_sent(self, request: tuple[str, ...]) -> list[tuple[str, ...]]:
        """A request as it goes to Redis now. A hand-on whose heir has left since: if the heir
        handed the slot on in turn, that hand-on names this one's slots (its chain) and tells
        it all, so this one is not sent; if the heir gave the slot back, this one's slots are
        given back (sent as a hand-on retried after Redis forgot that giving back, it would
        hold the heir again)."""
        if request[0] != "H" or request[2] in self._holding:
            return [request]
        if request[2] in self._untold:
            return []
        return [("R", slot_id) for slot_id in (request[1], *request[4].split())]

    async def renew_once(self) -> None:
        """Renew this process's leases, learn of grants.

        Raises:
            LimitsUnavailable: Redis did not answer.
        """
        args = [*self._base, str(len(self._holding))]
        for slot_id, job in self._holding.items():
            chain = [prior for prior in self._stands_for.get(slot_id, ()) if prior in self._untold]
            if chain:
                self._stands_for[slot_id] = chain
            else:
                self._stands_for.pop(slot_id, None)
            args += [slot_id, job, " ".join(chain)]
        for slot_id, waiting in self._waiting.items():
            args += [slot_id, waiting.job, str(waiting.priority)]
        sent_at = trio.current_time()  # the leases run from when Redis renews them, not later
        answer: list[Any] = await self._calls.once(
            "renewing slot leases", lambda: self._renew(keys=[], args=args)
        )
        self._seen = (int(answer[0]), int(answer[1]), int(answer[2]))
        self._level = float(answer[3])
        self._renewed_at = sent_at
        self._wake(str(slot_id) for slot_id in answer[4:])

    def _leases_hold(self) -> bool:
        """This process's leases are still running in Redis (renewed within two thirds of a
        lease): cut off from Redis for longer, it hands nothing on, as its slots may have
        been freed there and handed out again."""
        renewed_at = self._renewed_at
        return renewed_at is not None and trio.current_time() - renewed_at < self.lease_s * 2 / 3

    def _wake(self, slot_ids: Any) -> None:
        for slot_id in slot_ids:
            self._grant(slot_id)

    async def _keep_leases(self) -> None:
        while True:
            with suppress(LimitsUnavailable):  # logged once by the calls; tried again next
                await self.renew_once()
            await trio.sleep(self.lease_s / 3)

    async def _read_grants(self) -> None:
        """Wake this process's waiters granted a slot, as the grants come into its stream.

        The stream is this process's alone (its node id is new at each start), so reading it
        from its start misses nothing; while Redis cannot be read, the renewal finds grants.
        """
        client = self._calls.client
        key = f"{self.prefix}grants:{self.node}"
        cursor = "0-0"
        delay = RETRY_S[0]
        while True:
            try:
                answer: Any = await client.xread(
                    {key: cursor}, count=GRANTS_READ_COUNT, block=GRANTS_BLOCK_MS
                )
            except REDIS_ERRORS as exc:
                logger.debug("capacity: reading grants again after %r", exc)
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_S[1])
                continue
            delay = RETRY_S[0]
            for entries in (answer or {}).values():
                for entry in entries:
                    cursor = str(entry.identifier)
                    self._wake(str(entry.field_values.get("ids", "")).split())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send the requests, renew leases and listen for grants until cancelled."""
        async with trio.open_nursery() as nursery:
            for n in range(SENDERS):
                nursery.start_soon(self._send_requests, name=f"capacity requests {n + 1}")
            for name, loop in (("leases", self._keep_leases), ("grants", self._read_grants)):
                nursery.start_soon(
                    partial(keep_running, f"capacity's {name}", loop, self.failures, log=logger),
                    name=f"capacity {name}",
                )
            task_status.started()


@asynccontextmanager
async def open_redis_capacity(
    client: coredis.Redis[str], *, prefix: str, capacity: int, lease_s: float = CAPACITY_LEASE_S
) -> AsyncIterator[RedisCapacity]:
    """A :class:`RedisCapacity`, its tasks running; on exit, its slots and places are given
    back (within :data:`RELEASE_TIMEOUT_S`)."""
    limiter = RedisCapacity(client, prefix=prefix, capacity=capacity, lease_s=lease_s)
    async with trio.open_nursery() as nursery:
        await nursery.start(limiter.run)
        try:
            yield limiter
        finally:
            nursery.cancel_scope.cancel()
            leftover = {*limiter._holding, *limiter._waiting, *limiter._unreleased}
            args = [*limiter._base]
            for slot_id in leftover:
                args += ["R", slot_id]
            if leftover:
                with (
                    trio.move_on_after(RELEASE_TIMEOUT_S, shield=True),
                    suppress(LimitsUnavailable),
                ):
                    await limiter._calls.once(
                        "giving slots back", lambda: limiter._requests(keys=[], args=args)
                    )
