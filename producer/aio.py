"""AsyncProducer: the Producer's methods on redis.asyncio, running the same operations.

Every method awaits the operation of ``producer.core`` that ``Producer`` runs blocking, so both
have the same methods, arguments, answers and errors. Steps that block off Redis (sending the
Celery message, reading S3) run in a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry

from producer import keys
from producer.broker import Broker, make_celery
from producer.core import ClientCore
from producer.records import DEFAULT_QUEUED_RETENTION_S, DEFAULT_RETENTION_S, LedgerConfig
from producer.s3 import ResultReader, S3Config
from producer.schema import (
    DEFAULT_LIMITS,
    JobRequest,
    JobResult,
    JobState,
    JobStatus,
    Limits,
    StreamEvent,
)
from producer.signing import signer_from
from producer.steps import Batch, Blocking, Call, Emit, Eval, Op, Step
from producer.transport import RETRY_ON, Refused, backoff, refused

T = TypeVar("T")


class _RetryUnlessRefused(Retry):
    """redis.asyncio's Retry, except that refused credentials and certificates are raised at
    once (as ``producer.transport.connect`` does)."""

    async def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        async def once() -> Any:
            try:
                return await do()
            except redis.ConnectionError as error:
                if refused(error):
                    raise Refused(error) from error
                raise

        try:
            return await super().call_with_retry(once, fail, *args, **kwargs)
        except Refused as final:
            raise final.error from None


def connect(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, retry=_RetryUnlessRefused(backoff(), 6),
                                   retry_on_error=RETRY_ON, health_check_interval=30)


async def execute(client: aioredis.Redis, step: Step) -> Any:
    """``producer.transport.execute``, awaited."""
    if isinstance(step, Call):
        return await client.execute_command(*step.args)
    if isinstance(step, Blocking):
        return await asyncio.to_thread(step.fn)
    try:
        if isinstance(step, Eval):
            return await client.evalsha(step.script.sha, len(step.keys), *step.keys,
                                        *step.args)  # type: ignore[misc]
        assert isinstance(step, Batch)
        async with client.pipeline(transaction=step.atomic) as pipe:
            for item in step.steps:
                if isinstance(item, Eval):
                    pipe.evalsha(item.script.sha, len(item.keys), *item.keys, *item.args)
                else:
                    pipe.execute_command(*item.args)
            return list(await pipe.execute())
    except redis.exceptions.NoScriptError:
        scripts = [step.script] if isinstance(step, Eval) else [
            s.script for s in step.steps if isinstance(s, Eval)]  # type: ignore[union-attr]
        for script in {s.name: s for s in scripts}.values():
            await client.script_load(script.lua)
        return await execute(client, step)


async def iterate(client: aioredis.Redis, op: Op[Any]) -> AsyncIterator[Any]:
    reply: Any = None
    while True:
        try:
            step = op.send(reply)
        except StopIteration:
            return
        if isinstance(step, Emit):
            for item in step.items:
                yield item
            reply = None
        else:
            reply = await execute(client, step)


async def run(client: aioredis.Redis, op: Op[T]) -> T:
    """``producer.transport.run``, awaited: a failed step is raised inside the operation."""
    reply: Any = None
    error: Exception | None = None
    while True:
        try:
            step = op.send(reply) if error is None else op.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        reply, error = None, None
        if not isinstance(step, Emit):
            try:
                reply = await execute(client, step)
            except Exception as failed:
                error = failed


class AsyncProducer:
    """``Producer`` on asyncio: the same constructor, methods and errors, awaited."""

    def __init__(self, redis_url: str = keys.DEFAULT_REDIS_URL, *, broker_url: str | None = None,
                 limits: Limits = DEFAULT_LIMITS, retention_s: int = DEFAULT_RETENTION_S,
                 queued_retention_s: int = DEFAULT_QUEUED_RETENTION_S,
                 s3: S3Config | None = None, security_key: str | None = None,
                 security_certificate: str | None = None,
                 security_key_password: str | None = None) -> None:
        signer = signer_from(security_key, security_certificate, security_key_password)
        self.redis = connect(redis_url)
        self.limits = limits
        self.broker_url = broker_url or redis_url
        self._celery = make_celery(self.broker_url, signer)
        self._broker = Broker(self._celery, self.broker_url)
        self._core = ClientCore(LedgerConfig(retention_s, signer=signer,
                                             queued_retention_s=queued_retention_s), self._broker,
                                ResultReader(s3 or S3Config()), limits)

    async def _run(self, op: Op[T]) -> T:
        return await run(self.redis, op)

    async def close(self) -> None:
        await self.redis.aclose()  # type: ignore[attr-defined]
        await asyncio.to_thread(self._broker.close)

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(self, messages: list[dict[str, Any]] | None = None, *,
                     prompt: str | None = None, images: list[str] | None = None,
                     request: JobRequest | None = None, require_worker: bool = True,
                     **options: Any) -> str:
        return await self._run(self._core.submit(messages, prompt=prompt, images=images,
                                                 request=request, require_worker=require_worker,
                                                 **options))

    async def enqueue(self, job_id: str, queue: str = keys.DEFAULT_QUEUE) -> None:
        await self._run(self._core.enqueue(job_id, queue))

    async def status(self, job_id: str) -> JobState:
        return await self._run(self._core.status(job_id))

    async def wait(self, job_id: str, timeout: float | None = None) -> JobState:
        return await self._run(self._core.wait(job_id, timeout))

    async def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        return await self._run(self._core.result(job_id, timeout))

    async def result_url(self, job_id: str, expires_s: int = 3600) -> str:
        return await self._run(self._core.result_url(job_id, expires_s))

    async def cancel(self, job_id: str) -> str:
        return await self._run(self._core.cancel(job_id))

    async def stream(self, job_id: str, after: int | None = None,
                     timeout: float | None = None) -> AsyncIterator[StreamEvent]:
        async for event in iterate(self.redis, self._core.stream(job_id, after, timeout)):
            yield event

    async def queue_depth(self, queue: str) -> int | None:
        return await self._run(self._core.queue_depth(queue))

    async def workers(self) -> list[dict[str, Any]]:
        return await self._run(self._core.workers())

    async def queue_names(self) -> list[str]:
        return await self._run(self._core.queue_names())

    async def jobs(self, status: JobStatus | str | None = None,
                   limit: int = 50) -> list[JobState]:
        return await self._run(self._core.jobs(status, limit))

    async def stats(self) -> dict[str, Any]:
        return await self._run(self._core.stats())

    async def backlog(self) -> dict[str, dict[str, Any]]:
        return await self._run(self._core.backlog())

    async def retry(self, job_id: str) -> JobState:
        return await self._run(self._core.retry(job_id))

    async def purge(self, queue: str) -> dict[str, Any]:
        return await self._run(self._core.purge(queue))
