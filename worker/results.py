"""Where results go: into the job record in Redis, or to an S3 object the record points at.
``place`` alone decides, and answers the record fields that say where the result is.

A result goes to S3 when the request asks for it (``result_store="s3"``), when the worker's
default says so (``VLMQ_RESULT_STORE=s3``), or when its JSON is larger than
``VLMQ_S3_RESULT_OVER_BYTES``. The object is ``s3://{bucket}/{prefix}/{job_id}.json`` (the
JobResult JSON), and the record then holds ``result_uri`` instead of ``result``.

The write is conditional (``If-None-Match: *``): the first writer wins, a second attempt of the
same job cannot overwrite the object, and finding the object already there (412
PreconditionFailed) counts as written when it holds this job's result. Every S3 error is retried
with exponential backoff, ``s3_result_attempts`` times in all; then the job fails with
RESULT_STORE_FAILED, and it is never marked SUCCEEDED before its object exists.

The S3 client comes from ``producer.s3.s3_client`` (custom endpoints such as MinIO or moto are
addressed path-style).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from producer import s3 as producer_s3
from worker.errors import ResultStoreFailed
from worker.settings import WorkerSettings

log = logging.getLogger("vlmq.results")


def s3_client(settings: WorkerSettings) -> Any:
    """A boto3 S3 client from the settings; credentials fall back to the standard AWS chain."""
    return producer_s3.s3_client(settings.s3_config(), connect_timeout=5, read_timeout=30,
                     retries={"max_attempts": 1, "mode": "standard"})  # our own retry loop


class ResultStore:
    """Decides where a result goes and writes the S3 ones (thread-safe: boto3 clients are)."""

    def __init__(self, settings: WorkerSettings, *, client: Any = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.default = settings.result_store
        self.bucket = settings.s3_result_bucket or ""
        self.prefix = settings.s3_result_prefix.strip("/")
        self.over_bytes = settings.s3_result_over_bytes
        self.attempts = settings.s3_result_attempts
        self.backoff_s = settings.s3_result_backoff_s
        self._sleep = sleep
        self._client = client if client is not None else (
            s3_client(settings) if self.bucket else None)

    def where(self, request_store: str, size: int) -> str:
        """``s3`` or ``redis`` for a result of ``size`` bytes whose request asked for
        ``request_store``."""
        if request_store == "s3" or self.default == "s3":
            return "s3"
        if self.over_bytes and size > self.over_bytes and self.bucket:
            return "s3"
        return "redis"

    def key(self, job_id: str) -> str:
        return f"{self.prefix}/{job_id}.json" if self.prefix else f"{job_id}.json"

    def uri(self, job_id: str) -> str:
        return f"s3://{self.bucket}/{self.key(job_id)}"

    def put(self, job_id: str, body: bytes) -> str:
        """Write the result object once (first writer wins); return its ``s3://`` URI.
        Raises ResultStoreFailed after the last attempt."""
        if self._client is None:
            raise ResultStoreFailed("the result was to go to S3, but this worker has no result "
                                    "bucket (set VLMQ_S3_RESULT_BUCKET)", retryable=False)
        delay, last = self.backoff_s, ""
        for attempt in range(1, self.attempts + 1):
            try:
                return self._write_once(job_id, body)
            except ClientError as error:
                last = self._describe(error, job_id)
            except (BotoCoreError, OSError) as error:
                last = f"{type(error).__name__}: {error}"
            if attempt < self.attempts:
                log.warning("job %s: result write %d/%d failed (%s); retrying in %.2fs", job_id,
                            attempt, self.attempts, last, delay, extra={"job_id": job_id})
                self._sleep(delay)
                delay *= 2
        raise ResultStoreFailed(f"could not write the result to {self.uri(job_id)} after "
                                f"{self.attempts} attempts: {last}")

    def _write_once(self, job_id: str, body: bytes) -> str:
        key = self.key(job_id)
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=body,  # type: ignore[union-attr]
                                    ContentType="application/json", IfNoneMatch="*")
        except ClientError as error:
            if _code(error) not in ("PreconditionFailed", "412"):
                raise
            self._check_existing(job_id, key)
            log.info("job %s: result object already written by an earlier attempt", job_id,
                     extra={"job_id": job_id})
        return self.uri(job_id)

    def _check_existing(self, job_id: str, key: str) -> None:
        """The object is there already: fine if it is this job's result, an error otherwise."""
        found = self._client.get_object(Bucket=self.bucket, Key=key)  # type: ignore[union-attr]
        try:
            owner = json.loads(found["Body"].read()).get("job_id")
        except (ValueError, AttributeError):
            owner = None
        if owner != job_id:
            raise ResultStoreFailed(f"{self.uri(job_id)} already exists and does not hold this "
                                    "job's result", retryable=False)

    def _describe(self, error: ClientError, job_id: str) -> str:
        code = _code(error)
        if code == "NoSuchBucket":
            return f"bucket {self.bucket!r} does not exist"
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"access to {self.uri(job_id)} denied ({code})"
        message = error.response.get("Error", {}).get("Message", "")
        return f"{code}: {message}".rstrip(": ")


def place(store: ResultStore | None, job_id: str, body: str, requested: str) -> dict[str, str]:
    """Put a JobResult JSON where it belongs and return the record fields that say where:
    ``result_uri`` (an S3 object, written first) or ``result`` (the JSON itself). ``store`` is
    None on a worker without a result store; ``requested`` is the request's result_store.
    Raises ResultStoreFailed when the result must go to S3 and cannot."""
    data = body.encode()
    if store is not None and store.where(requested, len(data)) == "s3":
        return {"result_uri": store.put(job_id, data)}
    if requested == "s3":
        raise ResultStoreFailed("the request asked for an S3 result; this worker has no result "
                                "store", retryable=False)
    return {"result": body}


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))
