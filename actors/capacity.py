"""Fair sharing of the capacity (``MAX_CONCURRENCY``) across jobs: the port and the local one."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import attrs
import trio

from actors.messages import CapacityStatistics


class Capacity(Protocol):
    """What image workers take a slot of: at most ``MAX_CONCURRENCY`` attempts hold one at
    once, handed out max-min fairly across jobs (see :class:`FairCapacity`).

    :class:`FairCapacity` holds the slots of one process; ``actors.limits.redis_capacity``
    holds them in Redis, across every process sharing its prefix, max-min fair per share (each
    process turns its jobs' whole shares over itself, in this order; the rest goes round in
    this order cluster-wide).
    Leaving the block (cancelled or not) always gives the slot back, and a wait cancelled
    before its grant leaves no slot held.
    """

    def slot(self, tenant_key: str, *, priority: int = 0) -> AbstractAsyncContextManager[None]:
        """Hold one slot, taken in ``tenant_key``'s fair turn, for the body of the block;
        within a tenant, the lowest ``priority`` goes first, then the one that asked first."""
        ...

    def statistics(self) -> CapacityStatistics: ...


@attrs.define(eq=False, order=False)
class _Waiter:
    key: tuple[int, int]
    granted: trio.Event = attrs.Factory(trio.Event)

    def __lt__(self, other: _Waiter) -> bool:
        return self.key < other.key


@attrs.define(eq=False)
class _Tenant:
    seq: int
    in_use: int = 0
    last_grant: int = -1
    queue: list[_Waiter] = attrs.Factory(list)  # a heap: lowest priority value first


class FairCapacity:
    """Hands out the tokens of one ``trio.CapacityLimiter`` fairly across jobs.

    ``trio.CapacityLimiter`` is FIFO, so a job that queues 20 attempts would make the next job's
    first image wait behind all of them. Here every waiting attempt queues under its job, and a
    free token goes to the waiting job that holds the **fewest tokens**; ties go to the job that
    was served least recently, then to the oldest job (max-min fairness, round-robin on ties).
    So with capacity C and J jobs submitted together, every job's first image starts within the
    first ``ceil(J / C)`` rounds, whatever the jobs' sizes. Within a job, the attempt with the
    lowest ``priority`` goes first (workers pass their image index, so images start in order),
    then the one that asked first.

    The tokens themselves are borrowed from the limiter on the attempt's behalf, so
    ``limiter.statistics()`` stays the truth about what is in use.

    Concurrency: owned by the Supervisor; used by every image worker through :meth:`slot`.
    All bookkeeping is synchronous; a grant happens when a token is released or when a new
    attempt arrives, after one checkpoint so that attempts arriving in the same scheduling
    batch are all queued before anything is granted.
    """

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self.limiter = limiter
        self._tenants: dict[object, _Tenant] = {}
        self._seq = itertools.count()
        self._grants = itertools.count()

    @asynccontextmanager
    async def slot(self, tenant_key: object, *, priority: int = 0) -> AsyncIterator[None]:
        """Hold one token, taken in ``tenant_key``'s fair turn, for the body of the block."""
        tenant = self._tenants.get(tenant_key)
        if tenant is None:
            tenant = self._tenants[tenant_key] = _Tenant(seq=next(self._seq))
        waiter = _Waiter(key=(priority, next(self._seq)))
        heapq.heappush(tenant.queue, waiter)
        try:
            await trio.lowlevel.checkpoint()
            self._dispatch()
            await waiter.granted.wait()
        except BaseException:
            if waiter.granted.is_set():
                self._release(tenant_key, tenant, waiter)
            else:
                tenant.queue.remove(waiter)
                heapq.heapify(tenant.queue)
                self._forget_if_idle(tenant_key, tenant)
            raise
        try:
            yield
        finally:
            self._release(tenant_key, tenant, waiter)

    def statistics(self) -> CapacityStatistics:
        stats = self.limiter.statistics()
        return CapacityStatistics(
            total=int(stats.total_tokens),
            in_use=stats.borrowed_tokens,
            waiting=sum(len(t.queue) for t in self._tenants.values()),
            jobs_waiting=sum(1 for t in self._tenants.values() if t.queue),
        )

    def _release(self, tenant_key: object, tenant: _Tenant, waiter: _Waiter) -> None:
        self.limiter.release_on_behalf_of(waiter)
        tenant.in_use -= 1
        self._forget_if_idle(tenant_key, tenant)
        self._dispatch()

    def _forget_if_idle(self, tenant_key: object, tenant: _Tenant) -> None:
        if not tenant.queue and tenant.in_use == 0:
            self._tenants.pop(tenant_key, None)

    def _dispatch(self) -> None:
        while self.limiter.available_tokens >= 1:
            waiting = [t for t in self._tenants.values() if t.queue]
            if not waiting:
                return
            tenant = min(waiting, key=lambda t: (t.in_use, t.last_grant, t.seq))
            waiter = heapq.heappop(tenant.queue)
            self.limiter.acquire_on_behalf_of_nowait(waiter)
            tenant.in_use += 1
            tenant.last_grant = next(self._grants)
            waiter.granted.set()
