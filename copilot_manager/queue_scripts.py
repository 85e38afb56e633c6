"""The queue's transitions as Redis Lua scripts: each runs atomically in Redis, so any
number of stateless managers may share one Redis and never hand a job out twice.

Keys under a prefix P (docs/COPILOT.md, "Redis keys"): P.."queue" (list of queued ids,
head first), P.."job:"..ID (hash), P.."job:"..ID..":up" (uploads per lease),
P.."leases" (sorted set: id -> deadline in ms), P.."agents" (sorted set: name -> last
seen in ms), P.."counts" (hash: state -> number of jobs), P.."seq" (the last job id).
Time is Redis's own (TIME), so managers' clocks do not matter. The scripts name keys
they compute, which a single Redis (not Redis Cluster) allows.
"""

# Shared by every script: ARGV[1] is the prefix.
PRELUDE = r"""
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function move(id, from, to)
  redis.call('HINCRBY', P..'counts', from, -1)
  redis.call('HINCRBY', P..'counts', to, 1)
  redis.call('HSET', P..'job:'..id, 'state', to)
end
-- A lease that ran out: back to the head of the queue, or failed after max_attempts.
local function expire(id, now)
  local key = P..'job:'..id
  redis.call('ZREM', P..'leases', id)
  redis.call('HDEL', key, 'lease')
  local attempts = tonumber(redis.call('HGET', key, 'attempts'))
  if attempts >= tonumber(redis.call('HGET', key, 'max_attempts')) then
    move(id, 'running', 'failed')
    redis.call('HSET', key, 'finished', now, 'message',
      'its lease expired on each of its '..attempts..' attempts (the agents vanished)')
  else
    move(id, 'running', 'queued')
    redis.call('LPUSH', P..'queue', id)
  end
end
local function reap(now, limit)
  local ids = redis.call('ZRANGEBYSCORE', P..'leases', '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do expire(id, now) end
end
-- Whether lease is the job's current, unexpired lease (one found expired is reaped).
local function current(id, lease, now)
  local f = redis.call('HMGET', P..'job:'..id, 'state', 'lease')
  if f[1] ~= 'running' or f[2] ~= lease then return false end
  local deadline = redis.call('ZSCORE', P..'leases', id)
  if deadline and tonumber(deadline) <= now then
    expire(id, now)
    return false
  end
  return true
end
"""

# ARGV: P, idempotency key ('' for none), the submission's digest, seconds the key is
# remembered, then per job: spec JSON, max_attempts, lease_s, cpus, memory_mb, disk_mb.
# Returns {'new'|'again', id...}, or {'conflict'} for a key used by another submission.
SUBMIT = r"""
local now = now_ms()
local remembered = P..'submission:'..ARGV[2]
if ARGV[2] ~= '' then
  local seen = redis.call('HMGET', remembered, 'digest', 'ids')
  if seen[1] then
    if seen[1] ~= ARGV[3] then return {'conflict'} end
    local answer = {'again'}
    for _, id in ipairs(cjson.decode(seen[2])) do answer[#answer + 1] = id end
    return answer
  end
end
local ids = {}
for i = 5, #ARGV, 6 do
  local id = tostring(redis.call('INCR', P..'seq'))
  redis.call('HSET', P..'job:'..id, 'spec', ARGV[i], 'state', 'queued', 'attempts', 0,
    'max_attempts', ARGV[i+1], 'lease_s', ARGV[i+2], 'cpus', ARGV[i+3],
    'memory_mb', ARGV[i+4], 'disk_mb', ARGV[i+5], 'submitted', now)
  redis.call('RPUSH', P..'queue', id)
  redis.call('HINCRBY', P..'counts', 'queued', 1)
  ids[#ids + 1] = id
end
if ARGV[2] ~= '' then
  redis.call('HSET', remembered, 'digest', ARGV[3], 'ids', cjson.encode(ids))
  redis.call('EXPIRE', remembered, tonumber(ARGV[4]))
end
local answer = {'new'}
for _, id in ipairs(ids) do answer[#answer + 1] = id end
return answer
"""

# ARGV: P, agent, new lease id, cpus, memory_mb, disk_mb, how many queued jobs to scan.
# Returns {id, spec, lease_s, attempts} or false.
LEASE = r"""
local now = now_ms()
reap(now, 100)
local agent, lease = ARGV[2], ARGV[3]
local cpus, mem, disk = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZADD', P..'agents', now, agent)
local ids = redis.call('LRANGE', P..'queue', 0, tonumber(ARGV[7]) - 1)
for i, id in ipairs(ids) do
  local key = P..'job:'..id
  local f = redis.call('HMGET', key, 'state', 'cpus', 'memory_mb', 'disk_mb', 'spec',
    'lease_s', 'attempts')
  if f[1] ~= 'queued' then
    redis.call('LREM', P..'queue', 1, id)
  elseif tonumber(f[2]) <= cpus and tonumber(f[3]) <= mem and tonumber(f[4]) <= disk then
    if i == 1 then redis.call('LPOP', P..'queue') else redis.call('LREM', P..'queue', 1, id) end
    local attempts = tonumber(f[7]) + 1
    redis.call('HSET', key, 'lease', lease, 'agent', agent, 'attempts', attempts,
      'started', now, 'progress', 0)
    redis.call('ZADD', P..'leases', now + tonumber(f[6]) * 1000, id)
    move(id, 'queued', 'running')
    return {id, f[5], f[6], attempts}
  end
end
return false
"""

# ARGV: P, id, lease, progress. Returns lease_s, or false when the lease is not current.
HEARTBEAT = r"""
local now = now_ms()
local id, lease = ARGV[2], ARGV[3]
if not current(id, lease, now) then return false end
local key = P..'job:'..id
local f = redis.call('HMGET', key, 'lease_s', 'agent')
redis.call('ZADD', P..'leases', now + tonumber(f[1]) * 1000, id)
if ARGV[4] ~= '' then redis.call('HSET', key, 'progress', ARGV[4]) end
redis.call('ZADD', P..'agents', now, f[2])
return f[1]
"""

# ARGV: P, id, lease. Returns the job's spec while the lease is current, else false.
CHECK = r"""
local now = now_ms()
if not current(ARGV[2], ARGV[3], now) then return false end
return redis.call('HGET', P..'job:'..ARGV[2], 'spec')
"""

# ARGV: P, id, lease, name, sha256, size. Records a stored upload under the lease.
RECORD_UPLOAD = r"""
local now = now_ms()
local id, lease = ARGV[2], ARGV[3]
if not current(id, lease, now) then return false end
redis.call('HSET', P..'job:'..id..':up', lease..'/'..ARGV[4], ARGV[5]..' '..ARGV[6])
return true
"""

# ARGV: P, id, lease, exit_code, outputs claimed (JSON object name -> sha256), message.
# Returns {'new'|'again', state, stale upload field...} or false (lease not current).
DONE = r"""
local now = now_ms()
local id, lease = ARGV[2], ARGV[3]
local key = P..'job:'..id
if not current(id, lease, now) then
  local f = redis.call('HMGET', key, 'state', 'done_lease')
  if f[2] == lease then return {'again', f[1]} end
  return false
end
local spec = cjson.decode(redis.call('HGET', key, 'spec'))
local claimed = cjson.decode(ARGV[5])
local ups = redis.call('HGETALL', key..':up')
local mine, stale = {}, {}
for i = 1, #ups, 2 do
  local l, n = string.match(ups[i], '^([^/]*)/(.*)$')
  if l == lease then mine[n] = ups[i + 1] else stale[#stale + 1] = ups[i] end
end
local outputs, problems = {}, {}
for _, name in ipairs(spec['outputs']) do
  local v = mine[name]
  if not v then
    problems[#problems + 1] = name..' was not uploaded'
  else
    local sha, size = string.match(v, '^(%S+) (%d+)$')
    if claimed[name] ~= sha then
      problems[#problems + 1] = name..': the reported hash is not the uploaded one'
    else
      outputs[name] = {sha256 = sha, size = tonumber(size)}
    end
  end
end
local state = 'done'
if tonumber(ARGV[4]) ~= 0 or #problems > 0 then state = 'failed' end
local message = ARGV[6]
if #problems > 0 then
  if message ~= '' then message = message..'; ' end
  message = message..table.concat(problems, '; ')
end
redis.call('ZREM', P..'leases', id)
redis.call('HDEL', key, 'lease')
redis.call('DEL', key..':up')
redis.call('HSET', key, 'exit_code', ARGV[4], 'outputs', cjson.encode(outputs),
  'message', message, 'finished', now, 'done_lease', lease)
move(id, 'running', state)
local answer = {'new', state}
for _, f in ipairs(stale) do answer[#answer + 1] = f end
return answer
"""

# ARGV: P, id. Returns the state before ('missing' if no such job); 'done' is refused.
REQUEUE = r"""
local id = ARGV[2]
local key = P..'job:'..id
local state = redis.call('HGET', key, 'state')
if not state then return 'missing' end
if state == 'done' or state == 'queued' then return state end
redis.call('ZREM', P..'leases', id)
redis.call('HDEL', key, 'lease', 'exit_code', 'outputs', 'message', 'finished',
  'done_lease', 'progress')
redis.call('HSET', key, 'attempts', 0)
redis.call('RPUSH', P..'queue', id)
move(id, state, 'queued')
return state
"""

# ARGV: P, id. Returns the state before ('missing' if no such job).
CANCEL = r"""
local id = ARGV[2]
local key = P..'job:'..id
local state = redis.call('HGET', key, 'state')
if not state then return 'missing' end
if state ~= 'queued' and state ~= 'running' then return state end
redis.call('LREM', P..'queue', 0, id)
redis.call('ZREM', P..'leases', id)
redis.call('HDEL', key, 'lease')
redis.call('HSET', key, 'finished', now_ms())
move(id, state, 'cancelled')
return state
"""

# ARGV: P, window ms, agents to list, ms after which an agent not seen is forgotten.
# Reaps, forgets old agents (the set would grow with every volunteer ever seen), then
# returns the status as JSON.
STATUS = r"""
local now = now_ms()
reap(now, 1000)
redis.call('ZREMRANGEBYSCORE', P..'agents', '-inf', now - tonumber(ARGV[4]))
local counts = redis.call('HGETALL', P..'counts')
local agents = redis.call('ZREVRANGE', P..'agents', 0, tonumber(ARGV[3]) - 1, 'WITHSCORES')
local soon = redis.call('ZRANGEBYSCORE', P..'leases', '-inf', now + tonumber(ARGV[2]),
  'WITHSCORES', 'LIMIT', 0, 100)
local expiring = {}
for i = 1, #soon, 2 do
  local agent = redis.call('HGET', P..'job:'..soon[i], 'agent')
  expiring[#expiring + 1] = {soon[i], agent, tonumber(soon[i + 1]) - now}
end
return cjson.encode({now = now, counts = counts, agents = agents, expiring = expiring})
"""

# ARGV: P, id. The job's hash (reaping its lease if due) and its lease deadline.
SHOW = r"""
local now = now_ms()
local id = ARGV[2]
local deadline = redis.call('ZSCORE', P..'leases', id)
if deadline and tonumber(deadline) <= now then expire(id, now); deadline = false end
local left = false
if deadline then left = tostring(tonumber(deadline) - now) end
return {redis.call('HGETALL', P..'job:'..id), left}
"""

# ARGV: P, id, finished before (ms). Forgets a finished job (its hash and uploads) if it
# is still finished and finished before then; returns its state, or false.
FORGET = r"""
local id, before = ARGV[2], tonumber(ARGV[3])
local key = P..'job:'..id
local f = redis.call('HMGET', key, 'state', 'finished')
if f[1] ~= 'done' and f[1] ~= 'failed' and f[1] ~= 'cancelled' then return false end
if not f[2] or tonumber(f[2]) >= before then return false end
redis.call('DEL', key, key..':up')
redis.call('HINCRBY', P..'counts', f[1], -1)
return f[1]
"""
