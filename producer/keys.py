"""Every Redis key, pub/sub channel, Celery task and queue name vlmq uses, in one place."""

from __future__ import annotations

import re

PREFIX = "vlmq"
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


def stream_key(job_id: str) -> str:
    """Redis Stream of the job's StreamEvents; replayable; expires with the record."""
    return f"{PREFIX}:stream:{job_id}"


def token_channel(job_id: str) -> str:
    """Pub/sub channel carrying the same StreamEvent JSON as the stream, live only."""
    return f"{PREFIX}:tokens:{job_id}"


def idempotency_key(key: str) -> str:
    return f"{PREFIX}:idem:{key}"


def worker_key(worker_id: str) -> str:
    """String holding a live worker's last health report (JSON), with a TTL of three beats."""
    return f"{PREFIX}:worker:{worker_id}"


WORKER_PATTERN = f"{PREFIX}:worker:*"


def is_queue_list(name: str) -> bool:
    """Whether a broker key is a vlmq queue list: ``vlmq`` or ``vlmq.<model>`` (kombu keeps
    messages of priority > 0 in a sibling list: the queue name, its separator, the priority)."""
    base = name.split("\x06\x16", 1)[0]
    return base == DEFAULT_QUEUE or (base.startswith(f"{DEFAULT_QUEUE}.") and ":" not in base)


def queue_for_model(model: str | None) -> str:
    """The Celery queue serving ``model``; ``vlmq`` when no model is named."""
    if not model:
        return DEFAULT_QUEUE
    return f"{DEFAULT_QUEUE}.{re.sub(r'[^A-Za-z0-9._-]+', '_', model)}"
