"""Per-tenant quotas, atomic in Redis so that every gateway replica shares them:

- requests per minute: GCRA (a leaky bucket holding one minute of requests: a burst of N, then
  one every 60/N s); ``Retry-After`` is when the next request fits;
- concurrent jobs: a SET of the tenant's unfinished jobs (``j:<id>``). A gateway never removes
  a job when its connection ends (the job may run on): before counting, the members whose job
  is finished or gone (``AsyncProducer.status``) are dropped. A slot is first held by a
  reservation (``r:<expiry ms>:<token>``, a minute) and becomes ``j:<id>`` once the job exists,
  so nothing leaks if a gateway dies in between.

One script counts, checks both limits and takes both, or neither; the clock is Redis's
(``TIME``), the same for every replica. Gateway keys only (``gateway.names``).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway import names
from gateway.errors import ApiError
from producer import JobNotFound
from producer.aio import AsyncProducer

ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2])
if conc > 0 then
  local active = 0
  for _, m in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    local expiry = tonumber(string.match(m, '^r:(%d+):'))
    if expiry ~= nil and expiry <= now then redis.call('SREM', KEYS[2], m)
    else active = active + 1 end
  end
  if active >= conc then return {0, 'concurrent_jobs', 1000} end
end
if rpm > 0 then
  local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or 0), now) + 60000 / rpm
  if tat - now > 60000 then return {0, 'requests_per_minute', math.ceil(tat - now - 60000)} end
  redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil(tat - now) + 1000)
end
local member = ''
if conc > 0 then
  member = 'r:' .. tostring(now + tonumber(ARGV[4])) .. ':' .. ARGV[3]
  redis.call('SADD', KEYS[2], member)
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[5]))
end
return {1, member, 0}
"""

RESERVATION_MS = 60_000


@dataclass(frozen=True)
class Slot:
    tenant: str
    member: str  # the reservation, until ``bind`` names the job; "" when no job limit applies


class Quotas:
    def __init__(self, client: aioredis.Redis, producer: AsyncProducer,
                 job_lifetime_s: int) -> None:
        self.redis = client
        self.producer = producer
        self.job_lifetime_s = job_lifetime_s
        self._acquire = client.register_script(ACQUIRE)

    async def acquire(self, tenant: str, requests_per_minute: int,
                      concurrent_jobs: int) -> Slot:
        """Take one request (and one job slot), or raise a 429 with Retry-After."""
        if requests_per_minute <= 0 and concurrent_jobs <= 0:
            return Slot(tenant, "")
        if concurrent_jobs > 0:
            await self._drop_finished(tenant)
        ok, member, retry_ms = await self._acquire(
            keys=[names.rate_key(tenant), names.active_key(tenant)],
            args=[requests_per_minute, concurrent_jobs, uuid.uuid4().hex, RESERVATION_MS,
                  self.job_lifetime_s * 1000])
        member = member.decode() if isinstance(member, bytes) else str(member)
        if not int(ok):
            limit = requests_per_minute if member == "requests_per_minute" else concurrent_jobs
            raise ApiError(429, f"quota exceeded for {tenant!r}: {member} (limit {limit})",
                           code=f"quota_{member}", retry_after=int(retry_ms) / 1000)
        return Slot(tenant, member)

    async def _drop_finished(self, tenant: str) -> None:
        jobs = [m.decode()[2:] for m in await self.redis.smembers(names.active_key(tenant))
                if m.startswith(b"j:")]
        done = await asyncio.gather(*(self._finished(job_id) for job_id in jobs))
        gone = [f"j:{job_id}" for job_id, over in zip(jobs, done, strict=True) if over]
        if gone:
            await self.redis.srem(names.active_key(tenant), *gone)

    async def _finished(self, job_id: str) -> bool:
        try:
            return (await self.producer.status(job_id)).status.terminal
        except JobNotFound:
            return True

    async def bind(self, slot: Slot, job_id: str) -> None:
        """The reserved slot now holds this job (until the job is finished)."""
        if not slot.member:
            return
        pipe = self.redis.pipeline(transaction=True)
        pipe.srem(names.active_key(slot.tenant), slot.member)
        pipe.sadd(names.active_key(slot.tenant), f"j:{job_id}")
        pipe.expire(names.active_key(slot.tenant), self.job_lifetime_s)
        await pipe.execute()

    async def release(self, slot: Slot) -> None:
        """Give back a reservation that never became a job."""
        if slot.member:
            await self.redis.srem(names.active_key(slot.tenant), slot.member)
