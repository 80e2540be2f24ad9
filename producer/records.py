"""Every read and write of job records, attempt lists, indexes and streams, as operations.

Each function is an operation (``producer.steps``): it builds the Redis commands and parses
their replies into typed answers (``producer.replies``), and a transport runs it. This module,
``producer.scripts`` and the ``Ledger`` that runs these operations (``producer.jobs``) are the
only code that names the job keys; everything else asks them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from producer import fields, keys, scripts
from producer.errors import CorruptRecord, IdempotencyConflict
from producer.events import StreamRead, event_body, job_event, new_events
from producer.replies import (
    Append,
    Cancel,
    Claim,
    Commit,
    Created,
    Heartbeat,
    Retry,
    parse_state,
    text,
)
from producer.schema import (
    ErrorCode,
    ErrorInfo,
    EventType,
    FinishReason,
    JobRequest,
    JobState,
    JobStatus,
    StreamEvent,
    Usage,
)
from producer.steps import Batch, Eval, Op, call

if TYPE_CHECKING:
    from producer.signing import Signer

log = logging.getLogger("vlmq.ledger")
DEFAULT_RETENTION_S = 86_400
DEFAULT_QUEUED_RETENTION_S = 7 * 86_400  # a QUEUED record no worker ever takes is dropped then
DEFAULT_STREAM_MAXLEN = 10_000


class Index(StrEnum):
    """The ledger's sorted sets of job ids."""

    QUEUED = keys.QUEUED_INDEX  # score: created_at (sent_at after a hand-back or retry)
    RUNNING = keys.RUNNING_INDEX  # score: lease expiry
    DONE = keys.TERMINAL_INDEX  # score: finished_at


@dataclass(frozen=True)
class LedgerConfig:
    retention_s: int = DEFAULT_RETENTION_S
    stream_maxlen: int = DEFAULT_STREAM_MAXLEN
    signer: Signer | None = None  # signs the records ``create`` writes (producer.signing)
    queued_retention_s: int = DEFAULT_QUEUED_RETENTION_S  # a new record's expiry (QUEUED)


@dataclass(frozen=True)
class Ending:
    """How a running job ends: its final status, the fields to set and its terminal event."""

    status: JobStatus
    fields: dict[str, str]
    body: str  # events.event_body, stamped by FINISH
    error: ErrorInfo | None = None

    @classmethod
    def finished(cls, job_id: str, status: JobStatus, reason: FinishReason, usage: Usage,
                 stored: dict[str, str]) -> Ending:
        """Generation ended (``stored``: ``result`` or ``result_uri``)."""
        etype: EventType = "done" if status is JobStatus.SUCCEEDED else "cancelled"
        return cls(status, {"finish_reason": reason, **stored},
                   event_body(job_id, etype, finish_reason=reason, usage=usage))

    @classmethod
    def failed(cls, job_id: str, error: ErrorInfo) -> Ending:
        return cls(JobStatus.FAILED, {"error": error.model_dump_json()},
                   event_body(job_id, "error", error=error), error)


def _now() -> str:
    return repr(time.time())


_decode = fields.decode  # undecodable bytes kept (as lone surrogates) for fields.problems


# -- the record ----------------------------------------------------------------------------

def new_record(job_id: str, request: JobRequest, queue: str, now: float,
               signer: Signer | None = None) -> dict[str, str]:
    """The hash fields of a freshly accepted job (status QUEUED); signed when ``signer``."""
    fields = {"id": job_id, "status": JobStatus.QUEUED.value, "queue": queue,
              "model": request.model or "", "request": request.model_dump_json(),
              "created_at": repr(now), "sent_at": repr(now), "attempts": "0", "fence": "0",
              "tokens": "0"}
    if request.ttl_s is not None:
        fields["deadline_at"] = repr(now + request.ttl_s)
    if signer is not None:
        fields.update(signer.sign_record(job_id, keys.job_key(job_id), queue, fields["request"]))
    return fields


def create(cfg: LedgerConfig, job_id: str, request: JobRequest, queue: str) -> Op[Created]:
    """Write a QUEUED record (and index it); an idempotency hit answers the first job's id, or
    raises IdempotencyConflict when the key's entry holds another request's hash."""
    now = time.time()
    fields = new_record(job_id, request, queue, now, cfg.signer)
    idem = keys.idempotency_key(request.idempotency_key, request.idempotency_scope) \
        if request.idempotency_key else ""
    digest = hashlib.sha256(fields["request"].encode()).hexdigest()
    flat = [item for pair in fields.items() for item in pair]
    (created, found), _expiry = yield Batch((
        Eval(scripts.CREATE, (keys.job_key(job_id), idem, keys.QUEUED_INDEX),
             (job_id, repr(now), cfg.retention_s, digest, *flat)),
        call("EXPIRE", keys.job_key(job_id), cfg.queued_retention_s)), atomic=True)
    first, _, stored = text(found).partition(" ")
    if stored and stored != digest:
        raise IdempotencyConflict(request.idempotency_key or "", first)
    return Created(bool(created), first)


def raw(job_id: str) -> Op[dict[str, str] | None]:
    found = yield call("HGETALL", keys.job_key(job_id))
    return _decode(found) if found else None


def state(job_id: str) -> Op[JobState | None]:
    found = yield from raw(job_id)
    return parse_state(found, job_id) if found else None


def states(ids: list[str]) -> Op[list[JobState]]:
    """The states of these jobs (those still recorded), in one round trip; a record that is
    not a job (``CorruptRecord``) is skipped and logged."""
    if not ids:
        return []
    found = yield Batch(tuple(call("HGETALL", keys.job_key(i)) for i in ids))
    readable = []
    for job_id, item in zip(ids, found, strict=True):
        try:
            readable.extend([parse_state(_decode(item), job_id)] if item else [])
        except CorruptRecord as error:
            log.warning("skipped: %s", error)
    return readable


# -- a job's run (workers) -----------------------------------------------------------------

def claim(cfg: LedgerConfig, job_id: str, worker: str, lease_s: float,
          max_attempts: int) -> Op[Claim]:
    """Take the job (attempt + 1, lease, new fence) or end it (cancelled, past its deadline,
    counters that are not numbers, the attempt cap); one round trip either way."""
    lost = ErrorInfo(code=ErrorCode.WORKER_LOST, message=(
        f"the job was started {max_attempts} times and its worker was lost each time"))
    invalid = ErrorInfo(code=ErrorCode.INVALID_REQUEST, message=(
        "the job record was written around the producer: a counter or time that is not a "
        "number, or a finished job set back to run by hand"))
    reply = yield Eval(scripts.CLAIM, tuple(keys.job_keys(job_id)), (
        job_id, _now(), cfg.retention_s, cfg.stream_maxlen, lease_s, worker, max_attempts,
        event_body(job_id, "cancelled", finish_reason="cancelled"),
        event_body(job_id, "cancelled", finish_reason="deadline"),
        event_body(job_id, "error", error=lost), lost.model_dump_json(),
        event_body(job_id, "error", error=invalid), invalid.model_dump_json()))
    return Claim.parse(reply, keys.job_key(job_id))


def heartbeat(job_id: str, fence: int, lease_s: float) -> Op[Heartbeat]:
    """Extend the lease of a job we hold."""
    reply = yield Eval(scripts.HEARTBEAT, tuple(keys.job_keys(job_id)),
                       (job_id, fence, _now(), lease_s))
    return Heartbeat(int(reply))


Row = tuple[str, int, int, str, int]  # job id, fence, seq, event JSON or '', tokens


def append(cfg: LedgerConfig, rows: list[Row]) -> Op[list[Append]]:
    """Append and publish each row's event (none: a cancel check) in ONE round trip. Safe to
    send again: an event whose seq is already in the stream is skipped."""
    if not rows:
        return []
    replies = yield Batch(tuple(
        Eval(scripts.APPEND, tuple(keys.job_keys(job_id)),
             (fence, seq, data, cfg.stream_maxlen, tokens))
        for job_id, fence, seq, data, tokens in rows))
    return [Append(int(reply)) for reply in replies]


def finish(cfg: LedgerConfig, job_id: str, fence: int, ending: Ending,
           next_seq: int | None = None) -> Op[Commit]:
    """Move a RUNNING job we hold to its final status and emit its terminal event; with
    ``next_seq``, only if the stream holds every event before it (else ``Commit.BEHIND``)."""
    flat = [item for pair in ending.fields.items() for item in pair]
    reply = yield Eval(scripts.FINISH, tuple(keys.job_keys(job_id)), (
        job_id, _now(), cfg.retention_s, cfg.stream_maxlen, fence, ending.status.value,
        ending.body, "" if next_seq is None else next_seq, *flat))
    return Commit(int(reply))


def release(job_id: str, fence: int) -> Op[Commit]:
    """Hand a RUNNING job back to QUEUED (not a failed attempt), if the fence still holds."""
    reply = yield Eval(scripts.RELEASE, tuple(keys.job_keys(job_id)), (job_id, _now(), fence))
    return Commit(int(reply))


# -- producers -------------------------------------------------------------------------------

def cancel(cfg: LedgerConfig, job_id: str, queued_only: bool = False) -> Op[Cancel]:
    """Cancel a job; ``queued_only`` leaves a RUNNING job running."""
    reply = yield Eval(scripts.CANCEL, tuple(keys.job_keys(job_id)), (
        job_id, _now(), cfg.retention_s, cfg.stream_maxlen, "1" if queued_only else "0",
        event_body(job_id, "cancelled", finish_reason="cancelled")))
    return Cancel.parse(reply)


def retry(job_id: str) -> Op[Retry]:
    """A FAILED or EXPIRED job back to QUEUED, same id (the caller sends its task again)."""
    reply = yield Eval(scripts.RETRY, tuple(keys.job_keys(job_id)), (job_id, _now()))
    return Retry.parse(reply)


def read_stream(job_id: str, last_id: Any, after: int | None, block_ms: int,
                count: int) -> Op[StreamRead]:
    """One blocking read of the job's stream from ``last_id``."""
    found = yield call("XREAD", "COUNT", count, "BLOCK", max(1, block_ms), "STREAMS",
                       keys.stream_key(job_id), last_id)
    return new_events(found, last_id, after, job_id)


def events(job_id: str) -> Op[list[StreamEvent]]:
    """Every event in the job's stream now (no waiting)."""
    found = yield call("XRANGE", keys.stream_key(job_id), "-", "+")
    return [event for _entry_id, fields in found
            if (event := job_event(fields, job_id)) is not None]


# -- indexes (admin views, the reconciler) ---------------------------------------------------

def index_ids(index: Index, start: int, count: int, newest_first: bool = False) -> Op[list[str]]:
    found = yield call("ZREVRANGE" if newest_first else "ZRANGE", index.value, start,
                       start + count - 1)
    return [text(i) for i in found]


def index_size(index: Index) -> Op[int]:
    return int((yield call("ZCARD", index.value)))


def _score_pairs(found: Any) -> list[tuple[str, float]]:
    """(member, score) pairs of a WITHSCORES reply, flat (RESP2) or paired (RESP3)."""
    flat = [x for p in found for x in p] if found and isinstance(found[0], list | tuple) \
        else list(found or [])
    return [(text(flat[i]), float(flat[i + 1])) for i in range(0, len(flat), 2)]


def oldest(index: Index) -> Op[tuple[str, float] | None]:
    pairs = _score_pairs((yield call("ZRANGE", index.value, 0, 0, "WITHSCORES")))
    return pairs[0] if pairs else None


def due(index: Index, until: float) -> Op[list[str]]:
    """Ids whose score is at most ``until`` (leases run out, jobs queued before)."""
    found = yield call("ZRANGEBYSCORE", index.value, "-inf", repr(until))
    return [text(i) for i in found]


def unindex(index: Index, job_id: str) -> Op[None]:
    yield call("ZREM", index.value, job_id)


def statuses(ids: list[str]) -> Op[list[str]]:
    """Each job's status ('' when it has none), in one round trip."""
    if not ids:
        return []
    found = yield Batch(tuple(call("HGET", keys.job_key(i), "status") for i in ids))
    return [text(s) if s else "" for s in found]


def expire_queued(cfg: LedgerConfig, job_id: str) -> Op[bool]:
    """End a QUEUED job past its deadline as EXPIRED (terminal event, nothing fetched);
    False when it is not QUEUED or not past its deadline."""
    reply = yield Eval(scripts.EXPIRE_QUEUED, tuple(keys.job_keys(job_id)), (
        job_id, _now(), cfg.retention_s, cfg.stream_maxlen,
        event_body(job_id, "cancelled", finish_reason="deadline")))
    return bool(reply)


def mark_sent(job_id: str, now: float) -> Op[None]:
    """Its task message was (re-)sent now."""
    yield call("HSET", keys.job_key(job_id), "sent_at", repr(now))


def queued_per_queue() -> Op[dict[str, int]]:
    """How many QUEUED jobs the ledger records for each queue."""
    ids = yield from index_ids(Index.QUEUED, 0, 0)  # ZRANGE 0 -1: all of them
    if not ids:
        return {}
    found = yield Batch(tuple(call("HMGET", keys.job_key(i), "status", "queue") for i in ids))
    counts: dict[str, int] = {}
    for status, queue in found:
        if status == b"QUEUED" or status == "QUEUED":
            name = text(queue) if queue else keys.DEFAULT_QUEUE
            counts[name] = counts.get(name, 0) + 1
    return counts


def queue_backlog(limit: int = 10_000) -> Op[dict[str, tuple[int, float]]]:
    """Per queue: its count among the ``limit`` oldest QUEUED jobs, and its oldest created_at."""
    found = yield call("ZRANGE", Index.QUEUED.value, 0, limit - 1, "WITHSCORES")
    pairs = _score_pairs(found)
    if not pairs:
        return {}
    queues = yield Batch(tuple(call("HGET", keys.job_key(i), "queue") for i, _ in pairs))
    backlog: dict[str, tuple[int, float]] = {}
    for (_job_id, created), queue in zip(pairs, queues, strict=True):
        name = text(queue) if queue else keys.DEFAULT_QUEUE
        count, first = backlog.get(name, (0, created))
        backlog[name] = (count + 1, min(first, created))
    return backlog
