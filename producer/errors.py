"""Errors a producer sees. Worker-side failures arrive as ``ErrorInfo`` inside ``JobFailed``."""

from __future__ import annotations

from pydantic import ValidationError

from producer.schema import ErrorCode, ErrorInfo, JobState


class VlmqError(Exception):
    """Base of every error the producer raises."""


class InvalidRequestError(VlmqError, ValueError):
    """The request breaks the contract; ``problems`` lists (field path, reason) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = "; ".join(f"{path or '(request)'}: {reason}" for path, reason in problems)
        super().__init__(f"invalid job request: {lines}")

    @classmethod
    def from_validation(cls, error: ValidationError) -> InvalidRequestError:
        problems = []
        for item in error.errors():
            path = ".".join(str(part) for part in item["loc"])
            reason = item["msg"].removeprefix("Value error, ")
            problems.append((path, reason))
        return cls(problems)


class JobNotFound(VlmqError, KeyError):
    """No record for this job id (never submitted, or expired after its retention)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id!r} (unknown, or its record has expired)")

    def __str__(self) -> str:
        return str(self.args[0])


class IdempotencyConflict(VlmqError):
    """The idempotency key already names a job with a different request; ``job_id`` is that
    job. Use another key (or ``idempotency_scope``), or send the same request again."""

    def __init__(self, key: str, job_id: str) -> None:
        self.key, self.job_id = key, job_id
        super().__init__(f"idempotency key {key!r} already names job {job_id} with a different "
                         "request")


class CorruptRecord(VlmqError):
    """The job's record cannot be read as a job (its status is not a job status): it was
    written around the producer. ``problems`` says what is wrong."""

    def __init__(self, job_id: str, problems: list[str]) -> None:
        self.job_id, self.problems = job_id, problems
        super().__init__(f"job {job_id!r} has an unreadable record: {'; '.join(problems)}")


class JobFailed(VlmqError):
    """The job ended FAILED or EXPIRED without a result; ``error`` says why."""

    def __init__(self, state: JobState) -> None:
        self.state = state
        self.error = state.error or ErrorInfo(code=ErrorCode.INTERNAL,
                                              message=f"job {state.status}")
        super().__init__(f"job {state.job_id} {state.status}: {self.error.code}: "
                         f"{self.error.message}")


class JobTimeout(VlmqError, TimeoutError):
    """The job did not finish within the time the caller was willing to wait."""


class ResultUnavailable(VlmqError):
    """The job's result is in S3 and cannot be read (or signed): the message says why."""


class NotAllowed(VlmqError):
    """The job is not in a state that allows this action (e.g. retrying a SUCCEEDED job)."""


class SubmitUncertain(VlmqError):
    """``submit`` lost its connection (or timed out) while writing the job: it may have been
    accepted or not. ``job_id`` is the id it was written under: ``status(job_id)`` tells once
    Redis answers (JobNotFound: not accepted), and a submit with the same ``idempotency_key``
    is safe to send again (it answers the first job's id if that one was written)."""

    def __init__(self, job_id: str, error: BaseException) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} may or may not have been accepted ({type(error).__name__}:"
                         f" {error}); check status({job_id!r}) or submit again with the same "
                         f"idempotency_key")


class NoWorkerForModel(VlmqError):
    """No live worker has served this model's queue within ``keys.SERVED_WINDOW_S``: the job
    would wait for a worker that may never come. Submit with ``require_worker=False`` to queue
    it anyway (a worker started later takes it; ``ttl_s`` bounds the wait)."""

    def __init__(self, model: str | None, queue: str) -> None:
        self.model, self.queue = model, queue
        super().__init__(f"no live worker serves model {model or '(none)'} (queue {queue}); "
                         "start one, or submit with require_worker=False (vlmq submit "
                         "--no-require-worker) to queue it anyway")
