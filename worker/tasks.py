"""The Celery task: decode the message -> claim -> hand to the engine -> commit.

The claim is one Redis round trip and answers everything the engine needs (the record, the
fence, where the stream goes on); ``worker.results.place`` decides where the result goes; the
Ledger commits it only if the fence still holds. This is also the one place that maps
exceptions to job outcomes: a JobError keeps its code, anything else becomes INTERNAL; either
way the job ends FAILED and the worker keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery
from pydantic import ValidationError

from producer import keys
from producer.jobs import Ending, Ledger
from producer.replies import Claim, ClaimOutcome, Commit, Heartbeat
from producer.schema import ErrorCode, ErrorInfo, JobRequest, JobResult, JobStatus, Limits
from worker import security
from worker.engine import repair
from worker.engine.static import Engine
from worker.engine.work import Outcome, Work
from worker.errors import InvalidRequest, JobError
from worker.ops.quarantine import Quarantine
from worker.results import place
from worker.settings import WorkerSettings
from worker.threads import name_os_thread

if TYPE_CHECKING:
    from worker.ops.metrics import Metrics
    from worker.results import ResultStore

log = logging.getLogger("vlmq.tasks")
_STATUS_BY_REASON = {"stop": JobStatus.SUCCEEDED, "length": JobStatus.SUCCEEDED,
                     "cancelled": JobStatus.CANCELLED, "deadline": JobStatus.EXPIRED}
# claims that ended the job: error code, and why (for the log)
_ENDED_AT_CLAIM = {ClaimOutcome.CANCELLED: (None, "cancel asked before it ran"),
                   ClaimOutcome.EXPIRED: (None, "picked up past its deadline"),
                   ClaimOutcome.EXHAUSTED: ("WORKER_LOST", "its workers were lost too often"),
                   ClaimOutcome.INVALID: ("INVALID_REQUEST", "its counters were not numbers")}
# what a task answers: the status it left the job in, the claim's outcome when the job did not
# run here, or None when it decided nothing (a malformed message, a stale fence, Redis away)
TaskOutcome = JobStatus | ClaimOutcome | None


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
    check_record: Callable[[str, str, dict[str, str]], None] | None = None  # id, key, record
    # set by ``drain``: no more claims here; a message that still arrives is passed on
    stopping: threading.Event = field(default_factory=threading.Event)

    def drain(self) -> None:
        """Shutting down: stop every job in hand at its next step and hand it back; claim
        nothing more (the job a hand-back re-sends must go to another worker)."""
        self.stopping.set()
        with self.lock:
            works = list(self.active.values())
        for work in works:
            work.handback = True
            work.cancel.set()

    def track(self, work: Work) -> None:
        """A job in hand (``drain`` reaches it); handed back at once if draining began."""
        with self.lock:
            self.active[work.job_id] = work
        if self.stopping.is_set():
            work.handback = True
            work.cancel.set()

    def heartbeat_once(self) -> None:
        """Renew the lease of every job in hand; pass on cancel requests and lost ownership."""
        with self.lock:
            works = list(self.active.values())
        for work in works:
            answer = self.ledger.heartbeat(work.job_id, work.fence, self.settings.lease_s)
            if answer is not Heartbeat.HELD:
                work.cancel.set()

    def claim(self, job_id: str) -> Claim:
        return self.ledger.claim(job_id, self.worker_id, self.settings.lease_s,
                                 self.settings.max_attempts)


def register(app: Celery, runtime: Runtime) -> None:
    refused = runtime.metrics.refused_message if runtime.metrics is not None else None

    @app.task(name=keys.TASK_GENERATE, ignore_result=True, bind=True)
    def generate(self: Any, *args: Any, **kwargs: Any) -> None:
        name_os_thread("vlmq-task")  # Celery's pool thread, for top -H and the like (once)
        security.check(self.request, args, kwargs, refused)  # or Reject: dropped, no callbacks
        run_job(runtime, args, kwargs)


def run_job(rt: Runtime, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TaskOutcome:
    if kwargs or len(args) != 1 or not isinstance(args[0], str) or not keys.JOB_ID.match(args[0]):
        log.warning("dropped a malformed task message: args=%.200r kwargs=%.200r", args, kwargs)
        return None
    job_id = args[0]
    if rt.stopping.is_set():
        return _pass_on(rt, job_id)
    claim = rt.claim(job_id)
    if claim.outcome is not ClaimOutcome.CLAIMED:
        return _not_run(rt, job_id, claim.outcome)
    alone = claim.attempt > 1  # an earlier attempt was lost with its worker
    if rt.quarantine.enter(alone):
        try:
            return _run(rt, job_id, claim)
        finally:
            rt.quarantine.leave(alone)
    # a job must run alone first: wait without holding the claim (and its attempt)
    if not rt.ledger.release(job_id, claim.fence):
        return None
    with rt.quarantine.hold(alone):
        if rt.stopping.is_set():
            return _pass_on(rt, job_id)
        claim = rt.claim(job_id)
        if claim.outcome is not ClaimOutcome.CLAIMED:
            return _not_run(rt, job_id, claim.outcome)
        return _run(rt, job_id, claim)


def _pass_on(rt: Runtime, job_id: str) -> TaskOutcome:
    """The worker is stopping: leave the job unclaimed and send its task again for another
    worker (this one consumes nothing more once Celery's consumer has stopped)."""
    record = rt.ledger.raw(job_id) or {}
    if record.get("status") == JobStatus.QUEUED.value and rt.resend is not None:
        rt.resend(job_id, record.get("queue") or keys.DEFAULT_QUEUE)
    log.info("job %s not run: worker stopping; sent again for another worker", job_id,
             extra={"job_id": job_id})
    return None


def _not_run(rt: Runtime, job_id: str, outcome: ClaimOutcome) -> ClaimOutcome:
    status = outcome.ended_here
    if status is None:
        log.info("job %s not run: %s", job_id, outcome.value, extra={"job_id": job_id})
        return outcome
    code, why = _ENDED_AT_CLAIM[outcome]
    log.info("job %s %s: %s", job_id, status.value, why,
             extra={"job_id": job_id, "status": status.value, "code": code})
    if rt.metrics:
        rt.metrics.job_ended(status.value, code)
    return outcome


def _run(rt: Runtime, job_id: str, claim: Claim) -> TaskOutcome:
    log.info("job %s RUNNING fence=%d", job_id, claim.fence,
             extra={"job_id": job_id, "status": "RUNNING", "fence": claim.fence})
    try:
        if claim.problems:  # a record written around the producer (producer.fields)
            raise InvalidRequest("the job record is unreadable: " + "; ".join(claim.problems))
        if rt.check_record is not None:
            rt.check_record(job_id, claim.key, claim.record)
        work = Work(job_id=job_id, fence=claim.fence,
                    request=_decode_request(claim.request, rt.settings),
                    created_at=claim.created_at, deadline=claim.deadline,
                    already_sent=claim.sent, next_seq=claim.next_seq, attempt=claim.attempt)
        params = work.request.params
        if claim.sent and params.do_sample and params.seed is None:
            work.restart()  # cannot repeat the text already streamed: start it over
        rt.track(work)
        outcome = rt.engine.submit(work).result()
        if work.handback:
            return _hand_back(rt, job_id, claim.fence, claim.queue or keys.DEFAULT_QUEUE)
        return _commit(rt, work, outcome)
    except JobError as error:
        return _end(rt, job_id, claim.fence, Ending.failed(job_id, error.info()))
    except redis.RedisError as error:  # the ledger is out of reach: not the job's fault
        log.warning("job %s: Redis error (%s); left to its lease and the reconciler", job_id,
                    error)
        return None
    except Exception as error:
        log.exception("job %s failed unexpectedly", job_id)
        info = ErrorInfo(code=ErrorCode.INTERNAL, message=f"{type(error).__name__}: {error}")
        return _end(rt, job_id, claim.fence, Ending.failed(job_id, info))
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


def _commit(rt: Runtime, work: Work, outcome: Outcome) -> TaskOutcome:
    status = _STATUS_BY_REASON[outcome.finish_reason]
    result = JobResult(job_id=work.job_id, text=outcome.text,
                       finish_reason=outcome.finish_reason, usage=outcome.usage,
                       timings=outcome.timings, model=rt.settings.served_model(),
                       worker=rt.worker_id)
    stored = place(rt.results, work.job_id, result.model_dump_json(),
                   work.request.result_store)  # or ResultStoreFailed
    ending = Ending.finished(work.job_id, status, outcome.finish_reason, outcome.usage, stored)
    where = f" result_uri={stored['result_uri']}" if "result_uri" in stored else ""
    ended = _end(rt, work.job_id, work.fence, ending,
                 f"finish_reason={outcome.finish_reason} tokens="
                 f"{outcome.usage.completion_tokens} total_ms={outcome.timings.total_ms:.1f}"
                 f"{where}", work)
    if ended is not None and rt.metrics is not None:
        rt.metrics.job_finished(work, outcome)
    return ended


def _finish(rt: Runtime, job_id: str, fence: int, ending: Ending, work: Work | None) -> bool:
    """FINISH; with ``work``, only once its stream holds every event it sent (a stream that
    lost entries gets them again first: ``worker.engine.repair``)."""
    for _ in range(repair.MAX_TRIES):
        answer = rt.ledger.finish(job_id, fence, ending,
                                  None if work is None else work.next_seq)
        if answer is not Commit.BEHIND or work is None:
            return answer is Commit.DONE
        repair.repair(rt.ledger, work, work.next_seq - 1)
    return bool(rt.ledger.finish(job_id, fence, ending))  # end it anyway: seqs stay gapless


def _end(rt: Runtime, job_id: str, fence: int, ending: Ending,
         detail: str = "", work: Work | None = None) -> JobStatus | None:
    """Commit the job's end if the fence holds; log and count it."""
    if not _finish(rt, job_id, fence, ending, work):
        log.warning("job %s: commit refused (fence %d is stale)", job_id, fence,
                    extra={"job_id": job_id})
        return None
    status = ending.status.value
    code = None
    if ending.error is not None:
        code, detail = ending.error.code.value, f"{ending.error.code.value}: {ending.error.message}"
    log.info("job %s %s %s", job_id, status, detail,
             extra={"job_id": job_id, "status": status, "code": code})
    if rt.metrics is not None:
        rt.metrics.job_ended(status, code)
    return ending.status


def _hand_back(rt: Runtime, job_id: str, fence: int, queue: str) -> TaskOutcome:
    """The worker is stopping: return the job to QUEUED and send its task again at once."""
    if not rt.ledger.release(job_id, fence):
        log.warning("job %s: hand-back refused (fence %d is stale)", job_id, fence)
        return None
    if rt.resend is not None:
        rt.resend(job_id, queue)
    log.info("job %s handed back (worker stopping)", job_id, extra={"job_id": job_id})
    return JobStatus.QUEUED
