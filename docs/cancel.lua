-- vlmq cancel (generated from producer/scripts.py CANCEL; `vlmq schema --cancel-lua`)
-- KEYS: vlmq:job:{id}, vlmq:stream:{id}, vlmq:tokens:{id}, vlmq:job:{id}:attempts,
--       vlmq:index:queued, vlmq:index:running, vlmq:index:done
-- ARGV: id, now (Unix seconds), retention seconds (86400), stream maxlen (10000),
--       queued_only ('1' leaves a RUNNING job alone, else '0'), and the cancelled
--       event body without its closing brace: {"schema_version": 1, "job_id": "{id}",
--       "type": "cancelled", "delta": "", "finish_reason": "cancelled"
-- Returns {'cancelled'} (was QUEUED), {'requested'} (RUNNING: stops within two decode
-- steps), {'running'} (left alone), {'ended', status} or {'missing'}.
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
