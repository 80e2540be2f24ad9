"""The gateway's parts, built once per process, and what every route shares: who is asking
(keys), may they (quotas, admission), and submitting a job on their behalf."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError
from starlette.requests import Request

from gateway import names
from gateway.admission import Admission
from gateway.auth import ANONYMOUS, Authenticator, Tenant
from gateway.errors import ApiError, invalid
from gateway.fleet import Fleet
from gateway.metrics import Metrics
from gateway.quotas import Quotas
from gateway.settings import GatewaySettings
from producer import InvalidRequestError, JobRequest, NoWorkerForModel, SubmitUncertain
from producer.aio import AsyncProducer


@dataclass
class Gateway:
    settings: GatewaySettings
    producer: AsyncProducer
    redis: aioredis.Redis  # the gateway's own keys (vlmq:gw:*), on the ledger Redis
    auth: Authenticator
    quotas: Quotas
    fleet: Fleet
    admission: Admission
    metrics: Metrics

    @classmethod
    def build(cls, settings: GatewaySettings) -> Gateway:
        producer = AsyncProducer(settings.redis_url, broker_url=settings.broker_url,
                                 s3=settings.s3, security_key=settings.security_key,
                                 security_certificate=settings.security_certificate,
                                 security_key_password=settings.security_key_password)
        client = aioredis.Redis.from_url(settings.redis_url)
        metrics = Metrics(settings)
        fleet = Fleet(producer)
        return cls(settings, producer, client, Authenticator(client),
                   Quotas(client, producer, settings.job_retention_s), fleet,
                   Admission(fleet, settings, metrics), metrics)

    async def close(self) -> None:
        await self.producer.close()
        await self.redis.aclose()  # type: ignore[attr-defined]

    async def tenant(self, request: Request) -> Tenant:
        found = await self.auth.tenant(request.headers.get("authorization"))
        request.state.tenant = found.name
        return found

    def validate(self, data: Any, prefix: str = "") -> JobRequest:
        if not isinstance(data, dict):
            raise ApiError(400, "a job request must be a JSON object", code="invalid_request",
                           param=prefix.rstrip(".") or None)
        try:
            return JobRequest.model_validate(data, context={"limits": self.producer.limits})
        except ValidationError as error:
            raise invalid(InvalidRequestError.from_validation(error), prefix) from None

    async def submit(self, tenant: Tenant, request: JobRequest) -> str:
        """The tenant into its metadata, then admission, quotas, and the job."""
        idem = request.idempotency_key
        request = self.validate(request.model_dump(mode="json") | {  # within limits still
            "metadata": {**request.metadata, "tenant": tenant.name},
            "idempotency_key": f"{tenant.name}:{idem}"[:128] if idem else None})
        try:
            await self.admission.check(request.model)
            slot = await self.quotas.acquire(
                tenant.name, _pick(tenant.requests_per_minute, self.settings.requests_per_minute),
                _pick(tenant.concurrent_jobs, self.settings.concurrent_jobs))
        except ApiError as error:
            self.metrics.rejected.labels(error.code or "other").inc()
            raise
        try:
            job_id = await self.producer.submit(request=request,
                                                require_worker=self.settings.require_worker)
        except BaseException as error:
            await self.quotas.release(slot)
            raise _unavailable(error, self.settings.admission_retry_after_s) from None
        await self.quotas.bind(slot, job_id)
        await self._remember(tenant.name, job_id)
        self.metrics.jobs.labels(tenant.name).inc()
        return job_id

    async def _remember(self, tenant: str, job_id: str) -> None:
        keep = self.settings.job_retention_s
        if not await self.redis.set(names.owner_key(job_id), tenant, ex=keep, nx=True):
            return  # known already (the same Idempotency-Key again)
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(names.recent_key(tenant), job_id)
        pipe.ltrim(names.recent_key(tenant), 0, self.settings.recent_jobs - 1)
        pipe.expire(names.recent_key(tenant), keep)
        await pipe.execute()

    async def check_owner(self, tenant: Tenant, job_id: str) -> None:
        """404 unless this tenant submitted the job (anyone may, while no key exists)."""
        if tenant.name == ANONYMOUS and not await self.auth.any_keys():
            return
        owner = await self.redis.get(names.owner_key(job_id))
        if owner is None or owner.decode() != tenant.name:
            raise ApiError(404, f"no job {job_id!r} for {tenant.name!r}", code="job_not_found",
                           param="job_id")

    async def recent(self, tenant: str, limit: int) -> list[str]:
        found = await self.redis.lrange(names.recent_key(tenant), 0, limit - 1)
        return [i.decode() for i in found]


def _pick(own: int | None, default: int) -> int:
    return default if own is None else own


def _unavailable(error: BaseException, retry_after: float) -> BaseException:
    """The producer's submit errors a client can act on, as 503s; others unchanged."""
    if isinstance(error, NoWorkerForModel):
        return ApiError(503, str(error), code="no_worker_for_model", retry_after=retry_after)
    if isinstance(error, SubmitUncertain):  # the id lets the client check before retrying
        return ApiError(503, f"{error}; submit again with the same Idempotency-Key",
                        code="submit_uncertain", retry_after=retry_after)
    return error
