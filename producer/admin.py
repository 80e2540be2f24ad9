"""Operator views and actions (``vlmq stats|jobs|retry|purge``), as operations both producers run.

- ``stats()``: queue depth per known queue (``vlmq``, ``vlmq.*`` broker lists and the queues live
  workers report), the oldest queued job and its age, job counts by status, live workers.
- ``jobs(status, limit)``: job states from the indexes, newest first for finished ones.
- ``retry(id)``: a FAILED or EXPIRED job back to QUEUED with the same id (atomic), then its task
  is sent again.
- ``purge(queue)``: deletes the queue's waiting messages and cancels every job they carried plus
  every QUEUED job recorded for that queue; the records stay (CANCELLED, kept for the retention
  period like any finished job). RUNNING jobs are not touched.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator
from typing import Any

from producer import durability, keys, records
from producer.broker import Broker
from producer.errors import JobNotFound, NotAllowed
from producer.records import Index, LedgerConfig
from producer.replies import CancelOutcome, RetryOutcome, text
from producer.schema import JobState, JobStatus
from producer.steps import Blocking, Op, call

_CHUNK = 500


def known(job_id: str) -> str:
    """``job_id`` if it has the job id syntax (``keys.JOB_ID``); JobNotFound before Redis is
    asked otherwise (no such job can exist)."""
    if not isinstance(job_id, str) or not keys.JOB_ID.match(job_id):
        raise JobNotFound(job_id)
    return job_id


class AdminCore:
    def __init__(self, ledger: LedgerConfig, broker: Broker) -> None:
        self.ledger = ledger
        self.broker = broker

    def status(self, job_id: str) -> Op[JobState]:
        state = yield from records.state(known(job_id))
        if state is None:
            raise JobNotFound(job_id)
        return state

    def enqueue(self, job_id: str, queue: str = keys.DEFAULT_QUEUE) -> Op[None]:
        """Send the task message for an existing record (also used to re-send a lost one)."""
        yield Blocking(functools.partial(self.broker.send, job_id, queue))

    # -- views -----------------------------------------------------------------------------

    def queue_depth(self, queue: str) -> Op[int | None]:
        """Messages waiting in ``queue`` (None when the broker cannot say)."""
        found = yield Blocking(functools.partial(self.broker.depth, queue))
        return found  # type: ignore[no-any-return]

    def workers(self) -> Op[list[dict[str, Any]]]:
        """Live workers' last health reports (``vlmq:worker:*``, kept for three beats)."""
        names: set[str] = set()
        cursor = 0
        while True:
            cursor, found = yield call("SCAN", cursor, "MATCH", keys.WORKER_PATTERN, "COUNT", 500)
            names.update(text(name) for name in found)
            if not int(cursor):
                break
        reports = []
        for raw in (yield call("MGET", *sorted(names))) if names else []:
            if not raw:
                continue
            try:
                reports.append(json.loads(raw))
            except ValueError:
                continue
        return reports

    def queue_names(self) -> Op[list[str]]:
        names = {keys.DEFAULT_QUEUE}
        names.update((yield Blocking(self.broker.queue_names)))
        for worker in (yield from self.workers()):
            names.update(str(q) for q in worker.get("queues", []))
        return sorted(names)

    def _pages(self, index: Index, newest_first: bool) -> Iterator[Op[list[str]]]:
        start = 0
        while True:
            yield records.index_ids(index, start, _CHUNK, newest_first)
            start += _CHUNK

    def jobs(self, status: JobStatus | str | None = None, limit: int = 50) -> Op[list[JobState]]:
        """Jobs with ``status`` (any when None): queued and running ones oldest first, finished
        ones newest first; at most ``limit``."""
        wanted = JobStatus(status) if status else None
        sources = [(Index.QUEUED, False), (Index.RUNNING, False), (Index.DONE, True)]
        if wanted == JobStatus.QUEUED:
            sources = sources[:1]
        elif wanted == JobStatus.RUNNING:
            sources = sources[1:2]
        elif wanted is not None:
            sources = sources[2:]
        found: list[JobState] = []
        seen: set[str] = set()
        for index, newest_first in sources:
            for page in self._pages(index, newest_first):
                ids = yield from page
                if not ids:
                    break
                for state in (yield from records.states([i for i in ids if i not in seen])):
                    seen.add(state.job_id)
                    if wanted is None or state.status == wanted:
                        found.append(state)
                        if len(found) >= limit:
                            return found
        return found

    def stats(self) -> Op[dict[str, Any]]:
        """Queue depths, the oldest queued job, job counts by status, live workers."""
        now = time.time()
        counts = {status.value: 0 for status in JobStatus}
        counts[JobStatus.QUEUED.value] = yield from records.index_size(Index.QUEUED)
        counts[JobStatus.RUNNING.value] = yield from records.index_size(Index.RUNNING)
        for page in self._pages(Index.DONE, newest_first=False):
            ids = yield from page
            if not ids:
                break
            for status in (yield from records.statuses(ids)):
                if status in counts and JobStatus(status).terminal:
                    counts[status] += 1
        first = yield from records.oldest(Index.QUEUED)
        oldest = None if first is None else {
            "job_id": first[0], "age_s": round(max(0.0, now - first[1]), 3)}
        workers = [{"worker": w.get("worker"), "model": w.get("model"),
                    "queues": w.get("queues"), "consuming": w.get("consuming"),
                    "age_s": round(now - float(w.get("ts", now)), 3)}
                   for w in (yield from self.workers())]
        queues = {}
        for name in (yield from self.queue_names()):
            queues[name] = yield from self.queue_depth(name)
        ledger = yield from durability.read()  # an evicting Redis loses records silently
        return {"queues": queues, "oldest_queued": oldest, "jobs": counts, "workers": workers,
                "redis": ledger.as_dict()}

    def backlog(self) -> Op[dict[str, dict[str, Any]]]:
        """Per queue (one per model): broker ``depth`` (None when it cannot say), the QUEUED
        jobs the ledger records (``queued``) and the age of the oldest (``oldest_age_s``)."""
        now = time.time()
        recorded = yield from records.queue_backlog()
        names = sorted(set((yield from self.queue_names())) | set(recorded))
        found: dict[str, dict[str, Any]] = {}
        for name in names:
            count, first = recorded.get(name, (0, now))
            found[name] = {"depth": (yield from self.queue_depth(name)), "queued": count,
                           "oldest_age_s": round(max(0.0, now - first), 3)}
        return found

    # -- actions ---------------------------------------------------------------------------

    def retry(self, job_id: str) -> Op[JobState]:
        """Run a FAILED or EXPIRED job again under the same id (attempts from 0, attempt history
        kept). Raises JobNotFound, or NotAllowed for a job in any other status."""
        answer = yield from records.retry(known(job_id))
        if answer.outcome is RetryOutcome.MISSING:
            raise JobNotFound(job_id)
        if answer.outcome is not RetryOutcome.QUEUED:
            raise NotAllowed(f"job {job_id} is {answer.status}: only FAILED or EXPIRED jobs "
                             "can be retried")
        state = yield from self.status(job_id)
        yield from self.enqueue(job_id, state.queue)
        return state

    def purge(self, queue: str) -> Op[dict[str, Any]]:
        """Delete the messages waiting in ``queue`` and cancel their jobs and every other
        QUEUED job recorded for that queue. Returns counts and the cancelled ids."""
        deleted, carried = yield Blocking(functools.partial(self.broker.purge, queue))
        candidates = set(carried)
        for page in self._pages(Index.QUEUED, newest_first=False):
            ids = yield from page
            if not ids:
                break
            candidates.update(s.job_id for s in (yield from records.states(ids))
                              if s.queue == queue)
        cancelled = []
        for job_id in sorted(candidates):
            answer = yield from records.cancel(self.ledger, job_id, queued_only=True)
            if answer.outcome is CancelOutcome.CANCELLED:
                cancelled.append(job_id)
        return {"queue": queue, "messages_deleted": deleted, "jobs_cancelled": len(cancelled),
                "job_ids": cancelled}
