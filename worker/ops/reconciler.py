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
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from producer import keys
from producer.jobs import Ledger, read_time

log = logging.getLogger("vlmq.reconciler")
Send = Callable[[str, str], None]  # (job_id, queue)
Depth = Callable[[str], int | None]  # ready messages in a queue; None: the broker cannot say


class Reconciler:
    def __init__(self, ledger: Ledger, send: Send, *, worker_id: str, interval_s: float,
                 grace_s: float, broker: redis.Redis | None,
                 depth: Depth | None = None) -> None:
        self.ledger = ledger
        self.send = send
        self.worker_id = worker_id
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.broker = broker  # the broker's Redis, when the broker is Redis
        self.depth = depth  # ready messages per queue, on a broker that is not Redis
        self._last = 0.0

    def maybe_sweep(self) -> dict[str, int] | None:
        now = time.time()
        if now - self._last < self.interval_s:
            return None
        self._last = now
        lock = self.ledger.redis.set(keys.RECONCILER_LOCK, self.worker_id, nx=True,
                                     px=max(1, int(self.interval_s * 1000 * 0.9)))
        return self.sweep(now) if lock else None

    def sweep(self, now: float) -> dict[str, int]:
        counts = {"lease_expired": 0, "message_lost": 0}
        client = self.ledger.redis
        for raw_id in client.zrangebyscore(keys.RUNNING_INDEX, "-inf", now):
            job_id = raw_id.decode()
            record = self.ledger.raw(job_id)
            if not record or record.get("status") != "RUNNING":
                client.zrem(keys.RUNNING_INDEX, job_id)
                continue
            lease, sent = read_time(record.get("lease_until")) or 0.0, _sent_at(record)
            # once when the lease runs out, then once per grace period until a claim takes it
            if lease < now and (sent < lease or now - sent >= self.grace_s):
                self._resend(job_id, record, now)
                counts["lease_expired"] += 1
        candidates = []
        for raw_id in client.zrangebyscore(keys.QUEUED_INDEX, "-inf", now - self.grace_s):
            job_id = raw_id.decode()
            record = self.ledger.raw(job_id)
            if not record or record.get("status") != "QUEUED":
                client.zrem(keys.QUEUED_INDEX, job_id)
            elif now - _sent_at(record) >= self.grace_s:
                candidates.append((job_id, record))
        for job_id, record in self._lost(candidates):
            self._resend(job_id, record, now)
            counts["message_lost"] += 1
        if any(counts.values()):
            log.info("reconciler re-sent %s", counts)
        return counts

    def _resend(self, job_id: str, record: dict[str, str], now: float) -> None:
        self.ledger.redis.hset(keys.job_key(job_id), "sent_at", repr(now))
        self.send(job_id, record.get("queue") or keys.DEFAULT_QUEUE)

    def _lost(self, candidates: list[tuple[str, dict[str, str]]]
              ) -> list[tuple[str, dict[str, str]]]:
        """The stale QUEUED jobs whose message the broker does not seem to hold."""
        if not candidates:
            return []
        if self.broker is not None:
            present = self._ids_in_broker()
            return [c for c in candidates if c[0] not in present]
        if self.depth is None:
            return candidates  # cannot tell: once per grace period
        by_queue: dict[str, list[tuple[str, dict[str, str]]]] = {}
        for job_id, record in sorted(candidates, key=lambda c: _sent_at(c[1])):
            by_queue.setdefault(record.get("queue") or keys.DEFAULT_QUEUE, []).append(
                (job_id, record))
        queued = self._queued_per_queue()
        lost = []
        for queue, group in by_queue.items():
            ready = self.depth(queue)
            missing = len(group) if ready is None else queued.get(queue, 0) - ready
            lost.extend(group[:max(0, missing)])
        return lost

    def _queued_per_queue(self) -> dict[str, int]:
        """How many QUEUED jobs the ledger records for each queue."""
        client = self.ledger.redis
        pipe = client.pipeline(transaction=False)
        for raw_id in client.zrange(keys.QUEUED_INDEX, 0, -1):
            pipe.hmget(keys.job_key(raw_id.decode()), "status", "queue")
        counts: dict[str, int] = {}
        for status, queue in pipe.execute():
            if status == b"QUEUED":
                name = queue.decode() if queue else keys.DEFAULT_QUEUE
                counts[name] = counts.get(name, 0) + 1
        return counts

    def _ids_in_broker(self) -> set[str]:
        """Task ids waiting in the broker's queues or delivered and unacked (Redis broker)."""
        if self.broker is None:
            return set()
        found: set[str] = set()
        payloads: list[bytes] = []
        for name in self.broker.scan_iter(match="vlmq*", _type="list"):
            payloads.extend(self.broker.lrange(name, 0, -1))
        # delivered and unacked: only recent deliveries count; an older one whose job is still
        # QUEUED sits with a consumer that died (Redis gives it back after the visibility
        # timeout, far later)
        recent = self.broker.zrangebyscore("unacked_index", time.time() - self.grace_s, "+inf")
        if recent:
            payloads.extend(p for p in self.broker.hmget("unacked", recent) if p)
        for payload in payloads:
            try:
                message = json.loads(payload)
                if isinstance(message, list):  # unacked entries are [message, exchange, key]
                    message = message[0]
                found.add(str(message["headers"]["id"]))
            except (ValueError, KeyError, TypeError, IndexError):
                continue
        return found


def _sent_at(record: dict[str, str]) -> float:
    return read_time(record.get("sent_at")) or 0.0  # garbage: never sent, so sent again


def amqp_depth(connect: Callable[[], Any]) -> Depth:
    """``depth`` for an AMQP broker: a passive declare's message count (ready messages, not
    those delivered and unacked); 0 when the queue does not exist, None when it cannot say.
    ``connect`` gives a kombu connection (``app.connection_for_read``)."""

    def depth(queue: str) -> int | None:
        try:
            with connect() as conn:
                return int(conn.channel().queue_declare(queue=queue, passive=True)
                           .message_count)
        except Exception as error:
            if getattr(error, "code", None) == 404:  # NOT_FOUND: no such queue, no messages
                return 0
            log.warning("reconciler: cannot read the depth of queue %s: %s", queue, error)
            return None

    return depth
