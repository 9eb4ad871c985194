"""Limits that hold across every process sharing one Redis (``STORE=redis``).

Each limit has a port its users depend on and a local implementation for one process; the
Redis ones here hold across processes:

* capacity (``MAX_CONCURRENCY``): :class:`~actors.capacity.Capacity`, local
  :class:`~actors.capacity.FairCapacity`, shared :mod:`actors.limits.redis_capacity`.

Key layout, under ``P`` = ``REDIS_PREFIX`` (the scripts, in :mod:`actors.limits.scripts`,
describe each key)::

    P limits:capacity:...       the slots of MAX_CONCURRENCY, their holders and waiters
"""
