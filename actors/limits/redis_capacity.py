"""``MAX_CONCURRENCY`` across every process: a Redis semaphore of leased slots, fair across jobs.

A slot is an entry in a sorted set of holders scored by the end of its lease; the process that
holds it renews the leases of all its slots in one call every third of ``CAPACITY_LEASE_S``, so
the slot of a process that died (``kill -9``, a host gone) is free again once its lease ends. A
slot is handed out by a Lua script, so the count of holders never exceeds the capacity whatever
the number of processes, and it goes to the waiting job that holds the fewest slots across all
of them, ties to the one served least lately, then to the oldest; within a job, the lowest
priority, then the first to ask (the semantics of :class:`~actors.capacity.FairCapacity`).
The scripts are in :mod:`actors.limits.scripts`.

A waiter is woken by the entry the script run that granted it its slot adds to its process's
grants stream (releases, renewals and new waiters hand out free slots), which the process reads
with one blocking ``XREAD``, or, when its own process gave that slot back, by the release's
answer. The renewal also answers which of this process's waiters hold a slot now, so a grant
missed while Redis was unreachable costs at most a third of a lease. (The grants are published
on a channel too, for processes of an earlier release during a rolling deploy.)

Redis down: a waiter keeps trying to queue (with growing waits) and waits; slots held go on
being held (their work is running); a release that cannot be sent is sent again by the renewal
task, and would in any case end with its lease. A lease that ran out while this process could
not reach Redis is taken again by the next renewal, so for that long the holders may number
more than the capacity.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import attrs
import coredis
import trio

from actors.errors import LimitsUnavailable
from actors.limits import scripts
from actors.limits.calls import REDIS_ERRORS, RETRY_S, RedisCalls
from actors.messages import CapacityStatistics

logger = logging.getLogger("actors.limits")

#: How long a slot outlives its holder's last renewal (``CAPACITY_LEASE_S``).
CAPACITY_LEASE_S = 5.0
#: How long giving a slot back may hold up the task leaving it (then the renewal task retries).
RELEASE_TIMEOUT_S = 2.0
#: How long one blocking read of the grants stream waits (under the client's stream timeout).
GRANTS_BLOCK_MS = 2000
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


class RedisCapacity:
    """``capacity`` slots shared by every process that uses ``prefix`` on one Redis.

    Args:
        client: An entered ``coredis.Redis`` with ``decode_responses=True``.
        prefix: The start of the capacity's keys (e.g. ``imagegen:limits:capacity:``).
        capacity: Slots held at once across all processes (``MAX_CONCURRENCY``); every process
            sharing the prefix must be given the same.
        lease_s: How long a slot outlives its holder's last renewal.

    Concurrency: opened with :func:`open_redis_capacity`, which runs :meth:`run` (the renewal
    and the reader of its grants stream); any number of tasks use :meth:`slot` at once.
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
        self._acquire = client.register_script(scripts.CAPACITY_ACQUIRE)
        self._release = client.register_script(scripts.CAPACITY_RELEASE)
        self._renew = client.register_script(scripts.CAPACITY_RENEW)
        self._ids = itertools.count(1)
        self._waiting: dict[str, _Waiting] = {}
        self._holding: dict[str, str] = {}  # slot id -> job
        self._unreleased: set[str] = set()
        #: Cluster-wide figures as of the latest renewal: slots held, waiters, jobs waiting.
        self._seen = (0, 0, 0)

    @property
    def _base(self) -> list[str]:
        return [self.prefix, str(self.capacity), str(max(1, round(self.lease_s * 1000)))]

    @asynccontextmanager
    async def slot(self, tenant_key: str, *, priority: int = 0) -> AsyncIterator[None]:
        """Hold one slot, taken in ``tenant_key``'s fair turn across all processes."""
        slot_id = f"{self.node}/{next(self._ids)}"
        waiting = self._waiting[slot_id] = _Waiting(tenant_key, priority)
        try:
            args = [*self._base, slot_id, tenant_key, str(priority)]
            granted: int = await self._calls.until_done(
                "queueing for a slot", lambda: self._acquire(keys=[], args=args)
            )
            if not granted:
                await waiting.granted.wait()
            self._holding[slot_id] = tenant_key
        except BaseException:
            with trio.move_on_after(RELEASE_TIMEOUT_S, shield=True):
                await self._give_back(slot_id)
            raise
        finally:
            del self._waiting[slot_id]
        try:
            yield
        finally:
            with trio.move_on_after(RELEASE_TIMEOUT_S, shield=True):
                await self._give_back(slot_id)

    async def _give_back(self, slot_id: str) -> None:
        """Release the slot (or the place in the queue). Callers shield it and bound it with
        :data:`RELEASE_TIMEOUT_S`; unless it gets through, the renewal task sends it again
        (and the lease, no longer renewed, ends anyway)."""
        self._holding.pop(slot_id, None)
        self._unreleased.add(slot_id)
        args = [*self._base, slot_id]
        with suppress(LimitsUnavailable):
            answer: list[Any] = await self._calls.once(
                "giving a slot back", lambda: self._release(keys=[], args=args)
            )
            self._unreleased.discard(slot_id)
            self._wake(str(granted) for granted in answer[1:])

    def statistics(self) -> CapacityStatistics:
        """Cluster-wide figures as of the latest renewal (a third of a lease old at most)."""
        held, waiters, jobs = self._seen
        return CapacityStatistics(
            total=self.capacity, in_use=held, waiting=waiters, jobs_waiting=jobs
        )

    def local_statistics(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "holding": len(self._holding),
            "waiting": len(self._waiting),
            "unreleased": len(self._unreleased),
            "redis_calls": self._calls.calls,
            "error": self._calls.failing,
        }

    # -- the background tasks -------------------------------------------------------------

    async def renew_once(self) -> None:
        """Renew this process's leases, send releases that failed, learn of grants.

        Raises:
            LimitsUnavailable: Redis did not answer.
        """
        if self._unreleased:
            gone = list(self._unreleased)
            released: list[Any] = await self._calls.once(
                "giving slots back", lambda: self._release(keys=[], args=[*self._base, *gone])
            )
            self._unreleased.difference_update(gone)
            self._wake(str(granted) for granted in released[1:])
        args = [*self._base, str(len(self._holding))]
        for slot_id, job in self._holding.items():
            args += [slot_id, job]
        for slot_id, waiting in self._waiting.items():
            args += [slot_id, waiting.job, str(waiting.priority)]
        answer: list[Any] = await self._calls.once(
            "renewing slot leases", lambda: self._renew(keys=[], args=args)
        )
        self._seen = (int(answer[0]), int(answer[1]), int(answer[2]))
        self._wake(str(slot_id) for slot_id in answer[3:])

    def _wake(self, slot_ids: Any) -> None:
        for slot_id in slot_ids:
            waiting = self._waiting.get(slot_id)
            if waiting is not None:
                waiting.granted.set()

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
        """Renew leases and listen for grants until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_leases, name="capacity leases")
            nursery.start_soon(self._read_grants, name="capacity grants")
            task_status.started()


@asynccontextmanager
async def open_redis_capacity(
    client: coredis.Redis[str], *, prefix: str, capacity: int, lease_s: float = CAPACITY_LEASE_S
) -> AsyncIterator[RedisCapacity]:
    """A :class:`RedisCapacity`, its renewal running; on exit, its slots and places are given
    back (bounded, as any release)."""
    limiter = RedisCapacity(client, prefix=prefix, capacity=capacity, lease_s=lease_s)
    async with trio.open_nursery() as nursery:
        await nursery.start(limiter.run)
        try:
            yield limiter
        finally:
            nursery.cancel_scope.cancel()
            leftover = [*limiter._holding, *limiter._waiting, *limiter._unreleased]
            args = [*limiter._base, *leftover]
            if leftover:
                with (
                    trio.move_on_after(RELEASE_TIMEOUT_S, shield=True),
                    suppress(LimitsUnavailable),
                ):
                    await limiter._calls.once(
                        "giving slots back", lambda: limiter._release(keys=[], args=args)
                    )
