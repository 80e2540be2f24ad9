"""AsyncProducer: the Producer's submit / status / result / stream / cancel on redis.asyncio.

Same semantics as ``producer.client.Producer``: the record is written before the task is sent;
``stream`` replays the Redis Stream and then follows it live until the terminal event.
The Celery message is sent by the blocking Celery client in a thread (it is one small write).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from producer import keys, scripts
from producer.client import broker_queue, build_request, make_celery, new_events
from producer.errors import JobFailed, JobNotFound, JobTimeout
from producer.jobs import DEFAULT_RETENTION_S, DEFAULT_STREAM_MAXLEN, new_record, parse_result
from producer.jobs import parse_state as _parse_state
from producer.s3 import ResultReader, S3Config
from producer.schema import DEFAULT_LIMITS, JobRequest, JobResult, JobState, JobStatus, Limits
from producer.signing import signer_from


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class AsyncProducer:
    def __init__(self, redis_url: str = keys.DEFAULT_REDIS_URL, *, broker_url: str | None = None,
                 limits: Limits = DEFAULT_LIMITS, retention_s: int = DEFAULT_RETENTION_S,
                 s3: S3Config | None = None, security_key: str | None = None,
                 security_certificate: str | None = None,
                 security_key_password: str | None = None) -> None:
        self._signer = signer_from(security_key, security_certificate, security_key_password)
        self.redis = aioredis.Redis.from_url(redis_url)
        self._s3 = ResultReader(s3 or S3Config())
        self.limits = limits
        self.retention_s = retention_s
        self.broker_url = broker_url or redis_url
        self._celery = make_celery(self.broker_url, self._signer)
        self._create = self.redis.register_script(scripts.CREATE)
        self._cancel = self.redis.register_script(scripts.CANCEL)

    async def close(self) -> None:
        await self.redis.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(self, messages: list[dict[str, Any]] | None = None, *,
                     prompt: str | None = None, images: list[str] | None = None,
                     request: JobRequest | None = None, **options: Any) -> str:
        if request is None:
            request = build_request(messages, prompt=prompt, images=images, limits=self.limits,
                                    **options)
        queue = keys.queue_for_model(request.model)
        job_id, now = uuid.uuid4().hex, time.time()
        record = new_record(job_id, request, queue, now, self._signer)
        flat = [v for pair in record.items() for v in pair]
        idem = keys.idempotency_key(request.idempotency_key) if request.idempotency_key else ""
        created, found = await self._create(
            keys=[keys.job_key(job_id), idem], args=[job_id, repr(now), self.retention_s, *flat])
        if created:
            await asyncio.to_thread(self._celery.send_task, keys.TASK_GENERATE, args=[job_id],
                                    queue=broker_queue(queue, self.broker_url), task_id=job_id)
        return _text(found)

    async def _raw(self, job_id: str) -> dict[str, str] | None:
        raw = await self.redis.hgetall(keys.job_key(job_id))
        return {_text(k): _text(v) for k, v in raw.items()} if raw else None

    async def status(self, job_id: str) -> JobState:
        raw = await self._raw(job_id)
        if raw is None:
            raise JobNotFound(job_id)
        return _parse_state(raw)

    async def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        try:
            async with asyncio.timeout(timeout):
                async for _event in self.stream(job_id):
                    pass
        except TimeoutError:
            raise JobTimeout(f"job {job_id} not finished after {timeout}s") from None
        raw = await self._raw(job_id) or {}
        state = _parse_state(raw)
        found = parse_result(raw)
        if found is None and state.result_uri and state.status != JobStatus.FAILED:
            found = await asyncio.to_thread(self._s3.read, state.result_uri)
        if found is None or state.status == JobStatus.FAILED:
            raise JobFailed(state)
        return found

    async def cancel(self, job_id: str) -> str:
        answer = _text(await self._cancel(
            keys=[keys.job_key(job_id), keys.stream_key(job_id), keys.token_channel(job_id)],
            args=[repr(time.time()), self.retention_s, DEFAULT_STREAM_MAXLEN]))
        if answer == "missing":
            raise JobNotFound(job_id)
        return answer

    async def stream(self, job_id: str, after: int | None = None) -> AsyncIterator[Any]:
        if await self._raw(job_id) is None:
            raise JobNotFound(job_id)
        skey = keys.stream_key(job_id)
        last_id: Any = "0-0"
        while True:
            found = await self.redis.xread({skey: last_id}, block=1000, count=500)
            last_id, events = new_events(found, last_id, after)
            for event in events:
                yield event
            if events and events[-1].terminal:
                return
            if not found and await self._raw(job_id) is None:
                raise JobNotFound(job_id)

