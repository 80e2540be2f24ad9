"""The Ledger: the only door to job records, their attempt history, the indexes and streams.

A job is a Redis hash at ``vlmq:job:{id}``. Transitions are Lua scripts (``producer.scripts``)
so each is atomic; an illegal one (finishing a job you no longer own, cancelling a finished one)
is refused, not applied. Allowed moves::

    QUEUED  -> RUNNING (claim) | CANCELLED (cancel) | EXPIRED (claim past deadline)
    RUNNING -> SUCCEEDED | FAILED | CANCELLED | EXPIRED (finish, with the current fence)
    RUNNING -> QUEUED (release: handed back) | RUNNING (re-claim after the lease ran out)

The operations themselves (commands and parsing) are in ``producer.records``; this class runs
them on a blocking redis-py client. One per process, thread-safe (redis-py pools).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import redis

from producer import records
from producer.records import (
    DEFAULT_RETENTION_S,
    DEFAULT_STREAM_MAXLEN,
    Ending,
    Index,
    LedgerConfig,
    Row,
    new_record,
)
from producer.replies import (
    Append,
    Cancel,
    Claim,
    Commit,
    Created,
    Heartbeat,
    Retry,
    parse_result,
    parse_state,
    read_time,
)
from producer.schema import JobRequest, JobState, StreamEvent
from producer.steps import Op
from producer.transport import connect, refused, run

if TYPE_CHECKING:
    from producer.signing import Signer

T = TypeVar("T")
__all__ = ["DEFAULT_RETENTION_S", "DEFAULT_STREAM_MAXLEN", "Ending", "Index", "Ledger", "Row",
           "connect", "new_record", "parse_result", "parse_state", "read_time", "refused"]


class Ledger:
    """Blocking access to the ledger; every method is one round trip unless it says so."""

    def __init__(self, client: redis.Redis, *, retention_s: int = DEFAULT_RETENTION_S,
                 stream_maxlen: int = DEFAULT_STREAM_MAXLEN,
                 signer: Signer | None = None,
                 queued_retention_s: int = records.DEFAULT_QUEUED_RETENTION_S) -> None:
        self.redis = client
        self.config = LedgerConfig(retention_s, stream_maxlen, signer, queued_retention_s)

    def run(self, op: Op[T]) -> T:
        return run(self.redis, op)

    # -- records ---------------------------------------------------------------------------

    def create(self, job_id: str, request: JobRequest, queue: str) -> Created:
        """Write a QUEUED record; an idempotency hit is (False, the first job's id)."""
        return self.run(records.create(self.config, job_id, request, queue))

    def raw(self, job_id: str) -> dict[str, str] | None:
        return self.run(records.raw(job_id))

    def state(self, job_id: str) -> JobState | None:
        return self.run(records.state(job_id))

    # -- a job's run (workers) -------------------------------------------------------------

    def claim(self, job_id: str, worker: str, lease_s: float, max_attempts: int) -> Claim:
        """Take the job, or end it; with the record and the stream position (``Claim``)."""
        return self.run(records.claim(self.config, job_id, worker, lease_s, max_attempts))

    def heartbeat(self, job_id: str, fence: int, lease_s: float) -> Heartbeat:
        return self.run(records.heartbeat(job_id, fence, lease_s))

    def append(self, rows: list[Row]) -> list[Append]:
        """For each (job_id, fence, seq, event JSON or '', tokens) row, append and publish the
        event, in ONE pipelined round trip. Per row: ``replies.Append`` values."""
        return self.run(records.append(self.config, rows))

    def finish(self, job_id: str, fence: int, ending: Ending,
               next_seq: int | None = None) -> Commit:
        return self.run(records.finish(self.config, job_id, fence, ending, next_seq))

    def release(self, job_id: str, fence: int) -> Commit:
        return self.run(records.release(job_id, fence))

    # -- producers and operators -----------------------------------------------------------

    def cancel(self, job_id: str, *, queued_only: bool = False) -> Cancel:
        return self.run(records.cancel(self.config, job_id, queued_only))

    def retry(self, job_id: str) -> Retry:
        return self.run(records.retry(job_id))

    # -- the reconciler --------------------------------------------------------------------

    def due(self, index: Index, until: float) -> list[str]:
        return self.run(records.due(index, until))

    def unindex(self, index: Index, job_id: str) -> None:
        self.run(records.unindex(index, job_id))

    def expire_queued(self, job_id: str) -> bool:
        return self.run(records.expire_queued(self.config, job_id))

    def mark_sent(self, job_id: str, now: float) -> None:
        self.run(records.mark_sent(job_id, now))

    def queued_per_queue(self) -> dict[str, int]:
        """Two round trips: the QUEUED index, then each record's status and queue."""
        return self.run(records.queued_per_queue())

    def lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Take a short lock (``SET NX PX``); False when someone holds it."""
        return bool(self.redis.set(name, owner, nx=True, px=ttl_ms))

    def stream_so_far(self, job_id: str) -> tuple[str, int]:
        """Text already streamed for this job and the next seq (what a claim also answers)."""
        events = self.events(job_id)
        return "".join(e.delta for e in events), (events[-1].seq + 1 if events else 0)

    def events(self, job_id: str) -> list[StreamEvent]:
        """Every event in the job's stream now (no waiting)."""
        return self.run(records.events(job_id))
