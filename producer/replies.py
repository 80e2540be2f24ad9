"""The ledger's typed answers: one enum (or dataclass) per script, parsed from its raw reply;
and the record itself read as the public JobState / JobResult."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, NamedTuple, get_args

from pydantic import ValidationError

from producer import fields, keys
from producer.answers import FinishReason, JobResult, JobState, JobStatus
from producer.errors import CorruptRecord, ResultUnavailable


def text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def read_time(value: str | None) -> float | None:
    """A timestamp field; garbage, NaN or infinity: None (``producer.fields``)."""
    return fields.finite(value)


def status_of(value: Any) -> JobStatus | None:
    """A status field; one written around the producer may be no status at all: None."""
    return fields.status(text(value))


def parse_state(raw: dict[str, str], job_id: str | None = None) -> JobState:
    """The record hash (``fields.decode``) as the public JobState, tolerantly: garbage reads as
    absent. CorruptRecord (typed) only when its status is not a job status."""
    found = fields.status(raw.get("status"))
    name = fields.clean(job_id or raw.get("id") or "")
    if found is None:
        raise CorruptRecord(name, fields.problems(raw))
    reason = raw.get("finish_reason")

    def opt(key: str) -> str | None:
        return fields.clean(raw.get(key) or "") or None

    return JobState(
        job_id=name, status=found, queue=opt("queue") or keys.DEFAULT_QUEUE, model=opt("model"),
        created_at=fields.finite(raw.get("created_at")) or 0.0,
        started_at=fields.finite(raw.get("started_at")),
        finished_at=fields.finite(raw.get("finished_at")),
        deadline_at=fields.finite(raw.get("deadline_at")),
        attempts=fields.counter(raw.get("attempts")), worker=opt("worker"),
        cancel_requested=raw.get("cancel") == "1",
        finish_reason=reason if reason in get_args(FinishReason) else None,  # type: ignore[arg-type]
        error=fields.error(raw.get("error")), result_uri=opt("result_uri"),
    )


def parse_result(raw: dict[str, str]) -> JobResult | None:
    """The ``result`` field; one that does not parse is ResultUnavailable (typed)."""
    body = raw.get("result")
    if not body:
        return None
    try:
        return JobResult.model_validate_json(body)
    except ValidationError:
        raise ResultUnavailable(f"job {fields.clean(raw.get('id') or '')}: its result field "
                                "is not a result") from None


class Created(NamedTuple):
    """CREATE: whether a record was written, and the job id (an idempotency hit: the first)."""

    created: bool
    job_id: str


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"  # ours now: run it
    MISSING = "missing"  # no record (expired, or never written)
    TERMINAL = "terminal"  # already finished (a duplicate message), or not a state to run from
    BUSY = "busy"  # RUNNING under a live lease elsewhere
    CANCELLED = "cancelled"  # ended CANCELLED here: cancel was asked before it ran
    EXPIRED = "expired"  # ended EXPIRED here: picked up past its deadline
    INVALID = "invalid"  # ended FAILED/INVALID_REQUEST here: its counters were not numbers
    EXHAUSTED = "exhausted"  # ended FAILED/WORKER_LOST here: the attempt cap

    @property
    def ended_here(self) -> JobStatus | None:
        """The status this claim ended the job with, if it did."""
        return {ClaimOutcome.CANCELLED: JobStatus.CANCELLED, ClaimOutcome.EXPIRED:
                JobStatus.EXPIRED, ClaimOutcome.INVALID: JobStatus.FAILED,
                ClaimOutcome.EXHAUSTED: JobStatus.FAILED}.get(self)


@dataclass(frozen=True)
class Claim:
    """CLAIM's answer: everything a task needs to hand a claimed job to the engine."""

    outcome: ClaimOutcome
    fence: int = 0
    attempt: int = 0  # this attempt's number: 1 for a first run
    next_seq: int = 0  # where the stream goes on
    sent: str = ""  # text earlier attempts already streamed
    record: dict[str, str] = field(default_factory=dict)  # the record's fields (signatures too)
    key: str = ""  # where the record lives (what its signature covers)

    @property
    def request(self) -> str | None:
        return self.record.get("request")

    @property
    def queue(self) -> str:
        return self.record.get("queue") or ""

    @property
    def problems(self) -> list[str]:
        """What is wrong with the claimed record (``producer.fields``); the task fails the job
        INVALID_REQUEST when anything is."""
        return fields.problems(self.record)

    @property
    def created_at(self) -> float:
        return read_time(self.record.get("created_at")) or 0.0

    @property
    def deadline(self) -> float:
        found = read_time(self.record.get("deadline_at"))
        return float("inf") if found is None else found

    @classmethod
    def parse(cls, reply: list[Any], key: str = "") -> Claim:
        outcome = ClaimOutcome(text(reply[0]))
        if outcome is not ClaimOutcome.CLAIMED:
            return cls(outcome, key=key)
        pairs = [fields.as_str(item) for item in reply[5:]]
        return cls(outcome, fence=int(reply[1]), attempt=int(reply[2]), next_seq=int(reply[3]),
                   sent=text(reply[4]), record=dict(zip(pairs[::2], pairs[1::2], strict=True)),
                   key=key)


class Heartbeat(IntEnum):
    LOST = -1  # the fence is stale: someone else owns the job now
    HELD = 0
    CANCEL = 1  # still ours, and cancel was asked


class Append(IntEnum):
    STALE = 0  # the fence is stale
    KEPT = 1
    CANCEL = 2  # written, and cancel was asked
    BEHIND = 3  # not written: the stream lost entries before this seq (re-append them)


class Commit(IntEnum):
    """FINISH and RELEASE: refused (not RUNNING under this fence) or done. Falsy when refused.
    FINISH with an expected seq also answers BEHIND: the stream lost entries (nothing done)."""

    REFUSED = 0
    DONE = 1
    BEHIND = 2


class CancelOutcome(StrEnum):
    CANCELLED = "cancelled"  # was QUEUED: ended CANCELLED, it never runs
    REQUESTED = "requested"  # RUNNING: its worker stops it within two decode steps
    LEFT_RUNNING = "running"  # RUNNING and ``queued_only``: left alone
    ENDED = "ended"  # already finished: nothing changed (``status`` says how it ended)
    MISSING = "missing"


@dataclass(frozen=True)
class Cancel:
    outcome: CancelOutcome
    status: JobStatus | None = None

    @classmethod
    def parse(cls, reply: list[Any]) -> Cancel:
        status = status_of(reply[1]) if len(reply) > 1 else None
        return cls(CancelOutcome(text(reply[0])), status)

    def answer(self) -> str:
        """What ``Producer.cancel`` returns: cancelled, requested, or the finished status."""
        if self.outcome is CancelOutcome.ENDED and self.status is not None:
            return self.status.value
        if self.outcome is CancelOutcome.LEFT_RUNNING:
            return JobStatus.RUNNING.value
        return self.outcome.value


class RetryOutcome(StrEnum):
    QUEUED = "queued"
    REFUSED = "refused"  # not FAILED or EXPIRED: ``status`` says what it is
    MISSING = "missing"


@dataclass(frozen=True)
class Retry:
    outcome: RetryOutcome
    status: JobStatus | None = None

    @classmethod
    def parse(cls, reply: list[Any]) -> Retry:
        status = status_of(reply[1]) if len(reply) > 1 else None
        return cls(RetryOutcome(text(reply[0])), status)
