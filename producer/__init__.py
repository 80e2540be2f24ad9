"""vlmq producer: submit VLM jobs, poll them, stream their tokens. Light: no torch here."""

from producer.client import Producer
from producer.errors import (
    CorruptRecord,
    IdempotencyConflict,
    InvalidRequestError,
    JobFailed,
    JobNotFound,
    JobTimeout,
    NoWorkerForModel,
    SubmitUncertain,
    VlmqError,
)
from producer.schema import (
    ErrorCode,
    ErrorInfo,
    GenerationParams,
    JobRequest,
    JobResult,
    JobState,
    JobStatus,
    StreamEvent,
)

__all__ = [
    "AsyncProducer",
    "CorruptRecord",
    "ErrorCode",
    "ErrorInfo",
    "GenerationParams",
    "IdempotencyConflict",
    "InvalidRequestError",
    "JobFailed",
    "JobNotFound",
    "JobRequest",
    "JobResult",
    "JobState",
    "JobStatus",
    "JobTimeout",
    "NoWorkerForModel",
    "SubmitUncertain",
    "Producer",
    "StreamEvent",
    "VlmqError",
]


def __getattr__(name: str) -> object:
    if name == "AsyncProducer":  # redis.asyncio only when asked for
        from producer.aio import AsyncProducer

        return AsyncProducer
    raise AttributeError(name)
