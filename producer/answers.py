"""The answers on the wire: job statuses, error codes, states, results and stream events.

Frozen pydantic v2 models, JSON only, versioned by ``schema_version`` like the request
(``producer.schema``, which re-exports everything here).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION: Literal[1] = 1


class JobStatus(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"

    @property
    def terminal(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


class ErrorCode(StrEnum):
    """Stable error codes. ``retryable`` on ErrorInfo says whether trying again may help."""

    INVALID_REQUEST = "INVALID_REQUEST"
    INVALID_PROMPT = "INVALID_PROMPT"
    PROMPT_TOO_LONG = "PROMPT_TOO_LONG"
    IMAGE_FETCH_FAILED = "IMAGE_FETCH_FAILED"
    IMAGE_FETCH_TIMEOUT = "IMAGE_FETCH_TIMEOUT"
    IMAGE_NOT_FOUND = "IMAGE_NOT_FOUND"
    IMAGE_URL_FORBIDDEN = "IMAGE_URL_FORBIDDEN"
    IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"
    IMAGE_UNSUPPORTED_FORMAT = "IMAGE_UNSUPPORTED_FORMAT"
    IMAGE_INVALID = "IMAGE_INVALID"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    RESULT_STORE_FAILED = "RESULT_STORE_FAILED"
    MODEL_ERROR = "MODEL_ERROR"
    WORKER_LOST = "WORKER_LOST"
    INTERNAL = "INTERNAL"


FinishReason = Literal["stop", "length", "cancelled", "deadline"]


class WireModel(BaseModel):
    """Every wire document: immutable, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ErrorInfo(WireModel):
    code: ErrorCode
    message: str
    retryable: bool = False


class Usage(WireModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Timings(WireModel):
    """Milliseconds spent in each phase of the last attempt."""

    queued_ms: float = 0.0
    fetch_ms: float = 0.0
    preprocess_ms: float = 0.0
    generate_ms: float = 0.0
    total_ms: float = 0.0


class JobResult(WireModel):
    schema_version: Literal[1] = SCHEMA_VERSION
    job_id: str
    text: str
    finish_reason: FinishReason
    usage: Usage = Field(default_factory=Usage)
    timings: Timings = Field(default_factory=Timings)
    model: str = ""
    worker: str = ""


class JobState(WireModel):
    """The ledger's view of a job, as ``Producer.status`` returns it."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job_id: str
    status: JobStatus
    queue: str
    model: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    deadline_at: float | None = None
    attempts: int = 0
    worker: str | None = None
    cancel_requested: bool = False
    finish_reason: FinishReason | None = None
    error: ErrorInfo | None = None
    result_uri: str | None = None


EventType = Literal["delta", "restart", "done", "error", "cancelled"]


class StreamEvent(WireModel):
    """One event of a job's token stream. Exactly one terminal event (not ``delta``) ends it."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job_id: str
    seq: int = Field(ge=0)
    type: EventType
    delta: str = ""
    tokens: int = 0
    ts: float
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: ErrorInfo | None = None
    attempt: int | None = None  # restart: the attempt that took over
    from_seq: int | None = None  # restart: deltas from this seq on (up to this event) are void

    @property
    def terminal(self) -> bool:
        return self.type not in ("delta", "restart")
