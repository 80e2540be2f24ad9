"""The producer's operations, once: what ``Producer`` (blocking) and ``AsyncProducer`` (asyncio)
both do, as operations of ``producer.steps`` that each of them runs on its own transport.

Submitting writes the QUEUED record first, then sends the Celery task ``vlmq.generate`` by name
with only the job id, so the ledger knows every accepted job even if the broker loses the
message (the workers' reconciler re-sends it). Operator views and actions are in
``producer.admin`` (``AdminCore``, which this extends).
"""

from __future__ import annotations

import functools
import time
import uuid
from typing import Any

import redis
from pydantic import ValidationError

from producer import fields, keys, records
from producer.admin import AdminCore, known
from producer.broker import Broker, queue_for_model
from producer.errors import (
    InvalidRequestError,
    JobFailed,
    JobNotFound,
    JobTimeout,
    NoWorkerForModel,
    ResultUnavailable,
    SubmitUncertain,
)
from producer.records import LedgerConfig
from producer.replies import CancelOutcome, parse_result, parse_state
from producer.s3 import ResultReader
from producer.schema import DEFAULT_LIMITS, JobRequest, JobResult, JobState, JobStatus, Limits
from producer.steps import Blocking, Emit, Op, call
from producer.transport import refused

_PARAM_NAMES = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                "repetition_penalty", "seed", "stop", "bad_words", "end_tokens", "num_beams")


def build_request(
    messages: list[dict[str, Any]] | None = None,
    *,
    prompt: str | None = None,
    images: list[str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
    **options: Any,
) -> JobRequest:
    """Validate the caller's arguments into a JobRequest, or raise InvalidRequestError."""
    data: dict[str, Any] = {}
    if messages is not None:
        data["messages"] = messages
    if prompt is not None or images is not None:
        data["prompt"] = prompt
        data["images"] = images
    params: Any = {name: options.pop(name) for name in _PARAM_NAMES if name in options}
    given = options.pop("params", None)
    if isinstance(given, dict):
        params = {**given, **params}
    elif given is not None:
        params = given  # not a mapping: validation says so
    if params:
        data["params"] = params
    data.update({key: value for key, value in options.items() if value is not None})
    try:
        return JobRequest.model_validate(data, context={"limits": limits})
    except ValidationError as error:
        raise InvalidRequestError.from_validation(error) from None


class ClientCore(AdminCore):
    """What a producer does, independent of how it talks to Redis."""

    def __init__(self, ledger: LedgerConfig, broker: Broker, s3: ResultReader,
                 limits: Limits) -> None:
        super().__init__(ledger, broker)
        self.s3 = s3
        self.limits = limits

    def submit(self, messages: list[dict[str, Any]] | None = None, *, prompt: str | None = None,
               images: list[str] | None = None, request: JobRequest | None = None,
               require_worker: bool = True, **options: Any) -> Op[str]:
        if request is None:
            request = build_request(messages, prompt=prompt, images=images, limits=self.limits,
                                    **options)
        queue = queue_for_model(request.model)
        if require_worker and not (yield call("EXISTS", keys.serving_key(queue))):
            raise NoWorkerForModel(request.model, queue)
        job_id = uuid.uuid4().hex  # made before writing: a lost write still has a name
        try:
            created = yield from records.create(self.ledger, job_id, request, queue)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
            if refused(error):  # credentials or certificates: nothing was written
                raise
            raise SubmitUncertain(job_id, error) from error
        if created.created:
            yield from self.enqueue(created.job_id, queue)
        return created.job_id

    def wait(self, job_id: str, timeout: float | None = None) -> Op[JobState]:
        """Until the job is terminal: sleeps on its stream and reads the record only when a
        terminal event arrives or the stream is quiet (a second), not after every token."""
        end = None if timeout is None else time.monotonic() + timeout
        last_id: Any = "0-0"
        check = True
        while True:
            if check:
                state = yield from self.status(job_id)
                if state.status.terminal:
                    return state
            remaining = 1.0 if end is None else end - time.monotonic()
            if remaining <= 0:
                raise JobTimeout(f"job {job_id} still {state.status} after {timeout}s")
            read = yield from records.read_stream(
                job_id, last_id, None, int(min(remaining, 1.0) * 1000), 100)
            last_id, check = read.last_id, not read.events or read.ended

    def result(self, job_id: str, timeout: float | None = None) -> Op[JobResult]:
        """The job's result once it ends (partial text for a cancelled one). JobFailed for a
        FAILED job, and an EXPIRED one without a partial result."""
        yield from self.wait(known(job_id), timeout)
        raw = (yield from records.raw(job_id)) or {}
        state = parse_state(raw, job_id)
        found = parse_result(raw)
        if found is None and state.result_uri and state.status != JobStatus.FAILED:
            found = yield Blocking(functools.partial(self.s3.read, state.result_uri))
        if found is None or state.status == JobStatus.FAILED:
            raise JobFailed(state)
        return found  # type: ignore[no-any-return]

    def result_url(self, job_id: str, expires_s: int = 3600) -> Op[str]:
        state = yield from self.status(job_id)
        if not state.result_uri:
            raise ResultUnavailable(f"job {job_id} ({state.status}) has no result in S3")
        url = yield Blocking(functools.partial(self.s3.presign, state.result_uri, expires_s))
        return str(url)

    def cancel(self, job_id: str) -> Op[str]:
        answer = yield from records.cancel(self.ledger, known(job_id))
        if answer.outcome is CancelOutcome.MISSING:
            raise JobNotFound(job_id)
        return answer.answer()

    def stream(self, job_id: str, after: int | None = None,
               timeout: float | None = None) -> Op[None]:
        """Emit the job's events from the start (or after seq ``after``), then live, until the
        terminal event (``after`` at or past it: nothing); JobTimeout after ``timeout`` seconds
        without it. A job that ended but whose stream lost its terminal event (the stream
        expired or was evicted) ends the iteration once the stream is quiet for a second."""
        if (yield from records.raw(known(job_id))) is None:
            raise JobNotFound(job_id)
        end = None if timeout is None else time.monotonic() + timeout
        last_id: Any = "0-0"
        while True:
            read = yield from records.read_stream(job_id, last_id, after, 1000, 500)
            last_id = read.last_id
            if read.events:
                yield Emit(tuple(read.events))
            if read.ended:
                return
            if end is not None and time.monotonic() > end:
                raise JobTimeout(f"no terminal event for job {job_id} within {timeout}s")
            if read.found:
                continue
            record = yield from records.raw(job_id)
            if record is None:
                raise JobNotFound(job_id)
            status = fields.status(record.get("status"))
            if status is not None and status.terminal:  # ended, its terminal event lost
                read = yield from records.read_stream(job_id, last_id, after, 1, 500)
                if read.events:
                    yield Emit(tuple(read.events))
                return
