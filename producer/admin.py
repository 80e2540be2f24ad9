"""Operator views and actions: stats, job listing, retry, purge (``vlmq stats|jobs|retry|purge``).

Mixed into ``Producer``; they read the ledger indexes and the broker:

- ``stats()``: queue depth per known queue (``vlmq``, ``vlmq.*`` broker lists and the queues live
  workers report), the oldest queued job and its age, job counts by status, live workers.
- ``jobs(status, limit)``: job states from the indexes, newest first for finished ones.
- ``retry(id)``: a FAILED or EXPIRED job back to QUEUED with the same id (``Ledger.retry``,
  atomic), then its task is sent again.
- ``purge(queue)``: deletes the queue's waiting messages and cancels every job they carried plus
  every QUEUED job recorded for that queue; the records stay (CANCELLED, kept for the retention
  period like any finished job). RUNNING jobs are not touched.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from celery import Celery
from redis import Redis

from producer import keys
from producer.errors import JobNotFound, NotAllowed
from producer.jobs import Ledger, parse_state
from producer.schema import JobState, JobStatus

_SEP = "\x06\x16"  # kombu's Redis transport: <queue><SEP><priority> holds priority > 0
_CHUNK = 500


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _lists(queue: str) -> list[str]:
    return [queue] + [f"{queue}{_SEP}{priority}" for priority in range(1, 10)]


def _task_id(payload: bytes) -> str | None:
    try:
        return str(json.loads(payload)["headers"]["id"])
    except (ValueError, KeyError, TypeError):
        return None


class AdminMixin:
    ledger: Ledger
    redis: Redis
    broker_url: str
    _celery: Celery

    def enqueue(self, job_id: str, queue: str = keys.DEFAULT_QUEUE) -> None:
        raise NotImplementedError

    def status(self, job_id: str) -> JobState:
        raise NotImplementedError

    # -- broker ----------------------------------------------------------------------------

    def _broker_redis(self) -> Redis | None:
        if not self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            return None
        cached = getattr(self, "_broker_client", None)
        if cached is None:
            cached = Redis.from_url(self.broker_url)
            self._broker_client = cached
        return cached

    def queue_depth(self, queue: str) -> int | None:
        """Messages waiting in ``queue`` (None when the broker cannot say)."""
        broker = self._broker_redis()
        if broker is not None:
            pipe = broker.pipeline(transaction=False)
            for name in _lists(queue):
                pipe.llen(name)
            return int(sum(pipe.execute()))
        try:
            with self._celery.connection_for_read() as conn:
                return int(conn.default_channel.queue_declare(queue=queue, passive=True)
                           .message_count)
        except Exception:  # no such queue yet, or the broker is away
            return None

    def workers(self) -> list[dict[str, Any]]:
        """Live workers' last health reports (``vlmq:worker:*``, kept for three beats)."""
        names = sorted(_text(k) for k in self.redis.scan_iter(match=keys.WORKER_PATTERN))
        found = []
        for raw in self.redis.mget(names) if names else []:
            if raw:
                try:
                    found.append(json.loads(raw))
                except ValueError:
                    continue
        return found

    def queue_names(self) -> list[str]:
        names = {keys.DEFAULT_QUEUE}
        broker = self._broker_redis()
        if broker is not None:
            for raw in broker.scan_iter(match=f"{keys.DEFAULT_QUEUE}*", _type="list"):
                name = _text(raw)
                if keys.is_queue_list(name):
                    names.add(name.split(_SEP, 1)[0])
        for worker in self.workers():
            names.update(str(q) for q in worker.get("queues", []))
        return sorted(names)

    # -- views -----------------------------------------------------------------------------

    def _states(self, ids: list[str]) -> list[JobState]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job_key(job_id))
        states = []
        for raw in pipe.execute():
            if raw:
                states.append(parse_state({_text(k): _text(v) for k, v in raw.items()}))
        return states

    def _index_ids(self, index: str, newest_first: bool) -> Iterator[list[str]]:
        start = 0
        while True:
            if newest_first:
                chunk = self.redis.zrevrange(index, start, start + _CHUNK - 1)
            else:
                chunk = self.redis.zrange(index, start, start + _CHUNK - 1)
            if not chunk:
                return
            yield [_text(i) for i in chunk]
            start += _CHUNK

    def jobs(self, status: JobStatus | str | None = None, limit: int = 50) -> list[JobState]:
        """Jobs with ``status`` (any when None): queued and running ones oldest first, finished
        ones newest first; at most ``limit``."""
        wanted = JobStatus(status) if status else None
        sources = [(keys.QUEUED_INDEX, False), (keys.RUNNING_INDEX, False),
                   (keys.TERMINAL_INDEX, True)]
        if wanted == JobStatus.QUEUED:
            sources = sources[:1]
        elif wanted == JobStatus.RUNNING:
            sources = sources[1:2]
        elif wanted is not None:
            sources = sources[2:]
        found: list[JobState] = []
        seen: set[str] = set()
        for index, newest_first in sources:
            for ids in self._index_ids(index, newest_first):
                for state in self._states([i for i in ids if i not in seen]):
                    seen.add(state.job_id)
                    if wanted is None or state.status == wanted:
                        found.append(state)
                        if len(found) >= limit:
                            return found
        return found

    def stats(self) -> dict[str, Any]:
        """Queue depths, the oldest queued job, job counts by status, live workers."""
        now = time.time()
        counts = {status.value: 0 for status in JobStatus}
        counts[JobStatus.QUEUED.value] = int(self.redis.zcard(keys.QUEUED_INDEX))
        counts[JobStatus.RUNNING.value] = int(self.redis.zcard(keys.RUNNING_INDEX))
        for ids in self._index_ids(keys.TERMINAL_INDEX, newest_first=False):
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(keys.job_key(job_id), "status")
            for raw in pipe.execute():
                status = _text(raw) if raw else ""
                if status in counts and JobStatus(status).terminal:
                    counts[status] += 1
        oldest = None
        first = self.redis.zrange(keys.QUEUED_INDEX, 0, 0, withscores=True)
        if first:
            job_id, score = first[0]
            oldest = {"job_id": _text(job_id), "age_s": round(max(0.0, now - score), 3)}
        workers = [{"worker": w.get("worker"), "model": w.get("model"),
                    "queues": w.get("queues"), "consuming": w.get("consuming"),
                    "age_s": round(now - float(w.get("ts", now)), 3)} for w in self.workers()]
        return {"queues": {name: self.queue_depth(name) for name in self.queue_names()},
                "oldest_queued": oldest, "jobs": counts, "workers": workers}

    # -- actions ---------------------------------------------------------------------------

    def retry(self, job_id: str) -> JobState:
        """Run a FAILED or EXPIRED job again under the same id (attempts from 0, attempt history
        kept). Raises JobNotFound, or NotAllowed for a job in any other status."""
        answer = self.ledger.retry(job_id)
        if answer == "missing":
            raise JobNotFound(job_id)
        if answer != "queued":
            raise NotAllowed(f"job {job_id} is {answer}: only FAILED or EXPIRED jobs can be "
                             "retried")
        state = self.status(job_id)
        self.enqueue(job_id, state.queue)
        return state

    def purge(self, queue: str) -> dict[str, Any]:
        """Delete the messages waiting in ``queue`` and cancel their jobs and every other
        QUEUED job recorded for that queue. Returns counts and the cancelled ids."""
        carried: set[str] = set()
        broker = self._broker_redis()
        if broker is not None:
            names = _lists(queue)
            pipe = broker.pipeline(transaction=True)
            for name in names:
                pipe.lrange(name, 0, -1)
            for name in names:
                pipe.delete(name)
            answers = pipe.execute()[: len(names)]
            payloads = [payload for answer in answers for payload in answer]
            deleted = len(payloads)
            carried = {i for i in map(_task_id, payloads) if i}
        else:
            with self._celery.connection_for_write() as conn:
                deleted = int(conn.default_channel.queue_purge(queue) or 0)
        candidates = set(carried)
        for ids in self._index_ids(keys.QUEUED_INDEX, newest_first=False):
            candidates.update(s.job_id for s in self._states(ids) if s.queue == queue)
        cancelled = sorted(i for i in candidates
                           if self.ledger.cancel(i, queued_only=True) == "cancelled")
        return {"queue": queue, "messages_deleted": deleted, "jobs_cancelled": len(cancelled),
                "job_ids": cancelled}
