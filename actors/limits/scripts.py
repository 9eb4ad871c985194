"""The Lua scripts of the limits kept in Redis (``actors/limits/__init__.py`` has the key layout).

Each runs atomically on the one Redis primary, and takes its time from Redis (``TIME``), so
every process agrees on when a lease or a window ends whatever its own clock says. Key names
are built from the prefix (``ARGV[1]``) inside the scripts, as the store's scripts do.
"""

from __future__ import annotations

# --- capacity: a semaphore of leased slots, handed out max-min fairly across jobs -----------
#
# ARGV[1] the prefix ``C`` of the capacity's keys, ARGV[2] the capacity, ARGV[3] the lease (ms).
# Keys (``C`` + name):
#   holders   zset  slot holder id -> lease end (ms)        holder  hash  holder id -> job
#   waiters   zset  waiter id -> lease end (ms)              waiter  hash  waiter id -> job
#   wmember   hash  waiter id -> its member in its job's queue
#   jobs      zset  the jobs with waiters: score = slots held, member = last grant, age, job
#                   (zero-padded, so that ties order as ``FairCapacity`` orders them)
#   active    zset  every job holding or waiting: score = its demand, min(capacity, held +
#                   waiting)
#   demands   hash  demand -> how many jobs in ``active`` have it: each answer's water level is
#                   computed from it, in steps of distinct demands (at most the capacity), not
#                   of jobs
#   job:<j>   hash  in_use, last (grant number, 0: never), seq (age), member (in ``jobs``)
#   queue:<j> zset  the job's waiters: score = priority, member = arrival, waiter id
#   gone      zset  ids released lately -> until when a renewal must not bring them back
#   seq       string a counter (jobs' ages, arrivals, grant numbers)
#   grants:<node>  stream  the ids of a process's waiters granted a slot by one script run
#                    (field ``ids``, space-separated; a waiter's id is ``<node>/<n>``), read by
#                    that process with a blocking XREAD; trimmed, and gone an hour after its last
#   grants    channel  the same ids, all processes' (read by processes of an earlier release)
_CAPACITY_PRELUDE = r"""#!lua
local C, cap, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local HOLDERS, HOLDER, WAITERS, WAITER, WMEMBER = C .. 'holders', C .. 'holder', C .. 'waiters',
  C .. 'waiter', C .. 'wmember'
local JOBS, GONE, SEQ, CHANNEL = C .. 'jobs', C .. 'gone', C .. 'seq', C .. 'grants'
local ACTIVE, DEMANDS = C .. 'active', C .. 'demands'
local function job_key(job) return C .. 'job:' .. job end
local function queue_key(job) return C .. 'queue:' .. job end
local function pad(n) return string.format('%016d', n) end

-- Set a job's demand (``nil``: none, it is idle) in ``active`` and ``demands``.
local function set_demand(job, demand)
  local old = redis.call('ZSCORE', ACTIVE, job)
  if old then
    old = tostring(math.floor(tonumber(old)))
    if demand and old == tostring(demand) then return end
    if redis.call('HINCRBY', DEMANDS, old, -1) <= 0 then redis.call('HDEL', DEMANDS, old) end
  end
  if demand then
    redis.call('ZADD', ACTIVE, demand, job)
    redis.call('HINCRBY', DEMANDS, tostring(demand), 1)
  elseif old then
    redis.call('ZREM', ACTIVE, job)
  end
end

-- Put the job at its place among the waiting jobs (or out of them); forget an idle job.
local function place(job)
  local jk = job_key(job)
  local state = redis.call('HMGET', jk, 'in_use', 'last', 'seq', 'member')
  local in_use = tonumber(state[1]) or 0
  if state[4] then redis.call('ZREM', JOBS, state[4]) end
  local waiting = redis.call('ZCARD', queue_key(job))
  if waiting == 0 and in_use <= 0 then
    redis.call('DEL', jk)
    set_demand(job, nil)
    return
  end
  set_demand(job, math.min(cap, in_use + waiting))
  if waiting == 0 then
    redis.call('HDEL', jk, 'member')
  else
    local member = pad(tonumber(state[2]) or 0) .. ':' .. pad(tonumber(state[3]) or 0) .. ':' .. job
    redis.call('ZADD', JOBS, in_use, member)
    redis.call('HSET', jk, 'member', member)
  end
end

local function touch_job(job)
  local jk = job_key(job)
  if redis.call('EXISTS', jk) == 0 then
    redis.call('HSET', jk, 'in_use', 0, 'last', 0, 'seq', redis.call('INCR', SEQ))
  end
end

-- Queue a waiter (or renew its lease if it waits already; one holding a slot is left alone).
local function enqueue(id, job, priority)
  if redis.call('ZSCORE', HOLDERS, id) then  -- granted already: its process learns so now
    redis.call('ZADD', HOLDERS, now + lease, id)
    return
  end
  if redis.call('ZSCORE', GONE, id) then return end
  redis.call('ZADD', WAITERS, now + lease, id)
  if redis.call('HEXISTS', WAITER, id) == 1 then return end
  touch_job(job)
  local member = pad(redis.call('INCR', SEQ)) .. ':' .. id
  redis.call('HSET', WAITER, id, job)
  redis.call('HSET', WMEMBER, id, member)
  redis.call('ZADD', queue_key(job), tonumber(priority), member)
  place(job)
end

local function drop_waiter(id)
  redis.call('ZREM', WAITERS, id)
  local job = redis.call('HGET', WAITER, id)
  if not job then return false end
  redis.call('ZREM', queue_key(job), redis.call('HGET', WMEMBER, id))
  redis.call('HDEL', WAITER, id)
  redis.call('HDEL', WMEMBER, id)
  place(job)
  return true
end

local function drop_holder(id)
  redis.call('ZREM', HOLDERS, id)
  local job = redis.call('HGET', HOLDER, id)
  if not job then return false end
  redis.call('HDEL', HOLDER, id)
  redis.call('HINCRBY', job_key(job), 'in_use', -1)
  place(job)
  return true
end

local function hold(id, job)
  redis.call('ZADD', HOLDERS, now + lease, id)
  redis.call('HSET', HOLDER, id, job)
  touch_job(job)
  redis.call('HINCRBY', job_key(job), 'in_use', 1)
end

-- Slots of dead processes (leases not renewed) and their waiters go.
local function purge()
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', HOLDERS, '-inf', now)) do drop_holder(id) end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', WAITERS, '-inf', now)) do drop_waiter(id) end
  redis.call('ZREMRANGEBYSCORE', GONE, '-inf', now)
end

local function node_of(id) return string.match(id, '^(.*)/%d+$') end

-- The water level of the max-min fair shares of the capacity across the jobs holding or
-- waiting: a job's share is min(its demand, level). As a string (a Lua number in an answer
-- would be cut to an integer); the capacity itself when every demand is met, or when no job
-- waits (nothing to share: the jobs hold what they ask for).
local function level()
  if redis.call('EXISTS', JOBS) == 0 then return tostring(cap) end
  local counts, demands, n = {}, {}, 0
  local entries = redis.call('HGETALL', DEMANDS)
  for i = 1, #entries, 2 do
    local demand, count = tonumber(entries[i]), tonumber(entries[i + 1])
    counts[demand] = count
    demands[#demands + 1] = demand
    n = n + count
  end
  table.sort(demands)
  local left = cap
  for _, demand in ipairs(demands) do  -- (the jobs of one demand fare alike: one step each)
    if demand * n > left then return tostring(left / n) end
    left, n = left - demand * counts[demand], n - counts[demand]
  end
  return tostring(cap)
end

-- The first of the ids in ``chain`` (space-separated) that holds a slot, if any.
local function first_holder(chain)
  for id in string.gmatch(chain, '%S+') do
    if redis.call('ZSCORE', HOLDERS, id) then return id end
  end
  return nil
end

-- A process handed the slot ``released`` on to its own waiter ``id`` of ``job`` (it may, within
-- its share; see ``RedisCapacity``): the slot changes hands, and the job counts as served.
-- ``chain``: the slots ``released`` itself replaced by earlier hand-ons Redis may not have had
-- (space-separated, newest first), whose own requests may come later or never. ``id`` granted
-- meanwhile by a dispatch (a race of one call) keeps the one slot; one given up (in ``gone``)
-- takes none. ``released`` and the chain are all given back, held or waiting (a dispatch may
-- have granted one of them a slot its process merged into this one, or may be about to), and
-- marked gone, so a request of theirs coming late changes nothing.
local function hand_on(released, id, job, chain)
  if not redis.call('ZSCORE', HOLDERS, id) and not redis.call('ZSCORE', GONE, id) then
    hold(id, job)
    drop_waiter(id)  -- (after ``hold``: the job, holding, keeps its age)
    redis.call('HSET', job_key(job), 'last', redis.call('INCR', SEQ))
    place(job)
  end
  local replaced = {released}
  for prior in string.gmatch(chain, '%S+') do replaced[#replaced + 1] = prior end
  for _, slot in ipairs(replaced) do
    if not drop_holder(slot) then drop_waiter(slot) end
    redis.call('ZADD', GONE, now + 2 * lease, slot)
  end
end

-- Free slots go to the waiting job holding the fewest, ties to the one served least lately,
-- then to the oldest; within it, to the lowest priority, then the first to ask. The grants go
-- into each granted waiter's process's stream, except ``answered``'s (the caller's process,
-- which wakes its own from the answer).
local function dispatch(answered)
  local granted = {}
  while redis.call('ZCARD', HOLDERS) < cap do
    local top = redis.call('ZRANGE', JOBS, 0, 0)[1]
    if not top then break end
    local job = string.match(top, '^%d+:%d+:(.*)$')
    local first = redis.call('ZRANGE', queue_key(job), 0, 0)[1]
    local id = string.match(first, '^%d+:(.*)$')
    redis.call('ZREM', queue_key(job), first)
    redis.call('ZREM', WAITERS, id)
    redis.call('HDEL', WAITER, id)
    redis.call('HDEL', WMEMBER, id)
    hold(id, job)
    redis.call('HSET', job_key(job), 'last', redis.call('INCR', SEQ))
    place(job)
    granted[#granted + 1] = id
  end
  if #granted > 0 then
    redis.call('PUBLISH', CHANNEL, table.concat(granted, ' '))
    local by_node = {}
    for _, id in ipairs(granted) do
      local node = node_of(id)
      if node and node ~= answered then
        if not by_node[node] then by_node[node] = {} end
        table.insert(by_node[node], id)
      end
    end
    for node, ids in pairs(by_node) do
      local key = C .. 'grants:' .. node
      redis.call('XADD', key, 'MAXLEN', '~', 1000, '*', 'ids', table.concat(ids, ' '))
      redis.call('PEXPIRE', key, 3600000)
    end
  end
  return granted
end
"""

#: ARGV[4...] one process's operations, in the order its tasks asked for them: ``A id job
#: priority`` queues a waiter (again, if its lease ran out; a no-op if it waits or holds), ``R
#: id`` gives a slot back or stops waiting, ``H released id job chain`` tells of a slot the
#: process handed on to its own waiter (see ``hand_on``). Then free slots are handed out, once
#: for them all.
#: Returns the water level (see ``level``), then the ids this call granted, then those of the
#: queued waiters that held a slot already: the caller wakes its own from this answer (their
#: grants go into no stream), the other processes' from their streams.
CAPACITY_CALLS = (
    _CAPACITY_PRELUDE
    + r"""
purge()
local asked = {}
local i = 4
while i <= #ARGV do
  local id = ARGV[i + 1]
  if ARGV[i] == 'A' then
    enqueue(id, ARGV[i + 2], ARGV[i + 3])
    asked[#asked + 1] = id
    i = i + 4
  elseif ARGV[i] == 'H' then
    hand_on(id, ARGV[i + 2], ARGV[i + 3], ARGV[i + 4])
    i = i + 5
  else
    if not drop_holder(id) then drop_waiter(id) end
    redis.call('ZADD', GONE, now + 2 * lease, id)
    i = i + 2
  end
end
local answer, listed = {}, {}
local granted = dispatch(ARGV[5] and node_of(ARGV[5]))
answer[1] = level()
for _, id in ipairs(granted) do
  answer[#answer + 1] = id
  listed[id] = true
end
for _, id in ipairs(asked) do
  if not listed[id] and redis.call('ZSCORE', HOLDERS, id) then answer[#answer + 1] = id end
end
return answer
"""
)

#: ARGV[4] the number H of holders, then H triples ``id job chain`` (``chain``: the slots the
#: holder replaced by hand-ons Redis may not have had yet, newest first; if one of them holds,
#: it is the one renewed), then triples ``id job priority`` of waiters. Renews every lease (a
#: holder whose lease ran out holds again: it is still running), hands out free slots, and
#: drops the demands of jobs no longer known (left by a process of an earlier release, which
#: kept no demands). Returns slots held, waiters and waiting jobs (cluster-wide), the water
#: level, then the ids of the given waiters that hold a slot now.
CAPACITY_RENEW = (
    _CAPACITY_PRELUDE
    + r"""
local holders = tonumber(ARGV[4])
local i = 5
for _ = 1, holders do
  local id, job = ARGV[i], ARGV[i + 1]
  local prior = first_holder(ARGV[i + 2])
  if prior then
    redis.call('ZADD', HOLDERS, now + lease, prior)
  elseif redis.call('ZSCORE', HOLDERS, id) then
    redis.call('ZADD', HOLDERS, now + lease, id)
  elseif not redis.call('ZSCORE', GONE, id) then
    hold(id, job)
    drop_waiter(id)
    place(job)
  end
  i = i + 3
end
local waiting = {}
while i <= #ARGV do
  waiting[#waiting + 1] = ARGV[i]
  enqueue(ARGV[i], ARGV[i + 1], ARGV[i + 2])
  i = i + 3
end
purge()
dispatch()
for _, job in ipairs(redis.call('ZRANGE', ACTIVE, 0, -1)) do
  if redis.call('EXISTS', job_key(job)) == 0 then set_demand(job, nil) end
end
local answer = {redis.call('ZCARD', HOLDERS), redis.call('ZCARD', WAITERS),
  redis.call('ZCARD', JOBS), level()}
for _, id in ipairs(waiting) do
  if redis.call('ZSCORE', HOLDERS, id) then answer[#answer + 1] = id end
end
return answer
"""
)


# --- the create pace: a token bucket whose rate follows AIMD, as ``CreatePacer`` ------------
#
# ARGV[1] the pace's hash, ARGV[2] max rate (creates/s), ARGV[3] burst, ARGV[4] min rate,
# ARGV[5] the rate step, then the operation's own. The hash holds tokens (negative: bookings
# ahead of the bucket), stamp (s: when tokens were counted; after now while paused), rate,
# paused (s: when the latest 429's pause ends) and throttles (429s so far). Times are Redis's
# (seconds); answers give times as seconds from now, and numbers as strings (Lua numbers
# would be truncated to integers).
_PACE_PRELUDE = r"""#!lua
local key, max_rate, burst = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local min_rate, step = tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', key, 'tokens', 'stamp', 'rate', 'paused', 'throttles')
local tokens, stamp = tonumber(s[1]) or burst, tonumber(s[2]) or now
local rate, paused = math.min(tonumber(s[3]) or max_rate, max_rate), tonumber(s[4]) or 0
local throttles = tonumber(s[5]) or 0
local function save()
  redis.call('HSET', key, 'tokens', tostring(tokens), 'stamp', tostring(stamp),
    'rate', tostring(rate), 'paused', tostring(paused), 'throttles', throttles)
  redis.call('EXPIRE', key, 86400)
end
local function answer(delay)
  return {tostring(delay), throttles, tostring(rate)}
end
"""

#: Books one create: {seconds from now until it may go, throttles, rate}.
PACE_BOOK = (
    _PACE_PRELUDE
    + r"""
if now > stamp then
  tokens = math.min(burst, tokens + (now - stamp) * rate)
  stamp = now
end
tokens = tokens - 1
local debt = 0
if tokens < -1e-9 then debt = -tokens end
save()
return answer(math.max(now, stamp) + debt / rate - now)
"""
)

#: ARGV[6] the Retry-After (s). A 429: halve the rate, pause every create, no burst after.
#: Answers {seconds until the pause ends, throttles, rate}.
PACE_THROTTLED = (
    _PACE_PRELUDE
    + r"""
throttles = throttles + 1
rate = math.max(math.min(min_rate, max_rate), rate / 2)
paused = math.max(paused, now + tonumber(ARGV[6]))
tokens = 1
stamp = paused
save()
return answer(paused - now)
"""
)

#: An accepted create: the rate grows a step. Answers {pause left (s), throttles, rate}.
PACE_ACCEPTED = (
    _PACE_PRELUDE
    + r"""
rate = math.min(max_rate, rate + step)
if redis.call('EXISTS', key) == 1 then save() end
return answer(paused - now)
"""
)

#: Reads the pace: {seconds until the pause ends (negative: none), throttles, rate}.
PACE_READ = _PACE_PRELUDE + "\nreturn answer(paused - now)\n"
