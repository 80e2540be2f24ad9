"""The Celery task: decode -> claim -> hand to the engine -> commit. Nothing else.

This is also the one place that maps exceptions to job outcomes: a JobError keeps its code,
anything else becomes INTERNAL; either way the job ends FAILED and the worker keeps serving.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from pydantic import ValidationError

from producer import keys
from producer.jobs import Ledger
from producer.schema import ErrorCode, ErrorInfo, JobRequest, JobResult, JobStatus, Limits
from worker.engine import Engine
from worker.errors import InvalidRequest, JobError
from worker.settings import WorkerSettings
from worker.work import Outcome, Work

log = logging.getLogger("vlmq.tasks")
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_STATUS_BY_REASON = {"stop": JobStatus.SUCCEEDED, "length": JobStatus.SUCCEEDED,
                     "cancelled": JobStatus.CANCELLED, "deadline": JobStatus.EXPIRED}


@dataclass
class Runtime:
    """What a task needs, built once by the worker CLI and handed to ``register``."""

    settings: WorkerSettings
    ledger: Ledger
    engine: Engine
    worker_id: str
    active: dict[str, Work] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

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
    settings = rt.settings
    claim = rt.ledger.claim(job_id, rt.worker_id, settings.lease_s, settings.max_attempts)
    if claim.outcome != "claimed":
        log.info("job %s not run: %s", job_id, claim.outcome)
        return claim.outcome
    log.info("job %s RUNNING attempt fence=%d", job_id, claim.fence)
    work: Work | None = None
    try:
        raw = rt.ledger.raw(job_id) or {}
        request = _decode_request(raw.get("request"), settings)
        sent, seq = rt.ledger.stream_so_far(job_id)
        work = Work(job_id=job_id, fence=claim.fence, request=request,
                    created_at=float(raw.get("created_at") or 0),
                    deadline=float(raw.get("deadline_at") or "inf"),
                    already_sent=sent, next_seq=seq)
        with rt.lock:
            rt.active[job_id] = work
        outcome = rt.engine.submit(work).result()
        return _commit(rt, job_id, claim.fence, outcome)
    except JobError as error:
        return _fail(rt, job_id, claim.fence, error.info())
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


def _commit(rt: Runtime, job_id: str, fence: int, outcome: Outcome) -> str:
    status = _STATUS_BY_REASON[outcome.finish_reason]
    result = JobResult(job_id=job_id, text=outcome.text, finish_reason=outcome.finish_reason,
                       usage=outcome.usage, timings=outcome.timings,
                       model=rt.settings.served_model(), worker=rt.worker_id)
    event_type = "done" if status == JobStatus.SUCCEEDED else "cancelled"
    extra = {"finish_reason": outcome.finish_reason, "usage": outcome.usage.model_dump()}
    fields = {"result": result.model_dump_json(), "finish_reason": outcome.finish_reason}
    if not rt.ledger.finish(job_id, fence, status, event_type, extra, fields):
        log.warning("job %s: commit refused (fence %d is stale)", job_id, fence)
        return "stale"
    log.info("job %s %s finish_reason=%s tokens=%d total_ms=%.1f", job_id, status.value,
             outcome.finish_reason, outcome.usage.completion_tokens, outcome.timings.total_ms)
    return status.value


def _fail(rt: Runtime, job_id: str, fence: int, info: ErrorInfo) -> str:
    extra = {"error": info.model_dump(mode="json")}
    if not rt.ledger.finish(job_id, fence, JobStatus.FAILED, "error", extra,
                            {"error": info.model_dump_json()}):
        log.warning("job %s: failure commit refused (fence %d is stale)", job_id, fence)
        return "stale"
    log.info("job %s FAILED %s: %s", job_id, info.code.value, info.message)
    return JobStatus.FAILED.value
