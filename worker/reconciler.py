"""The reconciler: the ledger, not the broker, decides that every accepted job gets done.

Every worker runs a light sweep; a short Redis lock lets only one of them act per interval.
A sweep re-sends the task message, with the same job id, for:
- RUNNING jobs whose lease has run out (their worker died or lost Redis); the claim then
  counts the attempt and turns a job that keeps killing workers into FAILED/WORKER_LOST;
- QUEUED jobs older than a grace period whose broker message is gone (a broker restarted
  without persistence, a message lost at failover). On a Redis broker the queue lists and the
  transport's ``unacked`` hash are looked at; on other brokers a QUEUED job is re-sent once per
  grace period. Duplicate messages are harmless: a claim drops a job that is running or done.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import redis

from producer import keys
from producer.jobs import Ledger

log = logging.getLogger("vlmq.reconciler")
Send = Callable[[str, str], None]  # (job_id, queue)


class Reconciler:
    def __init__(self, ledger: Ledger, send: Send, *, worker_id: str, interval_s: float,
                 grace_s: float, broker: redis.Redis | None) -> None:
        self.ledger = ledger
        self.send = send
        self.worker_id = worker_id
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.broker = broker  # the broker's Redis, when the broker is Redis
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
            if float(record.get("lease_until") or 0) < now:
                self._resend(job_id, record, now)
                counts["lease_expired"] += 1
        stale = [i.decode() for i in client.zrangebyscore(keys.QUEUED_INDEX, "-inf",
                                                          now - self.grace_s)]
        if stale:
            present = self._ids_in_broker()
            for job_id in stale:
                record = self.ledger.raw(job_id)
                if not record or record.get("status") != "QUEUED":
                    client.zrem(keys.QUEUED_INDEX, job_id)
                    continue
                if job_id in present or now - float(record.get("sent_at") or 0) < self.grace_s:
                    continue
                self._resend(job_id, record, now)
                counts["message_lost"] += 1
        if any(counts.values()):
            log.info("reconciler re-sent %s", counts)
        return counts

    def _resend(self, job_id: str, record: dict[str, str], now: float) -> None:
        self.ledger.redis.hset(keys.job_key(job_id), "sent_at", repr(now))
        self.send(job_id, record.get("queue") or keys.DEFAULT_QUEUE)

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
