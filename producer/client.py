"""Producer: submit jobs, read their status and result, follow their token stream, cancel them.

A thin blocking shell: every method runs the same operation of ``producer.core`` that
``AsyncProducer`` (``producer.aio``) awaits, so both have the same methods, arguments, answers
and errors (a test compares them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from producer import keys
from producer.broker import Broker, make_celery
from producer.core import ClientCore, build_request
from producer.jobs import Ledger
from producer.records import DEFAULT_QUEUED_RETENTION_S, DEFAULT_RETENTION_S
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
from producer.transport import connect, iterate

__all__ = ["Producer", "build_request"]


class Producer:
    """Blocking producer. ``redis_url`` holds the ledger and streams; the broker defaults to it.
    ``s3`` (endpoint, region, credentials) is used only for results stored in S3; unset, boto3's
    standard AWS chain applies. ``security_key`` and ``security_certificate`` (PEM paths, RSA;
    ``security_key_password`` if the key is encrypted) sign every task message and job record
    for workers that require signing (``producer.signing``)."""

    def __init__(self, redis_url: str = keys.DEFAULT_REDIS_URL, *, broker_url: str | None = None,
                 limits: Limits = DEFAULT_LIMITS, retention_s: int = DEFAULT_RETENTION_S,
                 queued_retention_s: int = DEFAULT_QUEUED_RETENTION_S,
                 s3: S3Config | None = None, security_key: str | None = None,
                 security_certificate: str | None = None,
                 security_key_password: str | None = None) -> None:
        signer = signer_from(security_key, security_certificate, security_key_password)
        self.redis = connect(redis_url)
        self.ledger = Ledger(self.redis, retention_s=retention_s, signer=signer,
                             queued_retention_s=queued_retention_s)
        self.limits = limits
        self.broker_url = broker_url or redis_url
        self._celery = make_celery(self.broker_url, signer)
        self._broker = Broker(self._celery, self.broker_url)
        self._core = ClientCore(self.ledger.config, self._broker, ResultReader(s3 or S3Config()),
                                limits)

    def close(self) -> None:
        self.redis.close()
        self._broker.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, messages: list[dict[str, Any]] | None = None, *, prompt: str | None = None,
               images: list[str] | None = None, request: JobRequest | None = None,
               require_worker: bool = True, **options: Any) -> str:
        """Accept a job and return its id. Options: GenerationParams fields, model, ttl_s,
        idempotency_key, metadata, result_store, max_pixels. NoWorkerForModel when no live
        worker serves the model (unless ``require_worker=False``); SubmitUncertain when the
        write's outcome is unknown."""
        return self.ledger.run(self._core.submit(messages, prompt=prompt, images=images,
                                                 request=request, require_worker=require_worker,
                                                 **options))

    def enqueue(self, job_id: str, queue: str = keys.DEFAULT_QUEUE) -> None:
        """Send the task message for an existing record (also used to re-send a lost one)."""
        self.ledger.run(self._core.enqueue(job_id, queue))

    def status(self, job_id: str) -> JobState:
        return self.ledger.run(self._core.status(job_id))

    def wait(self, job_id: str, timeout: float | None = None) -> JobState:
        """Block until the job is terminal; returns its final state (JobTimeout after
        ``timeout`` seconds)."""
        return self.ledger.run(self._core.wait(job_id, timeout))

    def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Wait for the job and return its result (partial text for a cancelled job).
        Raises JobFailed for FAILED jobs and for EXPIRED ones that have no partial result."""
        return self.ledger.run(self._core.result(job_id, timeout))

    def result_url(self, job_id: str, expires_s: int = 3600) -> str:
        """A presigned HTTPS URL of the job's result object, valid ``expires_s`` seconds.
        Raises ResultUnavailable when the result is not in S3 (kept in Redis, or none yet)."""
        return self.ledger.run(self._core.result_url(job_id, expires_s))

    def cancel(self, job_id: str) -> str:
        """Cancel a job. Returns ``cancelled`` (it was queued: it will never run),
        ``requested`` (running: it stops within two decode steps), or the status of an
        already finished job (nothing changes)."""
        return self.ledger.run(self._core.cancel(job_id))

    def stream(self, job_id: str, after: int | None = None,
               timeout: float | None = None) -> Iterator[StreamEvent]:
        """Yield the job's events from the start (or after seq ``after``), then live, until
        the terminal event. Replays the Redis Stream, so joining late loses nothing; resumed at
        or past the terminal event it yields nothing and ends."""
        yield from iterate(self.redis, self._core.stream(job_id, after, timeout))

    # -- operators (producer.admin) --------------------------------------------------------

    def queue_depth(self, queue: str) -> int | None:
        """Messages waiting in ``queue`` (None when the broker cannot say)."""
        return self.ledger.run(self._core.queue_depth(queue))

    def workers(self) -> list[dict[str, Any]]:
        """Live workers' last health reports."""
        return self.ledger.run(self._core.workers())

    def queue_names(self) -> list[str]:
        return self.ledger.run(self._core.queue_names())

    def jobs(self, status: JobStatus | str | None = None, limit: int = 50) -> list[JobState]:
        """Jobs with ``status`` (any when None), at most ``limit``."""
        return self.ledger.run(self._core.jobs(status, limit))

    def stats(self) -> dict[str, Any]:
        """Queue depths, the oldest queued job, job counts by status, live workers."""
        return self.ledger.run(self._core.stats())

    def backlog(self) -> dict[str, dict[str, Any]]:
        """Per queue: broker depth, QUEUED jobs recorded, age of the oldest."""
        return self.ledger.run(self._core.backlog())

    def retry(self, job_id: str) -> JobState:
        """Run a FAILED or EXPIRED job again under the same id; JobNotFound or NotAllowed."""
        return self.ledger.run(self._core.retry(job_id))

    def purge(self, queue: str) -> dict[str, Any]:
        """Delete ``queue``'s waiting messages and cancel the QUEUED jobs recorded for it."""
        return self.ledger.run(self._core.purge(queue))
