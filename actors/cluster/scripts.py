"""The Lua scripts of the cluster (``actors/cluster/node.py`` documents the keys they use).

Each runs atomically on the one Redis primary. A job is run by the node holding its lease
(``P lease:<id>``, a node id with a TTL); its entry in the job queue (``P queue``, a stream read
by the consumer group ``nodes``) stays pending until the job ends or is handed over, so that a
dead node's jobs are found by ``XAUTOCLAIM`` once their entries have been idle for a lease.
"""

from __future__ import annotations

#: The consumer group of the job queue: every node is a consumer of it.
GROUP = "nodes"

#: ARGV: prefix, node id, lease (ms), job id, queue entry id. Takes the job's lease for this node.
#: Returns ``{"ok", cancel}`` (the lease is ours; ``cancel`` is 1 when the job was cancelled
#: while queued), ``{"gone", 0}`` (finished or deleted: the entry is acknowledged and removed)
#: or ``{"held", 0}`` (another live node holds it).
ADMIT = r"""#!lua
local P, node, ttl, id, entry = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local status = redis.call('HGET', P .. 'job:' .. id .. ':record', 'status')
if status == false or status == 'completed' or status == 'failed' or status == 'canceled' then
  redis.pcall('XACK', P .. 'queue', 'nodes', entry)
  redis.call('XDEL', P .. 'queue', entry)
  if redis.call('HGET', P .. 'entries', id) == entry then redis.call('HDEL', P .. 'entries', id) end
  return {'gone', 0}
end
local lease = P .. 'lease:' .. id
local held = redis.call('GET', lease)
if held ~= false and held ~= node then return {'held', 0} end
redis.call('SET', lease, node, 'PX', ttl)
local cancel = redis.call('EXISTS', P .. 'job:' .. id .. ':cancel')
return {'ok', cancel}
"""

#: ARGV: prefix, node id, lease (ms), taking, then ``job id, entry id`` pairs of the jobs this
#: node runs. Renews each lease (taking a lapsed one again, as nobody else holds it, unless
#: another node ended the job, or a node deleted it, meanwhile), and resets the idle time of
#: each job's queue entry so that no other node claims it. A node taking jobs (``1``: it has
#: room and is not draining) is kept in ``P takers`` for a lease (the store's batch script
#: weighs the jobs a node keeps against theirs). Returns ``{lost, cancelled}``: the ids of jobs
#: another node holds, ended or deleted now, and of jobs someone asked to cancel.
RENEW = r"""#!lua
local P, node, ttl, taking = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local lost, cancelled = {}, {}
for i = 5, #ARGV, 2 do
  local id, entry = ARGV[i], ARGV[i + 1]
  local lease = P .. 'lease:' .. id
  local held = redis.call('GET', lease)
  if held == false then
    -- Lapsed (this node was cut off for a lease): another node may have taken the job and ended
    -- it (cancelled, or run to its end), or deleted it, meanwhile; then it is not this node's
    -- to go on with. (A record gone without a trace is Redis's loss: the job goes on here.)
    local status = redis.call('HGET', P .. 'job:' .. id .. ':record', 'status')
    if status == false then
      if redis.call('EXISTS', P .. 'gone:' .. id) == 1 then held = '' end
    elseif status == 'completed' or status == 'failed' or status == 'canceled' then
      local by = P .. 'job:' .. id .. ':ended_by'  -- this node's end, its answer lost: kept
      if redis.call('TYPE', by).ok ~= 'string' or redis.call('GET', by) ~= node then held = '' end
    end
  end
  if held == node or held == false then
    redis.call('SET', lease, node, 'PX', ttl)
    -- pcall: a Redis that lost the queue (restarted without persistence) still renews leases.
    redis.pcall('XCLAIM', P .. 'queue', 'nodes', node, 0, entry, 'JUSTID')
    if redis.call('EXISTS', P .. 'job:' .. id .. ':cancel') == 1 then
      cancelled[#cancelled + 1] = id
    end
  else
    lost[#lost + 1] = id
  end
end
-- The nodes taking jobs (the store's batch script weighs the jobs a node keeps against theirs).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', P .. 'takers', '-inf', now)
if taking == '1' then
  redis.call('ZADD', P .. 'takers', now + tonumber(ttl), node)
else
  redis.call('ZREM', P .. 'takers', node)
end
return {lost, cancelled}
"""

#: ARGV: prefix, node id, job id, entry id, requeue (``1`` hands the job over: a new queue entry
#: for any node to take). Lets go of the job's lease if it is ours and removes its entry;
#: returns 0 and changes nothing if another node holds the lease now.
RELEASE = r"""#!lua
local P, node, id, entry, requeue = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local lease = P .. 'lease:' .. id
local held = redis.call('GET', lease)
if held == node then
  redis.call('DEL', lease)
elseif held ~= false then
  return 0  -- another node runs the job now: its entry is that node's
end
redis.pcall('XACK', P .. 'queue', 'nodes', entry)
redis.call('XDEL', P .. 'queue', entry)
if requeue == '1' then
  redis.call('HSET', P .. 'entries', id, redis.call('XADD', P .. 'queue', '*', 'job', id))
else
  redis.call('HDEL', P .. 'entries', id)
end
return 1
"""

#: ARGV: prefix, job id, wake stream TTL (ms), node id, lease (ms). Marks the job cancelled (a
#: node taking it later sees the mark) and tells the node holding it, through that node's wake
#: stream. A job no node holds (queued, or its node dead) is taken by the asking node, to end it
#: at once rather than when a node has room. Returns ``{code, entry id}``: code 0 for no such
#: job, 1 for a finished one (nothing to do), 2 when the mark is set, 3 when the job's lease is
#: the asking node's now (with the job's queue entry, for the node to run it to its end).
CANCEL = r"""#!lua
local P, id, ttl, node, lease_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local status = redis.call('HGET', P .. 'job:' .. id .. ':record', 'status')
if status == false then return {0, ''} end
if status == 'completed' or status == 'failed' or status == 'canceled' then return {1, ''} end
redis.call('SET', P .. 'job:' .. id .. ':cancel', '1')
local lease = P .. 'lease:' .. id
local held = redis.call('GET', lease)
if held then
  local wake = P .. 'node:' .. held .. ':wake'
  redis.call('XADD', wake, 'MAXLEN', '~', 64, '*', 'cancel', id)
  redis.call('PEXPIRE', wake, ttl)
  return {2, ''}
end
local entry = redis.call('HGET', P .. 'entries', id)
if entry == false then return {2, ''} end  -- queued before entries were kept: a taker ends it
redis.call('SET', lease, node, 'PX', lease_ms)
return {3, entry}
"""

#: ARGV: prefix, horizon (ms since the epoch), most finished jobs kept, most ids answered, and
#: the image directory's budget in bytes (empty: none). The finished jobs to forget,
#: cluster-wide: every one that finished before the horizon, the oldest ones over the count,
#: and the oldest ones whose files take the directory over its budget (their deletion is
#: written through the store's batch).
EXPIRED = r"""#!lua
local P, horizon, keep, limit = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local max_bytes = tonumber(ARGV[5])
local key = P .. 'finished'
local ids = redis.call('ZRANGEBYSCORE', key, '-inf', horizon, 'LIMIT', 0, limit)
local seen = {}
for _, id in ipairs(ids) do seen[id] = true end
local count = redis.call('ZCARD', key)
local over = count - keep
if over > 0 then
  for _, id in ipairs(redis.call('ZRANGE', key, 0, math.min(over, limit) - 1)) do
    if not seen[id] then
      ids[#ids + 1] = id
      seen[id] = true
    end
  end
end
if max_bytes == nil then return ids end
-- The budget: while the files of finished jobs (all files but those of unfinished jobs, which
-- are never evicted) take more than it, the oldest finished jobs go; the newest always stays.
local function bytes_of(list)
  local sum = 0
  for first = 1, #list, 500 do
    local chunk = {unpack(list, first, math.min(first + 499, #list))}
    for _, b in ipairs(redis.call('HMGET', P .. 'bytes', unpack(chunk))) do
      sum = sum + (tonumber(b) or 0)
    end
  end
  return sum
end
local finished_bytes = tonumber(redis.call('GET', P .. 'bytes_total') or '0')
  - bytes_of(redis.call('HKEYS', P .. 'active')) - bytes_of(ids)
local left, start = count - #ids, 0
while finished_bytes > max_bytes and left > 1 and #ids < limit do
  local batch = redis.call('ZRANGE', key, start, start + 99)
  if #batch == 0 then break end
  for _, id in ipairs(batch) do
    if finished_bytes <= max_bytes or left <= 1 or #ids >= limit then break end
    if not seen[id] then
      ids[#ids + 1] = id
      seen[id] = true
      finished_bytes = finished_bytes - (tonumber(redis.call('HGET', P .. 'bytes', id)) or 0)
      left = left - 1
    end
  end
  start = start + 100
end
return ids
"""

#: ARGV: prefix, the batch's token, then pairs ``job id, bytes``: the bytes of files a node
#: wrote for the jobs since its last call (negative: a file got smaller). A batch is added once
#: whatever the number of calls (the node sends it again, same token, when an answer is lost).
#: Returns the ids of jobs no longer stored (forgotten meanwhile: their bytes were taken off
#: with them), whose files are garbage.
ADD_BYTES = r"""#!lua
local P, token = ARGV[1], ARGV[2]
local gone = {}
if not redis.call('SET', P .. 'bytes_batch:' .. token, 1, 'NX', 'PX', 3600000) then
  return gone
end
for i = 3, #ARGV, 2 do
  local id, n = ARGV[i], tonumber(ARGV[i + 1])
  if redis.call('EXISTS', P .. 'job:' .. id .. ':record') == 1 then
    redis.call('HINCRBY', P .. 'bytes', id, n)
    redis.call('INCRBY', P .. 'bytes_total', n)
  else
    gone[#gone + 1] = id
  end
end
return gone
"""

#: ARGV: prefix, idle bound (ms), node id. Removes from the job queue's group every consumer
#: (a node, most likely dead: each start is a new one) other than this node that has no pending
#: entry and has not been seen for the bound or longer; one with pending entries is left to the
#: takeover (``XAUTOCLAIM``), since removing it would drop them. Checked and removed in one step,
#: so no entry is delivered to it in between. Returns the names removed.
FORGET_CONSUMERS = r"""#!lua
local P, bound, node = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local queue = P .. 'queue'
local consumers = redis.pcall('XINFO', 'CONSUMERS', queue, 'nodes')
if consumers.err then return {} end  -- no queue (yet, or lost): nobody to forget
local removed = {}
for _, fields in ipairs(consumers) do
  local consumer = {}
  for k = 1, #fields, 2 do consumer[fields[k]] = fields[k + 1] end
  if consumer.name ~= node and consumer.pending == 0 and consumer.idle >= bound then
    redis.call('XGROUP', 'DELCONSUMER', queue, 'nodes', consumer.name)
    removed[#removed + 1] = consumer.name
  end
end
return removed
"""
