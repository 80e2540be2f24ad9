"""Lua scripts for the ledger's atomic state transitions (run by ``producer.records``' steps).

The job record is a Redis hash (fields listed in docs/PROTOCOL.md). Every transition that ends a
job also appends the terminal StreamEvent and publishes it, in the same atomic step, so the
stream's last event and the record's status can never disagree. Key names come only as KEYS
(``keys.job_keys``: job, stream, channel, attempts, queued, running and done indexes); event
bodies come built by ``producer.events`` and are only stamped here (seq, tokens, ts).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Script:
    name: str
    lua: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.lua.encode()).hexdigest())


# Shared helpers, prepended to each job script. KEYS: see keys.job_keys.
_COMMON = r"""
local JOB, STREAM, CHANNEL, ATTEMPTS = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local QUEUED, RUNNING, DONE = KEYS[5], KEYS[6], KEYS[7]

-- the one count of a stream's positions: one past the last entry's seq
local function next_seq()
  local last = redis.call('XREVRANGE', STREAM, '+', '-', 'COUNT', 1)
  if #last == 0 then return 0 end
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'seq' then return (tonumber(fields[i + 1]) or -1) + 1 end
  end
  return 0
end

-- stamp an event body (producer.events.event_body) as events.stamp does; append and publish
local function emit(body, now, maxlen)
  local seq = next_seq()
  local tokens = tonumber(redis.call('HGET', JOB, 'tokens') or '0') or 0
  local data = body .. ', "seq": ' .. seq .. ', "tokens": ' .. tokens .. ', "ts": ' .. now .. '}'
  redis.call('XADD', STREAM, 'MAXLEN', '~', maxlen, '*', 'seq', seq, 'data', data)
  redis.call('PUBLISH', CHANNEL, data)
end

local function finish(job_id, status, now, retention)
  redis.call('HSET', JOB, 'status', status, 'finished_at', now)
  redis.call('HDEL', JOB, 'lease_until')
  redis.call('ZREM', QUEUED, job_id)
  redis.call('ZREM', RUNNING, job_id)
  redis.call('ZADD', DONE, now, job_id)
  -- entries older than the retention name records that have expired: trim them here
  redis.call('ZREMRANGEBYSCORE', DONE, '-inf', tonumber(now) - tonumber(retention))
  redis.call('EXPIRE', JOB, retention)
  redis.call('EXPIRE', STREAM, retention)
  redis.call('EXPIRE', ATTEMPTS, retention)
end

local function terminal(status)
  return status ~= 'QUEUED' and status ~= 'RUNNING'
end

-- a counter HINCRBY takes and a double holds exactly: 0, or no leading zero and <= 15 digits
local function counter_ok(name)
  local value = redis.call('HGET', JOB, name)
  return not value or value == '0' or (#value <= 15 and string.match(value, '^[1-9]%d*$') ~= nil)
end

-- a timestamp field: absent, or a finite number (not NaN, not infinite)
local function time_ok(name)
  local value = redis.call('HGET', JOB, name)
  if not value then return true end
  local number = tonumber(value)
  return number ~= nil and number == number and number > -math.huge and number < math.huge
end
"""

# KEYS: job, idem ('' for none), queued index. ARGV: id, created_at, idem_ttl, request hash,
# field/value pairs. The idem key holds "{id} {request hash}"; a hit answers {0, that value}.
CREATE = Script("create", r"""
if KEYS[2] ~= '' then
  local existing = redis.call('GET', KEYS[2])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. ARGV[4], 'EX', ARGV[3])
end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return {1, ARGV[1]}
""")

# ARGV: id, now, retention, maxlen, lease_s, worker, max_attempts, then the terminal event
# bodies and error JSON it may need: cancelled, expired, exhausted body, exhausted error,
# invalid body, invalid error.
# Returns {outcome}: missing, terminal, busy, cancelled, expired, invalid, exhausted; or
# {'claimed', fence, attempt, next seq, text already streamed, record field/value pairs...}.
CLAIM = Script("claim", _COMMON + r"""
local job_id, now, retention, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local status = redis.call('HGET', JOB, 'status')
if not status then return {'missing'} end
if terminal(status) then return {'terminal'} end
if status == 'RUNNING' and time_ok('lease_until') then
  local lease = tonumber(redis.call('HGET', JOB, 'lease_until') or '0')
  if lease > tonumber(now) then return {'busy'} end
end
if redis.call('HGET', JOB, 'cancel') == '1' then
  redis.call('HSET', JOB, 'finish_reason', 'cancelled')
  finish(job_id, 'CANCELLED', now, retention)
  emit(ARGV[8], now, maxlen)
  return {'cancelled'}
end
local deadline = tonumber(redis.call('HGET', JOB, 'deadline_at') or '')
if deadline and tonumber(now) >= deadline then
  redis.call('HSET', JOB, 'finish_reason', 'deadline')
  finish(job_id, 'EXPIRED', now, retention)
  emit(ARGV[9], now, maxlen)
  return {'expired'}
end
-- fields this script counts with, written around the producer: fail the job (counters are
-- reset so the record stays usable)
-- a record that ended carries finished_at until RETRY clears it: one set back to QUEUED or
-- RUNNING by hand would run a finished (signed) job again, so it ends here instead
local valid = not redis.call('HGET', JOB, 'finished_at') and time_ok('lease_until')
  and time_ok('deadline_at') and time_ok('created_at')
if not (valid and counter_ok('attempts') and counter_ok('fence') and counter_ok('tokens')) then
  for _, name in ipairs({'attempts', 'fence', 'tokens'}) do
    if not counter_ok(name) then redis.call('HSET', JOB, name, 0) end
  end
  redis.call('HSET', JOB, 'error', ARGV[13])
  finish(job_id, 'FAILED', now, retention)
  emit(ARGV[12], now, maxlen)
  return {'invalid'}
end
local attempts = tonumber(redis.call('HGET', JOB, 'attempts') or '0')
if attempts >= tonumber(ARGV[7]) then
  redis.call('HSET', JOB, 'error', ARGV[11])
  finish(job_id, 'FAILED', now, retention)
  emit(ARGV[10], now, maxlen)
  return {'exhausted'}
end
local fence = redis.call('HINCRBY', JOB, 'fence', 1)
local lease = tonumber(now) + tonumber(ARGV[5])
redis.call('HSET', JOB, 'status', 'RUNNING', 'attempts', attempts + 1, 'worker', ARGV[6],
  'started_at', now, 'lease_until', lease)
redis.call('RPUSH', ATTEMPTS, cjson.encode({attempt = attempts + 1, worker = ARGV[6],
  started_at = tonumber(now)}))
redis.call('ZREM', QUEUED, job_id)
redis.call('ZADD', RUNNING, lease, job_id)
-- the stream so far (a later attempt goes on from there): next seq and the text already sent
local seq, sent = 0, {}
for _, entry in ipairs(redis.call('XRANGE', STREAM, '-', '+')) do
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'seq' then
      seq = (tonumber(fields[i + 1]) or -1) + 1
    elseif fields[i] == 'data' then
      local ok, event = pcall(cjson.decode, fields[i + 1])
      if ok and type(event) == 'table' and type(event.delta) == 'string' then
        sent[#sent + 1] = event.delta
      end
    end
  end
end
local reply = {'claimed', fence, attempts + 1, seq, table.concat(sent)}
for _, item in ipairs(redis.call('HGETALL', JOB)) do reply[#reply + 1] = item end
return reply
""")

# ARGV: id, fence, now, lease_s. Returns -1 if the fence is stale, else the cancel flag.
HEARTBEAT = Script("heartbeat", _COMMON + r"""
local status = redis.call('HGET', JOB, 'status')
if status ~= 'RUNNING' or redis.call('HGET', JOB, 'fence') ~= ARGV[2] then return -1 end
local lease = tonumber(ARGV[3]) + tonumber(ARGV[4])
redis.call('HSET', JOB, 'lease_until', lease)
redis.call('ZADD', RUNNING, lease, ARGV[1])
if redis.call('HGET', JOB, 'cancel') == '1' then return 1 end
return 0
""")

# ARGV: fence, seq, event JSON ('' = none), maxlen, tokens.
# Returns 0 if the fence is stale (the job is no longer ours), 3 if the stream is behind this
# seq (entries were lost: the writer re-appends them, ``worker.engine.repair``), 2 if cancel was
# asked, else 1. Safe to send again after a lost connection: an event whose seq is already
# there is skipped.
APPEND = Script("append", _COMMON + r"""
if redis.call('HGET', JOB, 'fence') ~= ARGV[1] then return 0 end
local behind = false
if ARGV[3] ~= '' then
  local expected = next_seq()
  if expected == tonumber(ARGV[2]) then
    redis.call('XADD', STREAM, 'MAXLEN', '~', ARGV[4], '*', 'seq', ARGV[2], 'data', ARGV[3])
    redis.call('PUBLISH', CHANNEL, ARGV[3])
  elseif expected < tonumber(ARGV[2]) then
    behind = true
  end
end
redis.call('HSET', JOB, 'tokens', ARGV[5])
if behind then return 3 end
if redis.call('HGET', JOB, 'cancel') == '1' then return 2 end
return 1
""")

# ARGV: id, now, retention, maxlen, fence, status, terminal event body, the stream's expected
# next seq ('' = no check), field/value pairs. Returns 1 if committed, 0 if refused (not
# RUNNING, or not our fence), 2 if the stream is behind the expected seq (entries were lost:
# the worker re-appends them and finishes again).
FINISH = Script("finish", _COMMON + r"""
local status = redis.call('HGET', JOB, 'status')
if status ~= 'RUNNING' or redis.call('HGET', JOB, 'fence') ~= ARGV[5] then return 0 end
if ARGV[8] ~= '' and next_seq() < tonumber(ARGV[8]) then return 2 end
local fields = {}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
if #fields > 0 then redis.call('HSET', JOB, unpack(fields)) end
finish(ARGV[1], ARGV[6], ARGV[2], ARGV[3])
emit(ARGV[7], ARGV[2], ARGV[4])
return 1
""")

# ARGV: id, now, fence. RUNNING -> QUEUED (hand the job back), if the fence holds.
RELEASE = Script("release", _COMMON + r"""
if redis.call('HGET', JOB, 'status') ~= 'RUNNING' then return 0 end
if redis.call('HGET', JOB, 'fence') ~= ARGV[3] then return 0 end
redis.call('HSET', JOB, 'status', 'QUEUED', 'sent_at', ARGV[2])
redis.call('HINCRBY', JOB, 'attempts', -1)  -- handed back: not a failed attempt
redis.call('HDEL', JOB, 'lease_until')
redis.call('ZREM', RUNNING, ARGV[1])
redis.call('ZADD', QUEUED, ARGV[2], ARGV[1])
return 1
""")

# ARGV: id, now, retention, maxlen, queued_only ('1' leaves a RUNNING job alone), cancelled
# event body. Returns {'cancelled'} (was queued), {'requested'} (running), {'running'} (left
# alone), {'ended', status} or {'missing'}.
CANCEL = Script("cancel", _COMMON + r"""
local status = redis.call('HGET', JOB, 'status')
if not status then return {'missing'} end
if terminal(status) then return {'ended', status} end
if ARGV[5] == '1' and status == 'RUNNING' then return {'running'} end
redis.call('HSET', JOB, 'cancel', '1')
if status == 'RUNNING' then return {'requested'} end
redis.call('HSET', JOB, 'finish_reason', 'cancelled')
finish(ARGV[1], 'CANCELLED', ARGV[2], ARGV[3])
emit(ARGV[6], ARGV[2], ARGV[4])
return {'cancelled'}
""")

# ARGV: id, now. A FAILED or EXPIRED job goes back to QUEUED with the same id: attempts start
# again from 0, the attempt history is kept and gets a retry entry, the old stream is dropped
# (the new attempt streams from seq 0), error/result/finish fields are cleared, expiry removed,
# and a request with ``ttl_s`` gets a new deadline. Returns {'queued'}, {'refused', status} or
# {'missing'}.
RETRY = Script("retry", _COMMON + r"""
local status = redis.call('HGET', JOB, 'status')
if not status then return {'missing'} end
if status ~= 'FAILED' and status ~= 'EXPIRED' then return {'refused', status} end
local now = ARGV[2]
local retries = (tonumber(redis.call('HGET', JOB, 'retries') or '0') or 0) + 1
redis.call('HSET', JOB, 'retries', retries)
local entry = {retry = retries, at = tonumber(now), previous_status = status,
  previous_attempts = tonumber(redis.call('HGET', JOB, 'attempts') or '0')}
local err = redis.call('HGET', JOB, 'error')
if err then
  local ok, decoded = pcall(cjson.decode, err)
  if ok then entry['error'] = decoded end
end
redis.call('RPUSH', ATTEMPTS, cjson.encode(entry))
redis.call('PERSIST', ATTEMPTS)
redis.call('HDEL', JOB, 'error', 'result', 'result_uri', 'finish_reason', 'finished_at',
  'started_at', 'worker', 'lease_until', 'cancel', 'deadline_at')
redis.call('HSET', JOB, 'status', 'QUEUED', 'attempts', 0, 'tokens', 0, 'sent_at', now,
  'retried_at', now)
local ok, request = pcall(cjson.decode, redis.call('HGET', JOB, 'request') or '')
if ok and type(request) == 'table' and type(request.ttl_s) == 'number' then
  redis.call('HSET', JOB, 'deadline_at', string.format('%.6f', tonumber(now) + request.ttl_s))
end
redis.call('PERSIST', JOB)
redis.call('DEL', STREAM)
redis.call('ZREM', DONE, ARGV[1])
redis.call('ZADD', QUEUED, now, ARGV[1])
return {'queued'}
""")

# ARGV: id, now, retention, maxlen, expired event body. A QUEUED job past its deadline ends
# EXPIRED (the reconciler's sweep: no worker took it in time). Returns 1 if ended, else 0.
EXPIRE_QUEUED = Script("expire_queued", _COMMON + r"""
if redis.call('HGET', JOB, 'status') ~= 'QUEUED' then return 0 end
local deadline = tonumber(redis.call('HGET', JOB, 'deadline_at') or '')
if not deadline or tonumber(ARGV[2]) < deadline then return 0 end
redis.call('HSET', JOB, 'finish_reason', 'deadline')
finish(ARGV[1], 'EXPIRED', ARGV[2], ARGV[3])
emit(ARGV[5], ARGV[2], ARGV[4])
return 1
""")
