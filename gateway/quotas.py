"""Per-tenant quotas, atomic in Redis so that every gateway replica shares them:

- requests per minute: GCRA (a leaky bucket holding one minute of requests: a burst of N, then
  one every 60/N s); ``Retry-After`` is when the next request fits;
- concurrent jobs: a ZSET of the tenant's unfinished jobs. It is never decremented by a
  gateway (a job may end after its connection is gone): the script itself drops members whose
  job record (``producer.keys.job_key``) is terminal or gone, each time it counts. A slot is
  first held by a reservation (``r:<token>``, a minute) and becomes ``j:<job id>`` once the job
  exists; every member also has an expiry score, so nothing leaks if a gateway dies between.

One script checks both and takes both, or neither. The clock is Redis's (``TIME``), the same for
every replica. (The script reads job records it is not given as KEYS: fine on one Redis or a
replicated primary, not on Redis Cluster.)
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway import names
from gateway.errors import ApiError
from producer import keys

ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2])
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  local active = 0
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    if string.sub(m, 1, 2) == 'j:' then
      local st = redis.call('HGET', ARGV[4] .. string.sub(m, 3), 'status')
      if st == 'QUEUED' or st == 'RUNNING' then active = active + 1
      else redis.call('ZREM', KEYS[2], m) end
    else active = active + 1 end
  end
  if active >= conc then return {0, 'concurrent_jobs', 1000} end
end
local tat = 0
if rpm > 0 then
  local interval = 60000 / rpm
  tat = math.max(tonumber(redis.call('GET', KEYS[1]) or 0), now) + interval
  if tat - now > 60000 then return {0, 'requests_per_minute', math.ceil(tat - now - 60000)} end
  redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil(tat - now) + 1000)
end
if conc > 0 then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[3])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[6]))
end
return {1, '', 0}
"""

RESERVATION_MS = 60_000


@dataclass(frozen=True)
class Slot:
    tenant: str
    member: str  # the reservation, until ``bind`` names the job
    counted: bool  # a concurrent-jobs limit applies


class Quotas:
    def __init__(self, client: aioredis.Redis, job_lifetime_s: int) -> None:
        self.redis = client
        self.job_lifetime_ms = job_lifetime_s * 1000
        self._acquire = client.register_script(ACQUIRE)

    async def acquire(self, tenant: str, requests_per_minute: int,
                      concurrent_jobs: int) -> Slot:
        """Take one request (and one job slot), or raise a 429 with Retry-After."""
        member = f"r:{uuid.uuid4().hex}"
        if requests_per_minute <= 0 and concurrent_jobs <= 0:
            return Slot(tenant, member, False)
        ok, reason, retry_ms = await self._acquire(
            keys=[names.rate_key(tenant), names.active_key(tenant)],
            args=[requests_per_minute, concurrent_jobs, member, keys.job_key(""),
                  RESERVATION_MS, self.job_lifetime_ms])
        if not int(ok):
            reason = reason.decode() if isinstance(reason, bytes) else str(reason)
            limit = requests_per_minute if reason == "requests_per_minute" else concurrent_jobs
            raise ApiError(429, f"quota exceeded for {tenant!r}: {reason} (limit {limit})",
                           code=f"quota_{reason}", retry_after=int(retry_ms) / 1000)
        return Slot(tenant, member, concurrent_jobs > 0)

    async def bind(self, slot: Slot, job_id: str) -> None:
        """The reserved slot now holds this job (until the job is terminal)."""
        if not slot.counted:
            return
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(names.active_key(slot.tenant), slot.member)
        pipe.zadd(names.active_key(slot.tenant),
                  {f"j:{job_id}": time.time() * 1000 + self.job_lifetime_ms}, gt=True)
        await pipe.execute()

    async def release(self, slot: Slot) -> None:
        """Give back a reservation that never became a job."""
        if not slot.counted:
            return
        await self.redis.zrem(names.active_key(slot.tenant), slot.member)
