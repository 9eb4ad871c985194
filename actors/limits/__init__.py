"""Limits that hold across every process sharing one Redis (``STORE=redis``).

Each limit has a port its users depend on and a local implementation for one process; the
Redis ones here hold across processes:

* capacity (``MAX_CONCURRENCY``): :class:`~actors.capacity.Capacity`, local
  :class:`~actors.capacity.FairCapacity`, shared :mod:`actors.limits.redis_capacity`;
* the Replicate create pace: :class:`~actors.providers.base.CreatePace`, local
  :class:`~actors.providers.pacing.LocalPace`, shared :mod:`actors.limits.redis_pace`;
* failed logins: ``web.login_throttle.LoginLimiter`` (the web layer's; its Redis one uses
  :mod:`actors.limits.calls`).

Key layout, under ``L`` = ``REDIS_LIMITS_PREFIX`` (by default ``<REDIS_PREFIX>limits:``; the
scripts, in :mod:`actors.limits.scripts`, describe each key)::

    L capacity:...              the slots of MAX_CONCURRENCY, their holders and waiters
    L pace                      hash: the create pace's token bucket (AIMD rate, pause)
    L login:<hash>              zset: one (client, email) pair's failed logins, by time
"""
