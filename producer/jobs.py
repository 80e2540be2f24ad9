"""The job record (the ledger) and its state machine, shared by producers and workers.

A job is a Redis hash at ``vlmq:job:{id}``. Transitions are Lua scripts (``producer.scripts``)
so each is atomic; an illegal one (finishing a job you no longer own, cancelling a finished one)
is refused, not applied. Allowed moves::

    QUEUED  -> RUNNING (claim) | CANCELLED (cancel) | EXPIRED (claim past deadline)
    RUNNING -> SUCCEEDED | FAILED | CANCELLED | EXPIRED (finish, with the current fence)
    RUNNING -> QUEUED (release: handed back) | RUNNING (re-claim after the lease ran out)
"""

from __future__ import annotations

import hashlib
import json
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from producer import keys, scripts
from producer.schema import ErrorInfo, JobRequest, JobResult, JobState, JobStatus

if TYPE_CHECKING:
    from producer.signing import Signer

DEFAULT_RETENTION_S = 86_400
DEFAULT_STREAM_MAXLEN = 10_000


class _Refused(Exception):
    """Carries an error no retry can help through redis-py's retry loop."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def refused(error: BaseException) -> bool:
    """Whether Redis refused this client for good: its credentials, or (TLS) the server's
    certificate did not verify. Retrying those only delays the error."""
    return isinstance(error, redis.AuthenticationError) or (
        isinstance(error, redis.ConnectionError)
        and isinstance(error.__context__, ssl.SSLCertVerificationError))


class _RetryUnlessRefused(Retry):
    """redis-py's Retry, except that refused credentials and certificates are raised at once."""

    def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        def once() -> Any:
            try:
                return do()
            except redis.ConnectionError as error:
                if refused(error):
                    raise _Refused(error) from error
                raise

        try:
            return super().call_with_retry(once, fail, *args, **kwargs)
        except _Refused as final:
            raise final.error from None


def connect(url: str) -> redis.Redis:
    """A Redis client that retries a dropped connection with backoff (about 3 s in all), and
    raises refused credentials or certificates at once."""
    return redis.Redis.from_url(
        url, retry=_RetryUnlessRefused(ExponentialBackoff(cap=1.0, base=0.05), 6),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError], health_check_interval=30)


def new_record(job_id: str, request: JobRequest, queue: str, now: float,
               signer: Signer | None = None) -> dict[str, str]:
    """The hash fields of a freshly accepted job (status QUEUED); signed when ``signer``."""
    fields = {
        "id": job_id,
        "status": JobStatus.QUEUED.value,
        "queue": queue,
        "model": request.model or "",
        "request": request.model_dump_json(),
        "created_at": repr(now),
        "sent_at": repr(now),
        "attempts": "0",
        "fence": "0",
        "tokens": "0",
    }
    if request.ttl_s is not None:
        fields["deadline_at"] = repr(now + request.ttl_s)
    if signer is not None:
        fields.update(signer.sign_record(job_id, queue, fields["request"]))
    return fields


def read_time(value: str | None) -> float | None:
    """A timestamp field; a record written around the producer may hold garbage: None."""
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _int(value: str | None) -> int:
    """A counter field; garbage reads as 0 until a worker resets it and fails the job."""
    try:
        return int(value or "0")
    except ValueError:
        return 0


def parse_state(raw: dict[str, str]) -> JobState:
    """Turn the record hash (decoded to str) into the public JobState."""
    error = raw.get("error")
    return JobState(
        job_id=raw["id"],
        status=JobStatus(raw["status"]),
        queue=raw.get("queue", keys.DEFAULT_QUEUE),
        model=raw.get("model") or None,
        created_at=float(raw["created_at"]),
        started_at=read_time(raw.get("started_at")),
        finished_at=read_time(raw.get("finished_at")),
        deadline_at=read_time(raw.get("deadline_at")),
        attempts=_int(raw.get("attempts")),
        worker=raw.get("worker") or None,
        cancel_requested=raw.get("cancel") == "1",
        finish_reason=raw.get("finish_reason") or None,  # type: ignore[arg-type]
        error=ErrorInfo.model_validate_json(error) if error else None,
        result_uri=raw.get("result_uri") or None,
    )


def parse_result(raw: dict[str, str]) -> JobResult | None:
    body = raw.get("result")
    return JobResult.model_validate_json(body) if body else None


@dataclass(frozen=True)
class Claim:
    outcome: str  # claimed | missing | terminal | busy | cancelled | expired | exhausted
    fence: int


def _decode(raw: dict[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }


class Ledger:
    """Synchronous access to job records; one per process, thread-safe (redis-py pools)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        retention_s: int = DEFAULT_RETENTION_S,
        stream_maxlen: int = DEFAULT_STREAM_MAXLEN,
        signer: Signer | None = None,
    ) -> None:
        self.redis = client
        self.signer = signer  # signs the records ``create`` writes (producer.signing)
        self.retention_s = retention_s
        self.stream_maxlen = stream_maxlen
        self._create = client.register_script(scripts.CREATE)
        self._claim = client.register_script(scripts.CLAIM)
        self._heartbeat = client.register_script(scripts.HEARTBEAT)
        self._append_sha = hashlib.sha1(scripts.APPEND.encode()).hexdigest()  # see append
        self._finish = client.register_script(scripts.FINISH)
        self._release = client.register_script(scripts.RELEASE)
        self._cancel = client.register_script(scripts.CANCEL)
        self._retry = client.register_script(scripts.RETRY)

    @staticmethod
    def _job_keys(job_id: str) -> list[str]:
        return [keys.job_key(job_id), keys.stream_key(job_id), keys.token_channel(job_id)]

    def create(self, job_id: str, request: JobRequest, queue: str) -> tuple[bool, str]:
        """Write a QUEUED record. Returns (created, job_id); an idempotency hit is (False, id)."""
        now = time.time()
        fields = new_record(job_id, request, queue, now, self.signer)
        idem = keys.idempotency_key(request.idempotency_key) if request.idempotency_key else ""
        flat = [item for pair in fields.items() for item in pair]
        created, found = self._create(
            keys=[keys.job_key(job_id), idem], args=[job_id, repr(now), self.retention_s, *flat]
        )
        return bool(created), found.decode() if isinstance(found, bytes) else str(found)

    def raw(self, job_id: str) -> dict[str, str] | None:
        raw = self.redis.hgetall(keys.job_key(job_id))
        return _decode(raw) if raw else None  # type: ignore[arg-type]

    def state(self, job_id: str) -> JobState | None:
        raw = self.raw(job_id)
        return parse_state(raw) if raw else None

    def request(self, job_id: str) -> str | None:
        value = self.redis.hget(keys.job_key(job_id), "request")
        return value.decode() if isinstance(value, bytes) else value  # type: ignore[return-value]

    def claim(self, job_id: str, worker: str, lease_s: float, max_attempts: int) -> Claim:
        outcome, fence = self._claim(
            keys=self._job_keys(job_id),
            args=[repr(time.time()), lease_s, worker, max_attempts, self.retention_s,
                  self.stream_maxlen],
        )
        return Claim(outcome.decode() if isinstance(outcome, bytes) else outcome, int(fence))

    def heartbeat(self, job_id: str, fence: int, lease_s: float) -> int:
        """Extend the lease. Returns -1 if the job is no longer ours, 1 if cancel was asked."""
        return int(self._heartbeat(keys=[keys.job_key(job_id)],
                                   args=[fence, repr(time.time()), lease_s]))

    def append(self, rows: list[tuple[str, int, int, str, int]]) -> list[int]:
        """For each (job_id, fence, seq, event JSON or '', tokens) row, append and publish the
        event, in ONE pipelined round trip. Returns per row: 0 stale fence, 2 cancel asked, 1."""
        if not rows:
            return []
        # EVALSHA itself: a Script object in a pipeline costs a SCRIPT EXISTS round trip first
        pipe = self.redis.pipeline(transaction=False)
        for job_id, fence, seq, data, tokens in rows:
            pipe.evalsha(self._append_sha, 3, *self._job_keys(job_id), fence, seq, data,
                         self.stream_maxlen, tokens)
        try:
            answers = pipe.execute()
        except redis.exceptions.NoScriptError:  # a restarted Redis forgot it: load, send again
            self.redis.script_load(scripts.APPEND)  # (appends are idempotent)
            answers = self.append(rows)
        return [int(answer) for answer in answers]

    def stream_so_far(self, job_id: str) -> tuple[str, int]:
        """Text already streamed for this job and the next seq (for a new attempt)."""
        text, seq = [], 0
        for _entry_id, fields in self.redis.xrange(keys.stream_key(job_id)):
            seq = int(fields[b"seq"]) + 1
            text.append(json.loads(fields[b"data"]).get("delta", ""))
        return "".join(text), seq

    def finish(
        self,
        job_id: str,
        fence: int,
        status: JobStatus,
        event_type: str,
        event_extra: dict[str, Any],
        fields: dict[str, str],
    ) -> bool:
        """Move a RUNNING job we own to a terminal status and emit its terminal event."""
        flat = [item for pair in fields.items() for item in pair]
        done = self._finish(
            keys=self._job_keys(job_id),
            args=[fence, status.value, repr(time.time()), self.retention_s, self.stream_maxlen,
                  json.dumps(event_extra), event_type, *flat],
        )
        return bool(done)

    def release(self, job_id: str, fence: int) -> bool:
        """Hand a RUNNING job back to QUEUED (for a retry), if the fence still holds."""
        return bool(self._release(keys=[keys.job_key(job_id)], args=[fence, repr(time.time())]))

    def cancel(self, job_id: str, *, queued_only: bool = False) -> str:
        """Cancel a job (see scripts.CANCEL); ``queued_only`` leaves a RUNNING job running."""
        answer = self._cancel(keys=self._job_keys(job_id),
                              args=[repr(time.time()), self.retention_s, self.stream_maxlen,
                                    "1" if queued_only else "0"])
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def retry(self, job_id: str) -> str:
        """Put a FAILED or EXPIRED job back to QUEUED (same id, attempts from 0, history kept,
        a fresh deadline when the request has ``ttl_s``). Returns ``queued``, the status of a
        job that cannot be retried, or ``missing``. The caller then sends its task again."""
        now = time.time()
        deadline = ""
        body = self.request(job_id)
        if body:
            try:
                ttl = json.loads(body).get("ttl_s")
            except ValueError:
                ttl = None
            if isinstance(ttl, int | float):
                deadline = repr(now + ttl)
        answer = self._retry(keys=[keys.job_key(job_id), keys.stream_key(job_id)],
                             args=[repr(now), deadline])
        return answer.decode() if isinstance(answer, bytes) else str(answer)
