"""The Celery task: decode -> claim -> hand to the engine -> commit. Nothing else.

This is also the one place that maps exceptions to job outcomes: a JobError keeps its code,
anything else becomes INTERNAL; either way the job ends FAILED and the worker keeps serving.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery
from pydantic import ValidationError

from producer import keys
from producer.jobs import Ledger
from producer.schema import ErrorCode, ErrorInfo, JobRequest, JobResult, JobStatus, Limits
from worker.engine.static import Engine
from worker.engine.work import Outcome, Work
from worker.errors import InvalidRequest, JobError, ResultStoreFailed
from worker.ops.quarantine import Quarantine
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from worker.ops.metrics import Metrics
    from worker.results import ResultStore

log = logging.getLogger("vlmq.tasks")
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_STATUS_BY_REASON = {"stop": JobStatus.SUCCEEDED, "length": JobStatus.SUCCEEDED,
                     "cancelled": JobStatus.CANCELLED, "deadline": JobStatus.EXPIRED}
# claim outcomes that end the job: (final status, error code, why)
_ENDED_AT_CLAIM = {"cancelled": ("CANCELLED", None, "cancel asked before it ran"),
                   "expired": ("EXPIRED", None, "picked up past its deadline"),
                   "exhausted": ("FAILED", "WORKER_LOST", "its workers were lost too often")}


@dataclass
class Runtime:
    """What a task needs, built once by the worker CLI and handed to ``register``."""

    settings: WorkerSettings
    ledger: Ledger
    engine: Engine
    worker_id: str
    active: dict[str, Work] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    quarantine: Quarantine = field(default_factory=Quarantine)
    results: ResultStore | None = None  # None: every result stays in Redis
    metrics: Metrics | None = None

    resend: Callable[[str, str], None] | None = None  # (job_id, queue): send the task again
    # signing on: raises InvalidRequest for a record no trusted producer signed (worker.security)
    check_record: Callable[[dict[str, str]], None] | None = None

    def drain(self) -> None:
        """Shutting down: stop every job in hand at its next step and hand it back."""
        with self.lock:
            works = list(self.active.values())
        for work in works:
            work.handback = True
            work.cancel.set()

    def heartbeat_once(self) -> None:
        """Renew the lease of every job in hand; pass on cancel requests and lost ownership."""
        with self.lock:
            works = list(self.active.values())
        for work in works:
            answer = self.ledger.heartbeat(work.job_id, work.fence, self.settings.lease_s)
            if answer != 0:
                work.cancel.set()


def register(app: Celery, runtime: Runtime) -> None:
    @app.task(name=keys.TASK_GENERATE, ignore_result=True)
    def generate(*args: Any, **kwargs: Any) -> str:
        return run_job(runtime, args, kwargs)


def run_job(rt: Runtime, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    if kwargs or len(args) != 1 or not isinstance(args[0], str) or not _JOB_ID.match(args[0]):
        log.warning("dropped a malformed task message: args=%.200r kwargs=%.200r", args, kwargs)
        return "malformed"
    job_id = args[0]
    status, attempts, fence = rt.ledger.redis.hmget(keys.job_key(job_id), "status", "attempts",
                                                    "fence")
    if status not in (b"QUEUED", b"RUNNING"):  # missing or finished (a duplicate): a no-op
        return _run_claimed(rt, job_id)  # claim, which need not wait for the quarantine
    # a record written around the producer: counters that are not numbers are reset so that
    # the job can be claimed and failed with a clear error, not looped over by the reconciler
    broken = [name for name, value in (("attempts", attempts), ("fence", fence))
              if value is not None and not value.isdigit()]
    if broken:
        rt.ledger.redis.hset(keys.job_key(job_id), mapping=dict.fromkeys(broken, "0"))
        return _run_claimed(rt, job_id, f"the job record's {' and '.join(broken)} "
                                        "is not a number (written around the producer?)")
    with rt.quarantine.hold(alone=int(attempts or 0) > 0):
        return _run_claimed(rt, job_id)


def _run_claimed(rt: Runtime, job_id: str, invalid: str | None = None) -> str:
    settings = rt.settings
    claim = rt.ledger.claim(job_id, rt.worker_id, settings.lease_s, settings.max_attempts)
    if claim.outcome != "claimed":
        if claim.outcome in _ENDED_AT_CLAIM:
            status, code, why = _ENDED_AT_CLAIM[claim.outcome]
            log.info("job %s %s: %s", job_id, status, why,
                     extra={"job_id": job_id, "status": status, "code": code})
            if rt.metrics:
                rt.metrics.job_ended(status, code)
        else:
            log.info("job %s not run: %s", job_id, claim.outcome, extra={"job_id": job_id})
        return claim.outcome
    log.info("job %s RUNNING fence=%d", job_id, claim.fence,
             extra={"job_id": job_id, "status": "RUNNING", "fence": claim.fence})
    work: Work | None = None
    try:
        if invalid:
            raise InvalidRequest(invalid)
        raw = rt.ledger.raw(job_id) or {}
        if rt.check_record is not None:
            rt.check_record(raw)
        request = _decode_request(raw.get("request"), settings)
        sent, seq = rt.ledger.stream_so_far(job_id)
        work = Work(job_id=job_id, fence=claim.fence, request=request,
                    created_at=float(raw.get("created_at") or 0),
                    deadline=float(raw.get("deadline_at") or "inf"),
                    already_sent=sent, next_seq=seq)
        with rt.lock:
            rt.active[job_id] = work
        outcome = rt.engine.submit(work).result()
        if work.handback:
            return _hand_back(rt, job_id, claim.fence, raw.get("queue") or keys.DEFAULT_QUEUE)
        return _commit(rt, job_id, claim.fence, outcome, work)
    except JobError as error:
        return _fail(rt, job_id, claim.fence, error.info())
    except redis.RedisError as error:  # the ledger is out of reach: not the job's fault
        log.warning("job %s: Redis error (%s); left to its lease and the reconciler", job_id,
                    error)
        return "ledger unreachable"
    except Exception as error:
        log.exception("job %s failed unexpectedly", job_id)
        info = ErrorInfo(code=ErrorCode.INTERNAL, message=f"{type(error).__name__}: {error}")
        return _fail(rt, job_id, claim.fence, info)
    finally:
        with rt.lock:
            rt.active.pop(job_id, None)


def _decode_request(body: str | None, settings: WorkerSettings) -> JobRequest:
    if not body:
        raise InvalidRequest("the job record has no request")
    limits = Limits(max_new_tokens=settings.max_new_tokens_cap)
    try:
        return JobRequest.model_validate_json(body, context={"limits": limits})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise InvalidRequest(f"invalid job request: {problems[:1000]}") from None


def _commit(rt: Runtime, job_id: str, fence: int, outcome: Outcome,
            work: Work | None = None) -> str:
    status = _STATUS_BY_REASON[outcome.finish_reason]
    result = JobResult(job_id=job_id, text=outcome.text, finish_reason=outcome.finish_reason,
                       usage=outcome.usage, timings=outcome.timings,
                       model=rt.settings.served_model(), worker=rt.worker_id)
    event_type = "done" if status == JobStatus.SUCCEEDED else "cancelled"
    extra = {"finish_reason": outcome.finish_reason, "usage": outcome.usage.model_dump()}
    fields: dict[str, str] = {"finish_reason": outcome.finish_reason}
    body = result.model_dump_json()
    store = work.request.result_store if work is not None else "redis"
    if rt.results is not None and rt.results.where(store, len(body.encode())) == "s3":
        fields["result_uri"] = rt.results.put(job_id, body.encode())  # or ResultStoreFailed
    elif store == "s3":
        raise ResultStoreFailed("the request asked for an S3 result; this worker has no result "
                                "store", retryable=False)
    else:
        fields["result"] = body
    if not rt.ledger.finish(job_id, fence, status, event_type, extra, fields):
        log.warning("job %s: commit refused (fence %d is stale)", job_id, fence,
                    extra={"job_id": job_id})
        return "stale"
    log.info("job %s %s finish_reason=%s tokens=%d total_ms=%.1f%s", job_id, status.value,
             outcome.finish_reason, outcome.usage.completion_tokens, outcome.timings.total_ms,
             f" result_uri={fields['result_uri']}" if "result_uri" in fields else "",
             extra={"job_id": job_id, "status": status.value})
    if rt.metrics is not None:
        rt.metrics.job_ended(status.value)
        if work is not None:
            with rt.lock:
                peers = list(rt.active.values())
            rt.metrics.job_finished(work, outcome, peers, rt.ledger.redis)
    return status.value


def _fail(rt: Runtime, job_id: str, fence: int, info: ErrorInfo) -> str:
    extra = {"error": info.model_dump(mode="json")}
    if not rt.ledger.finish(job_id, fence, JobStatus.FAILED, "error", extra,
                            {"error": info.model_dump_json()}):
        log.warning("job %s: failure commit refused (fence %d is stale)", job_id, fence,
                    extra={"job_id": job_id})
        return "stale"
    log.info("job %s FAILED %s: %s", job_id, info.code.value, info.message,
             extra={"job_id": job_id, "status": "FAILED", "code": info.code.value})
    if rt.metrics is not None:
        rt.metrics.job_ended(JobStatus.FAILED.value, info.code.value)
    return JobStatus.FAILED.value


def _hand_back(rt: Runtime, job_id: str, fence: int, queue: str) -> str:
    """The worker is stopping: return the job to QUEUED and send its task again at once."""
    if not rt.ledger.release(job_id, fence):
        log.warning("job %s: hand-back refused (fence %d is stale)", job_id, fence)
        return "stale"
    if rt.resend is not None:
        rt.resend(job_id, queue)
    log.info("job %s handed back (worker stopping)", job_id, extra={"job_id": job_id})
    return "handed back"
