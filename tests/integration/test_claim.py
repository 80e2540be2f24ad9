"""A task's way from its message to the engine, against a real redis-server: the claim is the
only round trip, and it answers everything the engine needs. The engine here is a stub that
records what it was handed (the model is not the subject)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest
import redis

from producer.client import build_request
from producer.events import event_body, stamp
from producer.jobs import Ledger
from producer.replies import ClaimOutcome
from producer.schema import JobStatus, Timings, Usage
from tests.servers import RedisServer
from worker.engine.work import Outcome, Work
from worker.settings import WorkerSettings
from worker.tasks import Runtime, run_job

pytestmark = pytest.mark.integration


class Counting(redis.Connection):
    """A connection that counts its round trips (each packed send is one)."""

    trips = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        Counting.trips += 1
        super().send_packed_command(command, check_health)


class StubEngine:
    """Takes a Work, notes the round trips made so far and what it was given, ends it."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, Work]] = []
        self.release = threading.Event()
        self.release.set()

    def submit(self, work: Work) -> Future[Outcome]:
        self.seen.append((Counting.trips, work))
        self.release.wait(30)
        work.future.set_result(Outcome(text=work.already_sent + "!", finish_reason="stop",
                                       usage=Usage(completion_tokens=1), timings=Timings()))
        return work.future


@pytest.fixture()
def runtime() -> Iterator[Runtime]:
    server = RedisServer()
    pool = redis.ConnectionPool.from_url(server.url, connection_class=Counting)
    client = redis.Redis(connection_pool=pool)
    settings = WorkerSettings(redis_url=server.url, lease_s=30, max_attempts=3)
    yield Runtime(settings=settings, ledger=Ledger(client), engine=StubEngine(),  # type: ignore[arg-type]
                  worker_id="w-test")
    client.close()
    server.stop()


def submit(rt: Runtime, name: str) -> str:
    job_id = f"{name}-{time.monotonic_ns()}"
    assert rt.ledger.create(job_id, build_request(prompt="hi"), "vlmq").created
    return job_id


def test_a_job_costs_one_round_trip_from_its_message_to_the_engine(runtime: Runtime) -> None:
    run_job(runtime, (submit(runtime, "warm"),), {})  # connects and loads the scripts
    job_id = submit(runtime, "counted")
    before = Counting.trips
    assert run_job(runtime, (job_id,), {}) is JobStatus.SUCCEEDED
    trips, work = runtime.engine.seen[-1]  # type: ignore[attr-defined]
    assert trips - before == 1  # the claim, nothing else (at most 2 is the promise)
    assert work.job_id == job_id and work.request.messages and work.next_seq == 0
    state = runtime.ledger.state(job_id)
    assert state is not None and state.status == "SUCCEEDED" and state.attempts == 1


def test_a_later_attempt_goes_on_where_the_stream_stopped(runtime: Runtime) -> None:
    ledger = runtime.ledger
    job_id = submit(runtime, "resume")
    first = ledger.claim(job_id, "w-lost", lease_s=0.05, max_attempts=3)
    rows = [(job_id, first.fence, seq, stamp(event_body(job_id, "delta", delta=text), seq,
                                             seq + 1, time.time()), seq + 1)
            for seq, text in enumerate(["Two", " cats", " é😀"])]
    assert ledger.append(rows) == [1, 1, 1]
    time.sleep(0.1)  # its worker is lost: the lease runs out
    assert run_job(runtime, (job_id,), {}) is JobStatus.SUCCEEDED
    _trips, work = runtime.engine.seen[-1]  # type: ignore[attr-defined]
    assert work.already_sent == "Two cats é😀" and work.next_seq == 3 and work.fence == 2
    events = ledger.events(job_id)
    assert [e.seq for e in events] == [0, 1, 2, 3] and events[-1].type == "done"
    assert events[-1].tokens == 3 and events[-1].usage == Usage(completion_tokens=1)


def test_counters_that_are_not_numbers_are_reset_and_the_job_fails_at_claim(
        runtime: Runtime) -> None:
    job_id = submit(runtime, "garbage")
    runtime.ledger.redis.hset(f"vlmq:job:{job_id}", mapping={"attempts": "many", "fence": "x"})
    assert run_job(runtime, (job_id,), {}) is ClaimOutcome.INVALID
    assert runtime.engine.seen == []  # type: ignore[attr-defined]
    raw = runtime.ledger.raw(job_id) or {}
    assert raw["attempts"] == "0" and raw["fence"] == "0" and raw["status"] == "FAILED"
    state = runtime.ledger.state(job_id)
    assert state is not None and state.error is not None
    assert state.error.code == "INVALID_REQUEST" and "not a number" in state.error.message
    events = runtime.ledger.events(job_id)
    assert len(events) == 1 and events[0].type == "error" and events[0].error == state.error


def test_malformed_messages_and_duplicates_are_dropped(runtime: Runtime) -> None:
    assert run_job(runtime, ({"evil": 1},), {}) is None
    assert run_job(runtime, ("no-such-job",), {}) is ClaimOutcome.MISSING
    job_id = submit(runtime, "twice")
    assert run_job(runtime, (job_id,), {}) is JobStatus.SUCCEEDED
    assert run_job(runtime, (job_id,), {}) is ClaimOutcome.TERMINAL


def test_a_retry_waiting_to_run_alone_holds_no_claim_meanwhile(runtime: Runtime) -> None:
    """A job whose last worker was lost runs alone; while it waits for the job in hand, it is
    QUEUED (a worker lost meanwhile costs it no attempt), and then runs as attempt 2."""
    engine: StubEngine = runtime.engine  # type: ignore[assignment]
    busy, retried = submit(runtime, "busy"), submit(runtime, "retried")
    runtime.ledger.claim(retried, "w-lost", lease_s=0.05, max_attempts=3)
    time.sleep(0.1)
    engine.release.clear()
    first = threading.Thread(target=run_job, args=(runtime, (busy,), {}))
    first.start()
    deadline = time.monotonic() + 10
    while not engine.seen and time.monotonic() < deadline:
        time.sleep(0.01)
    second = threading.Thread(target=run_job, args=(runtime, (retried,), {}))
    second.start()
    while (runtime.ledger.raw(retried) or {}).get("status") != "QUEUED" and (
            time.monotonic() < deadline):
        time.sleep(0.01)
    waiting = runtime.ledger.state(retried)
    assert waiting is not None and waiting.status == "QUEUED" and waiting.attempts == 1
    engine.release.set()
    first.join(10)
    second.join(10)
    assert [work.job_id for _trips, work in engine.seen] == [busy, retried]
    state = runtime.ledger.state(retried)
    assert state is not None and state.status == "SUCCEEDED" and state.attempts == 2
