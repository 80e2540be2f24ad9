"""Lua scripts for the ledger's atomic state transitions (run with EVALSHA by ``jobs.Ledger``).

The job record is a Redis hash (fields listed in docs/PROTOCOL.md). Every transition that ends a
job also appends the terminal StreamEvent and publishes it, in the same atomic step, so the
stream's last event and the record's status can never disagree.
"""

# Shared helpers, prepended to each script. KEYS[1] job hash, KEYS[2] stream, KEYS[3] channel.
_COMMON = r"""
local function next_seq(skey)
  local last = redis.call('XREVRANGE', skey, '+', '-', 'COUNT', 1)
  if #last == 0 then return 0 end
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'seq' then return tonumber(fields[i + 1]) + 1 end
  end
  return 0
end

local function emit(skey, channel, job_id, etype, now, extra, maxlen)
  local seq = next_seq(skey)
  local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '0') or 0
  local ev = {schema_version = 1, job_id = job_id, seq = seq, type = etype, delta = '',
              tokens = tokens, ts = tonumber(now)}
  for k, v in pairs(extra) do ev[k] = v end
  local data = cjson.encode(ev)
  redis.call('XADD', skey, 'MAXLEN', '~', maxlen, '*', 'seq', seq, 'data', data)
  redis.call('PUBLISH', channel, data)
end

local function finish(status, now, retention)
  redis.call('HSET', KEYS[1], 'status', status, 'finished_at', now)
  redis.call('HDEL', KEYS[1], 'lease_until')
  redis.call('ZREM', 'vlmq:index:queued', redis.call('HGET', KEYS[1], 'id'))
  redis.call('ZREM', 'vlmq:index:running', redis.call('HGET', KEYS[1], 'id'))
  redis.call('ZADD', 'vlmq:index:done', now, redis.call('HGET', KEYS[1], 'id'))
  -- entries older than the retention name records that have expired: trim them here
  redis.call('ZREMRANGEBYSCORE', 'vlmq:index:done', '-inf', tonumber(now) - tonumber(retention))
  redis.call('EXPIRE', KEYS[1], retention)
  redis.call('EXPIRE', KEYS[2], retention)
  redis.call('EXPIRE', KEYS[1] .. ':attempts', retention)
end

local function terminal(status)
  return status ~= 'QUEUED' and status ~= 'RUNNING'
end
"""

# KEYS: job, idem ('' for none). ARGV: id, created_at, idem_ttl, then field/value pairs.
CREATE = r"""
if KEYS[2] ~= '' then
  local existing = redis.call('GET', KEYS[2])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', 'vlmq:index:queued', ARGV[2], ARGV[1])
return {1, ARGV[1]}
"""

# KEYS: job, stream, channel. ARGV: now, lease_s, worker, max_attempts, retention, maxlen.
# Returns {outcome, fence}: claimed, missing, terminal, busy, cancelled, expired, exhausted.
CLAIM = (
    _COMMON
    + r"""
local now = tonumber(ARGV[1])
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
if terminal(status) then return {'terminal', 0} end
local job_id = redis.call('HGET', KEYS[1], 'id')
if status == 'RUNNING' then
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
  if lease > now then return {'busy', 0} end
end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then
  redis.call('HSET', KEYS[1], 'finish_reason', 'cancelled')
  finish('CANCELLED', now, ARGV[5])
  emit(KEYS[2], KEYS[3], job_id, 'cancelled', now, {finish_reason = 'cancelled'}, ARGV[6])
  return {'cancelled', 0}
end
local deadline = tonumber(redis.call('HGET', KEYS[1], 'deadline_at') or '')
if deadline and now >= deadline then
  redis.call('HSET', KEYS[1], 'finish_reason', 'deadline')
  finish('EXPIRED', now, ARGV[5])
  emit(KEYS[2], KEYS[3], job_id, 'cancelled', now, {finish_reason = 'deadline'}, ARGV[6])
  return {'expired', 0}
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if attempts >= tonumber(ARGV[4]) then
  local err = {code = 'WORKER_LOST', retryable = false,
    message = 'the job was started ' .. attempts .. ' times and its worker was lost each time'}
  redis.call('HSET', KEYS[1], 'error', cjson.encode(err))
  finish('FAILED', now, ARGV[5])
  emit(KEYS[2], KEYS[3], job_id, 'error', now, {error = err}, ARGV[6])
  return {'exhausted', 0}
end
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('HSET', KEYS[1], 'status', 'RUNNING', 'attempts', attempts + 1, 'worker', ARGV[3],
  'started_at', now, 'lease_until', now + tonumber(ARGV[2]))
redis.call('RPUSH', KEYS[1] .. ':attempts', cjson.encode({attempt = attempts + 1,
  worker = ARGV[3], started_at = now}))
redis.call('ZREM', 'vlmq:index:queued', job_id)
redis.call('ZADD', 'vlmq:index:running', now + tonumber(ARGV[2]), job_id)
return {'claimed', fence}
"""
)

# KEYS: job. ARGV: fence, now, lease_s. Returns -1 if the fence is stale, else the cancel flag.
HEARTBEAT = r"""
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'RUNNING' or redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return -1 end
local lease = tonumber(ARGV[2]) + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'lease_until', lease)
redis.call('ZADD', 'vlmq:index:running', lease, redis.call('HGET', KEYS[1], 'id'))
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 1 end
return 0
"""

# KEYS: job, stream, channel. ARGV: fence, seq, data ('' = none), maxlen, tokens.
# Returns 0 if the fence is stale (the job is no longer ours), 2 if cancel was asked, else 1.
# Safe to send again after a lost connection: an event whose seq is already there is skipped.
APPEND = _COMMON + r"""
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return 0 end
-- idempotent: a retried append whose event is already in the stream adds nothing
if ARGV[3] ~= '' and next_seq(KEYS[2]) == tonumber(ARGV[2]) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'seq', ARGV[2], 'data', ARGV[3])
  redis.call('PUBLISH', KEYS[3], ARGV[3])
end
redis.call('HSET', KEYS[1], 'tokens', ARGV[5])
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 2 end
return 1
"""

# KEYS: job, stream, channel. ARGV: fence, status, now, retention, maxlen, event-extra JSON,
# event type, then field/value pairs to set. Returns 1 if committed, 0 if refused.
FINISH = (
    _COMMON
    + r"""
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'RUNNING' or redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return 0 end
local fields = {}
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
finish(ARGV[2], tonumber(ARGV[3]), ARGV[4])
local job_id = redis.call('HGET', KEYS[1], 'id')
emit(KEYS[2], KEYS[3], job_id, ARGV[7], ARGV[3], cjson.decode(ARGV[6]), ARGV[5])
return 1
"""
)

# KEYS: job. ARGV: fence, now. RUNNING -> QUEUED (hand the job back), if the fence holds.
RELEASE = r"""
if redis.call('HGET', KEYS[1], 'status') ~= 'RUNNING' then return 0 end
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return 0 end
local job_id = redis.call('HGET', KEYS[1], 'id')
redis.call('HSET', KEYS[1], 'status', 'QUEUED', 'sent_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', -1)  -- handed back: not a failed attempt
redis.call('HDEL', KEYS[1], 'lease_until')
redis.call('ZREM', 'vlmq:index:running', job_id)
redis.call('ZADD', 'vlmq:index:queued', ARGV[2], job_id)
return 1
"""

# KEYS: job, stream, channel. ARGV: now, retention, maxlen, [queued_only: '1' leaves a RUNNING
# job alone and answers 'RUNNING']. Returns 'cancelled' (was queued), 'requested' (running),
# the terminal status, or 'missing'.
CANCEL = (
    _COMMON
    + r"""
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if terminal(status) then return status end
if ARGV[4] == '1' and status == 'RUNNING' then return status end
redis.call('HSET', KEYS[1], 'cancel', '1')
if status == 'RUNNING' then return 'requested' end
local job_id = redis.call('HGET', KEYS[1], 'id')
redis.call('HSET', KEYS[1], 'finish_reason', 'cancelled')
finish('CANCELLED', tonumber(ARGV[1]), ARGV[2])
emit(KEYS[2], KEYS[3], job_id, 'cancelled', ARGV[1], {finish_reason = 'cancelled'}, ARGV[3])
return 'cancelled'
"""
)

# KEYS: job, stream. ARGV: now, new deadline_at ('' = none).
# A FAILED or EXPIRED job goes back to QUEUED with the same id: attempts start again from 0, the
# attempt history (``:attempts``) is kept and gets a retry entry, the old stream is dropped (the
# new attempt streams from seq 0), error/result/finish fields are cleared, expiry is removed.
# Returns 'queued', the status of a job that cannot be retried, or 'missing'.
RETRY = r"""
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'FAILED' and status ~= 'EXPIRED' then return status end
local now = tonumber(ARGV[1])
local job_id = redis.call('HGET', KEYS[1], 'id')
local retries = redis.call('HINCRBY', KEYS[1], 'retries', 1)
local entry = {retry = retries, at = now, previous_status = status,
  previous_attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')}
local err = redis.call('HGET', KEYS[1], 'error')
if err then entry['error'] = cjson.decode(err) end
redis.call('RPUSH', KEYS[1] .. ':attempts', cjson.encode(entry))
redis.call('PERSIST', KEYS[1] .. ':attempts')
redis.call('HDEL', KEYS[1], 'error', 'result', 'result_uri', 'finish_reason', 'finished_at',
  'started_at', 'worker', 'lease_until', 'cancel', 'deadline_at')
redis.call('HSET', KEYS[1], 'status', 'QUEUED', 'attempts', 0, 'tokens', 0, 'sent_at', ARGV[1],
  'retried_at', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'deadline_at', ARGV[2]) end
redis.call('PERSIST', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('ZREM', 'vlmq:index:done', job_id)
redis.call('ZADD', 'vlmq:index:queued', now, job_id)
return 'queued'
"""
