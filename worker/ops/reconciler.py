"""The reconciler: the ledger, not the broker, decides that every accepted job gets done.

Every worker runs a light sweep; a short Redis lock lets only one of them act per interval.
A sweep re-sends the task message, with the same job id, for:
- RUNNING jobs whose lease has run out (their worker died or lost Redis); the claim then
  counts the attempt and turns a job that keeps killing workers into FAILED/WORKER_LOST;
- QUEUED jobs older than a grace period whose broker message is gone (a broker restarted
  without persistence, a message lost at failover, a producer that died between writing the
  record and sending). On a Redis broker the queue lists and the transport's ``unacked`` hash
  are looked at. On RabbitMQ (``depth``: a queue's ready messages) the broker cannot be
  searched by id, so it is counted: when a queue holds fewer ready messages than the ledger
  has QUEUED jobs for it, that many of its stale jobs, longest waiting first, are re-sent. With
  neither, a stale QUEUED job is re-sent once per grace period.
A lease-expired job is re-sent once when its lease runs out, then once per grace period while no
claim takes it. Duplicate messages are harmless: a claim drops a job that is running or done.

A record written around the producer (``producer.fields.problems``) is not re-sent: the sweep
ends it FAILED/INVALID_REQUEST itself (claim, then finish), or, when its status is not a job
status at all, quarantines it: removes it from the index, logs its id once and counts it
(``on_quarantine``). One record never stops a sweep: an error is logged with the job's id and
the sweep goes on.
A QUEUED job past its deadline (``ttl_s``) is ended EXPIRED by the sweep itself, so a job for a
model no worker serves does not wait for a claim that never comes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from producer import fields, keys
from producer.broker import amqp_depth as _amqp_depth
from producer.broker import waiting_ids
from producer.jobs import Ending, Index, Ledger, read_time
from producer.replies import ClaimOutcome
from producer.schema import ErrorCode, ErrorInfo

log = logging.getLogger("vlmq.reconciler")
Send = Callable[[str, str], None]  # (job_id, queue)
Depth = Callable[[str], int | None]  # ready messages in a queue; None: the broker cannot say
Record = dict[str, str]


class Reconciler:
    def __init__(self, ledger: Ledger, send: Send, *, worker_id: str, interval_s: float,
                 grace_s: float, broker: redis.Redis | None,
                 depth: Depth | None = None,
                 on_quarantine: Callable[[str], object] | None = None) -> None:
        self.ledger = ledger
        self.send = send
        self.worker_id = worker_id
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.broker = broker  # the broker's Redis, when the broker is Redis
        self.depth = depth  # ready messages per queue, on a broker that is not Redis
        self.on_quarantine = on_quarantine
        self._last = 0.0

    def maybe_sweep(self) -> dict[str, int] | None:
        now = time.time()
        if now - self._last < self.interval_s:
            return None
        self._last = now
        lock = self.ledger.lock(keys.RECONCILER_LOCK, self.worker_id,
                                max(1, int(self.interval_s * 1000 * 0.9)))
        return self.sweep(now) if lock else None

    def _records(self, index: Index, until: float, status: str) -> list[tuple[str, Record]]:
        """The jobs of ``index`` up to ``until`` whose record still has ``status``; the index
        forgets the others."""
        found = []
        for job_id in self.ledger.due(index, until):
            record = self.ledger.raw(job_id)
            if record and fields.status(record.get("status")) is None:
                self._quarantine(job_id, record)
            elif not record or record.get("status") != status:
                self.ledger.unindex(index, job_id)
            elif fields.problems(record):
                self._safely(job_id, self._reject, job_id, fields.problems(record))
            else:
                found.append((job_id, record))
        return found

    def _quarantine(self, job_id: str, record: Record) -> None:
        for index in (Index.QUEUED, Index.RUNNING):
            self.ledger.unindex(index, job_id)
        log.warning("job %s quarantined (removed from the indexes): %s", fields.clean(job_id),
                    "; ".join(fields.problems(record)))
        if self.on_quarantine is not None:
            self.on_quarantine(job_id)

    def _reject(self, job_id: str, problems: list[str]) -> None:
        """End a job whose record is unreadable FAILED/INVALID_REQUEST, unrun."""
        claim = self.ledger.claim(job_id, self.worker_id, 30.0, 1 << 30)
        if claim.outcome is ClaimOutcome.CLAIMED:
            info = ErrorInfo(code=ErrorCode.INVALID_REQUEST,
                             message="the job record is unreadable: " + "; ".join(problems))
            self.ledger.finish(job_id, claim.fence, Ending.failed(job_id, info))
            log.warning("job %s ended FAILED INVALID_REQUEST by the reconciler: %s",
                        fields.clean(job_id), "; ".join(problems))

    def _safely(self, job_id: str, action: Callable[..., object], *args: Any) -> None:
        try:
            action(*args)
        except (redis.ResponseError, ValueError):  # the record, not Redis: the sweep goes on
            log.warning("job %s: reconciling it failed", fields.clean(job_id), exc_info=True)

    def sweep(self, now: float) -> dict[str, int]:
        counts = {"lease_expired": 0, "message_lost": 0, "expired": 0}
        for job_id, record in self._records(Index.RUNNING, now, "RUNNING"):
            lease, sent = read_time(record.get("lease_until")) or 0.0, _sent_at(record)
            # once when the lease runs out, then once per grace period until a claim takes it
            if lease < now and (sent < lease or now - sent >= self.grace_s):
                self._safely(job_id, self._resend, job_id, record, now)
                counts["lease_expired"] += 1
        candidates = []
        for job_id, record in self._records(Index.QUEUED, now, "QUEUED"):
            deadline = read_time(record.get("deadline_at"))
            if deadline is not None and deadline <= now:  # no worker took it in time
                counts["expired"] += self.ledger.expire_queued(job_id)
            elif now - _sent_at(record) >= self.grace_s:
                candidates.append((job_id, record))
        for job_id, record in self._lost(candidates):
            self._safely(job_id, self._resend, job_id, record, now)
            counts["message_lost"] += 1
        if any(counts.values()):
            log.info("reconciler re-sent %s", counts)
        return counts

    def _resend(self, job_id: str, record: Record, now: float) -> None:
        self.ledger.mark_sent(job_id, now)
        self.send(job_id, record.get("queue") or keys.DEFAULT_QUEUE)

    def _lost(self, candidates: list[tuple[str, Record]]) -> list[tuple[str, Record]]:
        """The stale QUEUED jobs whose message the broker does not seem to hold."""
        if not candidates:
            return []
        if self.broker is not None:
            present = waiting_ids(self.broker, self.grace_s)
            return [c for c in candidates if c[0] not in present]
        if self.depth is None:
            return candidates  # cannot tell: once per grace period
        by_queue: dict[str, list[tuple[str, Record]]] = {}
        for job_id, record in sorted(candidates, key=lambda c: _sent_at(c[1])):
            by_queue.setdefault(record.get("queue") or keys.DEFAULT_QUEUE, []).append(
                (job_id, record))
        queued = self.ledger.queued_per_queue()
        lost = []
        for queue, group in by_queue.items():
            ready = self.depth(queue)
            missing = len(group) if ready is None else queued.get(queue, 0) - ready
            lost.extend(group[:max(0, missing)])
        return lost


def _sent_at(record: Record) -> float:
    return read_time(record.get("sent_at")) or 0.0  # garbage: never sent, so sent again


def amqp_depth(connect: Callable[[], Any]) -> Depth:
    """``depth`` for an AMQP broker (``producer.broker.amqp_depth``); ``connect`` gives a kombu
    connection (``app.connection_for_read``)."""
    return lambda queue: _amqp_depth(connect, queue)
