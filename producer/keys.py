"""Every Redis key, pub/sub channel and Celery task name vlmq uses, in one place.

Only the ledger (``producer.jobs``, ``producer.records``, ``producer.scripts``) reads or writes
the job keys, streams and indexes; queue names per model live in ``producer.broker``."""

from __future__ import annotations

import re

PREFIX = "vlmq"
# the syntax of a job id (what a producer makes, what a worker accepts in a task message)
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_QUEUE = "vlmq"
TASK_GENERATE = "vlmq.generate"

QUEUED_INDEX = f"{PREFIX}:index:queued"  # ZSET job id -> created_at, for the reconciler and stats
RUNNING_INDEX = f"{PREFIX}:index:running"  # ZSET job id -> lease expiry
TERMINAL_INDEX = f"{PREFIX}:index:done"  # ZSET job id -> finished_at (admin listing)
RECONCILER_LOCK = f"{PREFIX}:reconciler:lock"  # one worker sweeps per interval


def job_key(job_id: str) -> str:
    """Hash holding the job record (see docs/PROTOCOL.md for its fields)."""
    return f"{PREFIX}:job:{job_id}"


def attempts_key(job_id: str) -> str:
    """List of the job's attempt history entries (JSON), one per claim and per retry."""
    return f"{PREFIX}:job:{job_id}:attempts"


def stream_key(job_id: str) -> str:
    """Redis Stream of the job's StreamEvents; replayable; expires with the record."""
    return f"{PREFIX}:stream:{job_id}"


def token_channel(job_id: str) -> str:
    """Pub/sub channel carrying the same StreamEvent JSON as the stream, live only."""
    return f"{PREFIX}:tokens:{job_id}"


def job_keys(job_id: str) -> list[str]:
    """The KEYS of every job script (``producer.scripts``), in this order."""
    return [job_key(job_id), stream_key(job_id), token_channel(job_id), attempts_key(job_id),
            QUEUED_INDEX, RUNNING_INDEX, TERMINAL_INDEX]


# the job scripts' KEYS with ``{id}`` in place of a job id: what the contract documents
JOB_KEYS_DOC = job_keys("{id}")


def idempotency_key(key: str, scope: str | None = None) -> str:
    """String ``{job id} {sha256 hex of the request JSON}``; with a scope (no ``:`` in it) the
    key is namespaced: ``vlmq:idem@{scope}:{key}``."""
    return f"{PREFIX}:idem@{scope}:{key}" if scope else f"{PREFIX}:idem:{key}"


def worker_key(worker_id: str) -> str:
    """String holding a live worker's last health report (JSON), with a TTL of three beats."""
    return f"{PREFIX}:worker:{worker_id}"


WORKER_PATTERN = f"{PREFIX}:worker:*"
SERVED_WINDOW_S = 300  # a queue counts as served this long after a live worker last said so


def serving_key(queue: str) -> str:
    """String naming the last worker that consumed ``queue``; expires ``SERVED_WINDOW_S``
    after the last health report that renewed it."""
    return f"{PREFIX}:serving:{queue}"
