"""The Lua scripts of the Redis store (``actors/store/redis.py`` documents the key layout).

A script runs atomically, but Redis has no rollback: one that fails half-way keeps what it wrote.
So the batch script checks the whole batch first (jobs written to exist, idempotency keys free,
event ids in order, no key under the prefix of a foreign type) and only then writes; the
``#!lua`` line makes Redis refuse a script while it is out of memory before it starts, instead
of at a write half-way (https://redis.io/docs/latest/develop/programmability/lua-api/).

Key names are built from the prefix inside the scripts (one Redis primary, not Cluster: a batch
spans many jobs). Errors a caller tells apart start with ``REFUSED`` (the store works but will
never take this batch) or ``FENCED <job id>`` (another node holds that job's lease: the batch
wrote nothing, and the writes of that job are never to be written by this node).
"""

from __future__ import annotations

#: ARGV: prefix, node id (empty: a store used alone, no fence), lease (ms), then the
#: operations, each as a tag and its fields: ``J id seq owner has_idem idem finished_ms n field
#: value ...`` (put job; ``finished_ms`` empty while it runs), ``I id n index json ...`` (put
#: images), ``E id event_id json`` (append event), ``R id index json`` (remote work), ``C id
#: index json`` (copy of an output), ``D id`` (delete job), ``A id owner has_idem idem
#: max_active images max_queued take`` (admit the new job ``id`` of ``images`` images: checks
#: only, before its ``J``; only ``RedisStore.admit`` sends it, as its answer is the caller's;
#: ``take``: empty, or ``ahead`` when the node has room to run the job itself; the new job's
#: ``J`` with seq 0 is given the next seq, ``INCR P seq``, once every check has passed).
#: Returns the number of operations; with an ``A``, ``{"admitted", "", seq}``, or
#: ``{"taken", entry id, seq}`` when the node of an ``A`` with a ``take`` took the new job's
#: queue entry and lease itself (``seq``: the new job's). It does unless a queue entry
#: waits for a node before the new one (the job then queues behind those, for any node with
#: room), or the node runs more than twice as many jobs as another node taking jobs, plus
#: ``ahead`` (``P takers``; a node runs the jobs whose queue entries are pending in its name:
#: the job goes through the queue, so that a node accepting more jobs than the others shares
#: them out).
#: Or, writing nothing, ``{"held", job id}`` (the idempotency
#: key of an ``A`` is that job's), ``{"limit", active}`` (its owner has ``max_active`` unfinished
#: jobs or more) or ``{"busy", queued}`` (the images of unfinished jobs, cluster-wide, and the
#: new job's would be more than ``max_queued``).
#:
#: ``P active`` (unfinished job id -> its images) and ``P active_images`` (their sum) change
#: together, only when a job is written unfinished for the first time, or written finished, or
#: deleted: whichever node ends a job (a dead node's is ended by the one that carries it on)
#: takes its images off.
BATCH = r"""#!lua
local P, node, ttl = ARGV[1], ARGV[2], ARGV[3]
-- How long a cluster remembers a deleted job (P gone:<id>) and who ended a job (P job:<id>:
-- ended_by): a day, as long as a node cut off from Redis may come back and write.
local GONE_MS = 86400000

local function job_key(id, part) return P .. 'job:' .. id .. ':' .. part end
local function user_key(owner, part) return P .. 'user:' .. owner .. ':' .. part end

-- Parse the operations.
local ops = {}
local admitting, admitted = nil, nil  -- the new job of an A, and its seq once written
-- With an A's take, the node admitting the new job may run it itself, unless it runs far more
-- jobs than another node (``ahead``: see ``far_ahead``); nil without a take.
local ahead = nil
local i = 4
while i <= #ARGV do
  local tag, id = ARGV[i], ARGV[i + 1]
  if tag == 'J' then
    local n = tonumber(ARGV[i + 7])
    local idem = false
    if ARGV[i + 4] == '1' then idem = ARGV[i + 5] end
    local images = 0
    for k = i + 8, i + 7 + 2 * n, 2 do
      if ARGV[k] == 'num_images' then images = tonumber(ARGV[k + 1]) end
    end
    ops[#ops + 1] = {tag = tag, id = id, seq = tonumber(ARGV[i + 2]), owner = ARGV[i + 3],
                     idem = idem, finished = ARGV[i + 6], first = i + 8, count = 2 * n,
                     images = images}
    i = i + 8 + 2 * n
  elseif tag == 'I' then
    local n = tonumber(ARGV[i + 2])
    ops[#ops + 1] = {tag = tag, id = id, first = i + 3, count = 2 * n}
    i = i + 3 + 2 * n
  elseif tag == 'E' then
    ops[#ops + 1] = {tag = tag, id = id, n = tonumber(ARGV[i + 2]), body = ARGV[i + 3]}
    i = i + 4
  elseif tag == 'R' or tag == 'C' then
    ops[#ops + 1] = {tag = tag, id = id, index = ARGV[i + 2], body = ARGV[i + 3]}
    i = i + 4
  elseif tag == 'D' then
    ops[#ops + 1] = {tag = tag, id = id}
    i = i + 2
  elseif tag == 'A' then
    local idem = false
    if ARGV[i + 3] == '1' then idem = ARGV[i + 4] end
    ops[#ops + 1] = {tag = tag, id = id, owner = ARGV[i + 2], idem = idem,
                     max_active = tonumber(ARGV[i + 5]), images = tonumber(ARGV[i + 6]),
                     max_queued = tonumber(ARGV[i + 7])}
    admitting = id
    if ARGV[i + 8] ~= '' and node ~= '' then
      ahead = tonumber(ARGV[i + 8])
      if not ahead then return redis.error_reply('REFUSED take ' .. ARGV[i + 8]) end
    end
    i = i + 9
  else
    return redis.error_reply('REFUSED unknown operation ' .. tostring(tag))
  end
end

-- Check the batch against what is stored, as it would be after each operation in turn.
local types, idents, holders, lasts, added = {}, {}, {}, {}, {}
-- The fence (with a node id): a job that exists is written only by the node holding its lease.
-- A lease that lapsed (Redis was unreachable for longer) is taken again: nobody else holds it,
-- unless the job has ended meanwhile. Then, without taking the lease, only a copy's record
-- (which may come after its job's end) is written, or, by the node that ended it (its end
-- written but the answer lost), anything but a record saying it runs. A job a node deleted
-- (``P gone:<id>``) is not written again: its node was cut off while another ended and
-- deleted it. A job created in this batch is fresh: it has no lease yet, and goes into the
-- job queue.
local fresh, leased = {}, {}
local keep = false  -- this node runs the new job itself (an A's take, when it may)
local function ended_here(id)
  local key = job_key(id, 'ended_by')
  return redis.call('TYPE', key).ok == 'string' and redis.call('GET', key) == node
end
local function fenced(id, op)
  if node == '' or fresh[id] or leased[id] then return nil end
  local lease = P .. 'lease:' .. id
  local held = redis.call('GET', lease)
  if held == false then
    local status = redis.call('HGET', job_key(id, 'record'), 'status')
    if status == 'completed' or status == 'failed' or status == 'canceled' then
      if op.tag == 'C' then return nil end
      if ended_here(id) and not (op.tag == 'J' and op.finished == '') then return nil end
      return id
    end
    redis.call('SET', lease, node, 'PX', ttl)
  elseif held ~= node then
    return id
  end
  leased[id] = true
  return nil
end
local function foreign(key, want)
  local t = types[key]
  if t == nil then
    t = redis.call('TYPE', key).ok
    types[key] = t
  end
  if t ~= 'none' and t ~= want then return key .. ' holds a ' .. t .. ', not a ' .. want end
  return nil
end
local function identity(id)
  local ident = idents[id]
  if ident == nil then
    local row = redis.call('HMGET', job_key(id, 'record'), 'owner', 'idempotency_key')
    ident = {owner = row[1], idem = row[2]}
    idents[id] = ident
  end
  return ident
end
local function holder(owner, idem)
  local k = owner .. '\0' .. idem
  local h = holders[k]
  if h == nil then
    h = redis.call('HGET', user_key(owner, 'idem'), idem)
    holders[k] = h
  end
  return h
end
local function last_event(id)
  local last = lasts[id]
  if last == nil then
    last = 0
    local top = redis.call('XREVRANGE', job_key(id, 'events'), '+', '-', 'COUNT', 1)
    if top[1] then last = tonumber(string.match(top[1][1], '^(%d+)')) end
    lasts[id] = last
    added[id] = {}
  end
  return last
end

-- Whether an entry of the job queue waits for a node: one newer than the group's last delivered
-- (checked before the new job's entry is added). True too when the queue has entries but no
-- group (Redis lost it, and the nodes make it again): the new job then queues. (With no queue at
-- all, the read of ``take_entry`` fails, and the job queues as well.)
local function stream_id(s)
  local ms, n = string.match(s, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(n)
end
local function queue_waits(queue)
  local newest = redis.call('XREVRANGE', queue, '+', '-', 'COUNT', 1)[1]
  if not newest then return false end
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', queue)
  if not ok then return true end
  for _, group in ipairs(groups) do
    local fields = {}
    for k = 1, #group, 2 do fields[group[k]] = group[k + 1] end
    if fields['name'] == 'nodes' then
      local ms, n = stream_id(newest[1])
      local last_ms, last_n = stream_id(fields['last-delivered-id'])
      return ms > last_ms or (ms == last_ms and n > last_n)
    end
  end
  return true
end
-- Whether this node runs more than twice as many jobs as another node taking jobs, plus
-- ``ahead`` (a margin that grows with the load: a burst of jobs accepted on every node, which
-- each node works through at its own pace, stays where it was accepted).
local function far_ahead()
  local ok, pending = pcall(redis.call, 'XPENDING', P .. 'queue', 'nodes')
  if not ok then return false end
  local runs = {}
  for _, consumer in ipairs(pending[4] or {}) do runs[consumer[1]] = tonumber(consumer[2]) end
  local mine = runs[node] or 0
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for _, other in ipairs(redis.call('ZRANGEBYSCORE', P .. 'takers', now, '+inf')) do
    if other ~= node and mine > 2 * (runs[other] or 0) + ahead then return true end
  end
  return false
end
local problem = foreign(P .. 'jobs', 'zset') or foreign(P .. 'seq', 'string')
  or foreign(P .. 'active', 'hash') or foreign(P .. 'active_images', 'string')
  or foreign(P .. 'entries', 'hash')
for _, op in ipairs(ops) do
  if problem then break end
  local id = op.id
  problem = foreign(job_key(id, 'record'), 'hash')
  if problem then break end
  local ident = identity(id)
  if node ~= '' and not ident.owner and fresh[id] == nil and op.tag ~= 'A' and op.tag ~= 'D'
      and redis.call('EXISTS', P .. 'gone:' .. id) == 1 then
    return redis.error_reply('FENCED ' .. id)
  end
  if op.tag == 'J' and not ident.owner and fresh[id] == nil then fresh[id] = true end
  if op.tag ~= 'D' and ident.owner then
    local lost = fenced(id, op)
    if lost then return redis.error_reply('FENCED ' .. lost) end
  end
  if op.tag == 'J' then
    problem = foreign(user_key(op.owner, 'jobs'), 'zset')
      or (ident.owner and foreign(user_key(ident.owner, 'jobs'), 'zset'))
      or (op.idem and foreign(user_key(op.owner, 'idem'), 'hash'))
      or (ident.idem and foreign(user_key(ident.owner, 'idem'), 'hash'))
    if problem then break end
    if op.idem then
      local h = holder(op.owner, op.idem)
      if h and h ~= id then
        problem = 'the idempotency key ' .. op.idem .. ' of ' .. op.owner .. ' is job ' .. h .. "'s"
        break
      end
    end
    op.old_owner = ident.owner
    if ident.idem and (ident.owner ~= op.owner or ident.idem ~= op.idem)
        and holder(ident.owner, ident.idem) == id then
      op.release = {ident.owner, ident.idem}
      holders[ident.owner .. '\0' .. ident.idem] = false
    end
    if op.idem then holders[op.owner .. '\0' .. op.idem] = id end
    idents[id] = {owner = op.owner, idem = op.idem}
  elseif op.tag == 'D' then
    if ident.owner then
      problem = foreign(user_key(ident.owner, 'jobs'), 'zset')
        or (ident.idem and foreign(user_key(ident.owner, 'idem'), 'hash'))
      if problem then break end
      op.owner = ident.owner
      if ident.idem and holder(ident.owner, ident.idem) == id then
        op.release = {ident.owner, ident.idem}
        holders[ident.owner .. '\0' .. ident.idem] = false
      end
    end
    problem = foreign(P .. 'bytes', 'hash') or foreign(P .. 'bytes_total', 'string')
    if problem then break end
    idents[id] = {owner = false, idem = false}
    fresh[id] = false
    for _, part in ipairs({'record', 'images', 'remote', 'copies', 'events'}) do
      types[job_key(id, part)] = 'none'
    end
    lasts[id] = 0
    added[id] = {}
  elseif op.tag == 'A' then
    -- Admission: the key's holder answers a repeated request, then the owner's limit applies.
    problem = foreign(user_key(op.owner, 'active'), 'set')
      or (op.idem and foreign(user_key(op.owner, 'idem'), 'hash'))
    if problem then break end
    local h = op.idem and holder(op.owner, op.idem)
    if h and h ~= id then return {'held', h} end
    local active = redis.call('SCARD', user_key(op.owner, 'active'))
    if active >= op.max_active then return {'limit', tostring(active)} end
    local queued = tonumber(redis.call('GET', P .. 'active_images') or '0')
    if queued + op.images > op.max_queued then return {'busy', tostring(queued)} end
    if ahead then  -- decided now, before anything is written
      problem = foreign(P .. 'queue', 'stream') or foreign(P .. 'takers', 'zset')
      if problem then break end
      keep = not far_ahead() and not queue_waits(P .. 'queue')
    end
  elseif not ident.owner then
    problem = 'no job ' .. id .. ' to write to'
  elseif op.tag == 'I' then
    problem = foreign(job_key(id, 'images'), 'hash')
  elseif op.tag == 'R' then
    problem = foreign(job_key(id, 'remote'), 'hash')
  elseif op.tag == 'C' then
    problem = foreign(job_key(id, 'copies'), 'hash')
  else
    problem = foreign(job_key(id, 'events'), 'stream')
    if problem then break end
    local last = last_event(id)
    if op.n > last then
      op.write = true
      lasts[id] = op.n
      added[id][op.n] = true
    elseif not added[id][op.n] then
      -- Written before (the same event again: an event never changes), or out of order.
      local key = job_key(id, 'events')
      local stored = types[key] ~= 'none'
        and #redis.call('XRANGE', key, op.n .. '-0', op.n .. '-0') > 0
      if not stored then
        problem = 'event ' .. op.n .. ' of job ' .. id .. ' comes after event ' .. last
      end
    end
  end
end
if problem then return redis.error_reply('REFUSED ' .. problem) end

-- The new job's seq (an A's J of seq 0), taken before anything else is written: an INCR that
-- fails (P seq not a number) leaves the batch unwritten.
for _, op in ipairs(ops) do
  if op.tag == 'J' and op.id == admitting and op.seq == 0 then
    op.seq, op.numbered = redis.call('INCR', P .. 'seq'), true
  end
end

-- Write, in order.
local function hset_range(key, first, count)
  local chunk = 200
  for start = first, first + count - 1, chunk do
    redis.call('HSET', key, unpack(ARGV, start, math.min(start + chunk, first + count) - 1))
  end
end
local function activate(id, images)
  if redis.call('HSETNX', P .. 'active', id, images) == 1 then
    redis.call('INCRBY', P .. 'active_images', images)
  end
end
-- Take a job's count off a hash of counts by job and off their sum.
local function take_off(hash, total, id)
  local n = redis.call('HGET', hash, id)
  if n then
    redis.call('HDEL', hash, id)
    if redis.call('DECRBY', total, n) <= 0 then redis.call('DEL', total) end
  end
end
local function deactivate(id) take_off(P .. 'active', P .. 'active_images', id) end
-- The admitting node reads the new entry (the oldest undelivered one: none waited before it)
-- as a node taking it from the queue would, and takes the job's lease: the entry is pending in
-- its name, so a dead node's job is claimed as any other.
local function take_entry(queue, entry, id)
  local ok, read = pcall(redis.call, 'XREADGROUP', 'GROUP', 'nodes', node, 'COUNT', 1,
                         'STREAMS', queue, '>')
  if not ok or not read or read[1][2][1][1] ~= entry then return nil end
  redis.call('SET', P .. 'lease:' .. id, node, 'PX', ttl)
  return entry
end
local top = 0
local taken = nil
for _, op in ipairs(ops) do
  local id = op.id
  if op.tag == 'J' then
    local record = job_key(id, 'record')
    redis.call('DEL', record)
    hset_range(record, op.first, op.count)
    if op.numbered then redis.call('HSET', record, 'seq', op.seq) end
    if id == admitting then admitted = op.seq end
    redis.call('ZADD', P .. 'jobs', op.seq, id)
    if op.old_owner and op.old_owner ~= op.owner then
      redis.call('ZREM', user_key(op.old_owner, 'jobs'), id)
    end
    redis.call('ZADD', user_key(op.owner, 'jobs'), op.seq, id)
    if op.release then redis.call('HDEL', user_key(op.release[1], 'idem'), op.release[2]) end
    if op.idem then redis.call('HSET', user_key(op.owner, 'idem'), op.idem, id) end
    if op.seq > top then top = op.seq end
    if op.old_owner and op.old_owner ~= op.owner then
      redis.call('SREM', user_key(op.old_owner, 'active'), id)
    end
    if op.finished == '' then
      redis.call('SADD', user_key(op.owner, 'active'), id)
      activate(id, op.images)
    else
      redis.call('SREM', user_key(op.owner, 'active'), id)
      deactivate(id)
      redis.call('ZADD', P .. 'finished', op.finished, id)
      redis.call('DEL', job_key(id, 'cancel'))
      if node ~= '' then redis.call('SET', job_key(id, 'ended_by'), node, 'PX', GONE_MS) end
    end
    if node ~= '' and fresh[id] then
      fresh[id] = false
      local queue = P .. 'queue'
      local entry = redis.call('XADD', queue, '*', 'job', id)
      redis.call('HSET', P .. 'entries', id, entry)
      if keep and id == admitting then taken = take_entry(queue, entry, id) end
    end
  elseif op.tag == 'I' then
    hset_range(job_key(id, 'images'), op.first, op.count)
  elseif op.tag == 'E' then
    if op.write then redis.call('XADD', job_key(id, 'events'), op.n .. '-0', 'e', op.body) end
  elseif op.tag == 'R' then
    redis.call('HSET', job_key(id, 'remote'), op.index, op.body)
  elseif op.tag == 'C' then
    redis.call('HSET', job_key(id, 'copies'), op.index, op.body)
  elseif op.tag == 'D' then
    local claimed = job_key(id, 'claimed')
    if redis.call('TYPE', claimed).ok == 'set' then
      for _, remote_id in ipairs(redis.call('SMEMBERS', claimed)) do
        redis.call('DEL', P .. 'claim:' .. remote_id)
      end
    end
    redis.call('DEL', job_key(id, 'record'), job_key(id, 'images'), job_key(id, 'remote'),
               job_key(id, 'copies'), job_key(id, 'events'), job_key(id, 'cancel'),
               job_key(id, 'ended_by'), claimed, P .. 'lease:' .. id)
    if node ~= '' then redis.call('SET', P .. 'gone:' .. id, '1', 'PX', GONE_MS) end
    redis.call('ZREM', P .. 'jobs', id)
    redis.call('ZREM', P .. 'finished', id)
    redis.call('HDEL', P .. 'entries', id)
    deactivate(id)
    take_off(P .. 'bytes', P .. 'bytes_total', id)
    if op.owner then
      redis.call('ZREM', user_key(op.owner, 'jobs'), id)
      redis.call('SREM', user_key(op.owner, 'active'), id)
    end
    if op.release then redis.call('HDEL', user_key(op.release[1], 'idem'), op.release[2]) end
  end
end
if top > tonumber(redis.call('GET', P .. 'seq') or '0') then
  redis.call('SET', P .. 'seq', top)
end
if taken then return {'taken', taken, admitted} end
if admitted then return {'admitted', '', admitted} end
return #ops
"""


#: ARGV: prefix, remote id, job id, image index. Takes the remote work (a prediction) for the
#: image unless another image has it: 1 if it is the image's (now, or already), else 0 (also
#: when the job is not stored: a deleted job's worker takes nothing). Every process sharing the
#: prefix asks here before it takes a prediction found by reconciling, or one its own create
#: answered with (another process may have found it in the list first). Deleting the job
#: deletes its claims (``P job:<id>:claimed`` lists them).
CLAIM = r"""#!lua
local P, remote_id, job, index = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local key, mine = P .. 'claim:' .. remote_id, job .. '\t' .. index
if redis.call('EXISTS', P .. 'job:' .. job .. ':record') == 0 then return 0 end
local held = redis.call('GET', key)
if held == false then
  redis.call('SET', key, mine)
  redis.call('SADD', P .. 'job:' .. job .. ':claimed', remote_id)
  return 1
end
if held == mine then return 1 end
return 0
"""
