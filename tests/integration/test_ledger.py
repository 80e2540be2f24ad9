"""The ledger's state machine against a real redis-server: atomic, fenced, illegal moves refused."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from producer import keys
from producer.client import build_request
from producer.events import event_body, stamp
from producer.jobs import Ending, Ledger
from producer.replies import Append, Cancel, CancelOutcome, ClaimOutcome, Heartbeat
from producer.schema import ErrorCode, ErrorInfo, JobStatus, Usage
from tests.servers import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture()
def ledger(redis_server: Any) -> Ledger:
    return Ledger(redis.Redis.from_url(redis_server.url), retention_s=120)


def new_job(ledger: Ledger, name: str, **options: Any) -> str:
    job_id = f"{name}-{time.monotonic_ns()}"
    created, found = ledger.create(job_id, build_request(prompt="hi", **options), "vlmq")
    assert created and found == job_id
    return job_id


def delta(job_id: str, seq: int, text: str) -> str:
    return stamp(event_body(job_id, "delta", delta=text), seq, seq + 1, time.time())


def done(job_id: str) -> Ending:
    return Ending.finished(job_id, JobStatus.SUCCEEDED, "stop", Usage(), {"result": "{}"})


def test_claim_fences_and_refuses_stale_commits(ledger: Ledger) -> None:
    job_id = new_job(ledger, "fence")
    first = ledger.claim(job_id, "w1", lease_s=0.2, max_attempts=3)
    assert first.outcome == "claimed" and first.fence == 1
    assert ledger.claim(job_id, "w2", lease_s=5, max_attempts=3).outcome == "busy"
    time.sleep(0.3)  # lease runs out: a second worker takes over with a new fence
    second = ledger.claim(job_id, "w2", lease_s=5, max_attempts=3)
    assert second.outcome == "claimed" and second.fence == 2
    assert ledger.heartbeat(job_id, first.fence, 5) == -1
    assert not ledger.finish(job_id, first.fence, done(job_id))
    assert ledger.finish(job_id, second.fence, done(job_id))
    state = ledger.state(job_id)
    assert state is not None and state.status == "SUCCEEDED" and state.attempts == 2
    failed = Ending.failed(job_id, ErrorInfo(code=ErrorCode.INTERNAL, message="late"))
    assert not ledger.finish(job_id, second.fence, failed)
    assert ledger.redis.ttl(keys.job_key(job_id)) > 0


def test_attempt_cap_ends_failed_worker_lost(ledger: Ledger) -> None:
    job_id = new_job(ledger, "cap")
    for _ in range(2):
        assert ledger.claim(job_id, "w", lease_s=0.01, max_attempts=2).outcome == "claimed"
        time.sleep(0.02)
    assert ledger.claim(job_id, "w", lease_s=0.01, max_attempts=2).outcome == "exhausted"
    state = ledger.state(job_id)
    assert state and state.status == "FAILED" and state.error and state.error.code == "WORKER_LOST"
    last = ledger.redis.xrevrange(keys.stream_key(job_id), count=1)[0][1]
    assert json.loads(last[b"data"])["type"] == "error"


def test_cancel_queued_running_and_finished(ledger: Ledger) -> None:
    queued = new_job(ledger, "cq")
    assert ledger.cancel(queued) == Cancel(CancelOutcome.CANCELLED)
    assert ledger.claim(queued, "w", 5, 3).outcome is ClaimOutcome.TERMINAL
    running = new_job(ledger, "cr")
    claim = ledger.claim(running, "w", 5, 3)
    assert ledger.cancel(running, queued_only=True) == Cancel(CancelOutcome.LEFT_RUNNING)
    assert ledger.cancel(running) == Cancel(CancelOutcome.REQUESTED)
    assert ledger.heartbeat(running, claim.fence, 5) is Heartbeat.CANCEL
    assert ledger.append([(running, claim.fence, 0, "", 0)]) == [Append.CANCEL]
    assert ledger.cancel(queued) == Cancel(CancelOutcome.ENDED, JobStatus.CANCELLED)
    assert ledger.cancel("no-such-job") == Cancel(CancelOutcome.MISSING)


def test_deadline_passed_while_queued_expires_on_claim(ledger: Ledger) -> None:
    job_id = new_job(ledger, "ttl", ttl_s=0.05)
    time.sleep(0.1)
    assert ledger.claim(job_id, "w", 5, 3).outcome == "expired"
    state = ledger.state(job_id)
    assert state and state.status == "EXPIRED" and state.finish_reason == "deadline"


def test_idempotency_key_returns_the_same_job(ledger: Ledger) -> None:
    request = build_request(prompt="hi", idempotency_key=f"k-{time.monotonic_ns()}")
    assert ledger.create("a1", request, "vlmq") == (True, "a1")
    assert ledger.create("a2", request, "vlmq") == (False, "a1")
    assert ledger.raw("a2") is None


def test_finished_index_drops_entries_past_retention(ledger: Ledger) -> None:
    stale = f"stale-{time.monotonic_ns()}"
    ledger.redis.zadd(keys.TERMINAL_INDEX, {stale: time.time() - 121})  # retention is 120 s
    job_id = new_job(ledger, "trim")
    claim = ledger.claim(job_id, "w", 30, 3)
    assert ledger.finish(job_id, claim.fence, done(job_id))
    assert ledger.redis.zscore(keys.TERMINAL_INDEX, stale) is None
    assert ledger.redis.zscore(keys.TERMINAL_INDEX, job_id) is not None


def test_a_step_is_one_pipelined_round_trip_and_survives_a_script_flush() -> None:
    server = RedisServer()  # its own: the command counts below are this test's alone
    try:
        ledger = Ledger(redis.Redis.from_url(server.url), retention_s=120)
        jobs = [new_job(ledger, f"step{i}") for i in range(3)]
        fences = [ledger.claim(j, "w", lease_s=30, max_attempts=3).fence for j in jobs]

        def step(seq: int) -> list[int]:
            return ledger.append([(job_id, fence, seq, delta(job_id, seq, "x"), seq + 1)
                                  for job_id, fence in zip(jobs, fences, strict=True)])

        assert step(0) == [1, 1, 1]  # the first also loads the script
        ledger.redis.config_resetstat()
        for seq in range(1, 11):
            assert step(seq) == [1, 1, 1]
        stats = ledger.redis.info("commandstats")
        assert "cmdstat_script" not in stats, stats  # no SCRIPT EXISTS before each step
        assert stats["cmdstat_evalsha"]["calls"] == 30
        ledger.redis.script_flush()  # as after a restart: the script is loaded again
        assert step(11) == [1, 1, 1]
        for job_id in jobs:
            assert ledger.stream_so_far(job_id) == ("x" * 12, 12)
    finally:
        server.stop()
