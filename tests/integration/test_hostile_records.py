"""Records written around the producer, against a real redis-server: every one ends FAILED
INVALID_REQUEST or is quarantined, and no sweep, read, script or task raises an untyped error.

The task runs through ``worker.tasks.run_job`` with a stand-in engine that answers at once (the
engine is not what is tested here); the reconciler sweeps at chosen times."""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future
from typing import Any, cast

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer import cli, keys
from producer.client import Producer, build_request
from producer.errors import CorruptRecord
from producer.events import event_body, stamp
from producer.jobs import Ledger
from producer.schema import JobStatus, Timings, Usage
from tests.servers import RedisServer
from worker.engine.work import Outcome, Work
from worker.ops.reconciler import Reconciler
from worker.settings import WorkerSettings
from worker.tasks import Runtime, run_job

pytestmark = pytest.mark.integration
FIELDS = ("id", "status", "queue", "model", "request", "created_at", "sent_at", "attempts",
          "fence", "tokens", "deadline_at", "lease_until", "error", "cancel")


class AnsweringEngine:
    """Answers every job at once with a fixed text; counts what it was given."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def submit(self, work: Work) -> Future[Outcome]:
        self.ran.append(work.job_id)
        done: Future[Outcome] = Future()
        done.set_result(Outcome("ok", "stop", Usage(), Timings()))
        return done


@pytest.fixture(scope="module")
def ledger(own_redis: RedisServer) -> Ledger:
    return Ledger(redis.Redis.from_url(own_redis.url), retention_s=600)


@pytest.fixture(scope="module")
def runtime(ledger: Ledger) -> Runtime:
    return Runtime(settings=WorkerSettings(), ledger=ledger,
                   engine=cast(Any, AnsweringEngine()), worker_id="w-hostile")


def sweeper(ledger: Ledger, sent: list[str], quarantined: list[str]) -> Reconciler:
    return Reconciler(ledger, lambda job_id, _queue: sent.append(job_id), worker_id="w-sweep",
                      interval_s=1, grace_s=1, broker=None, on_quarantine=quarantined.append)


def job(ledger: Ledger, name: str, **fields: bytes | str | None) -> str:
    """A valid QUEUED job, then ``fields`` written into its record (None: deleted)."""
    job_id = f"{name}-{time.monotonic_ns()}"
    assert ledger.create(job_id, build_request(prompt="hi"), "vlmq").created
    for field, value in fields.items():
        if value is None:
            ledger.redis.hdel(keys.job_key(job_id), field)
        else:
            ledger.redis.hset(keys.job_key(job_id), field, value)
    return job_id


def status(ledger: Ledger, job_id: str) -> tuple[str, str | None]:
    state = ledger.state(job_id)
    assert state is not None
    return state.status.value, state.error.code.value if state.error else None


def indexed(ledger: Ledger, job_id: str) -> bool:
    return any(ledger.redis.zscore(index, job_id) is not None
               for index in (keys.QUEUED_INDEX, keys.RUNNING_INDEX))


def test_a_non_utf8_record_is_failed_by_the_sweep_which_goes_on(ledger: Ledger) -> None:
    """Finding 1: a byte that is not UTF-8 neither stops the sweep nor runs the job."""
    bad = job(ledger, "utf8", model=b"\xff")
    good = job(ledger, "fine")
    sent: list[str] = []
    sweeper(ledger, sent, []).sweep(time.time() + 60)
    assert good in sent and bad not in sent
    assert status(ledger, bad) == ("FAILED", "INVALID_REQUEST")
    assert status(ledger, good) == ("QUEUED", None)


def test_the_task_fails_a_non_utf8_record_invalid_request(ledger: Ledger,
                                                            runtime: Runtime) -> None:
    bad = job(ledger, "utf8-task", request=b'{"prompt": "\xff"}')
    assert run_job(runtime, (bad,), {}) == JobStatus.FAILED
    assert status(ledger, bad) == ("FAILED", "INVALID_REQUEST")


@pytest.mark.parametrize("fields", [
    {"fence": "00"}, {"fence": str(2**70)}, {"attempts": "-1"}, {"tokens": "1e3"},
    {"status": "RUNNING", "lease_until": "abc"}, {"deadline_at": "nan"},
    {"deadline_at": "abc"}, {"created_at": "abc"}, {"created_at": None},
])
def test_garbage_numbers_end_the_job_invalid_request(ledger: Ledger, runtime: Runtime,
                                                     fields: dict[str, str | None]) -> None:
    """Findings 2 and 3: the claim (or the task) fails such a job at once; nothing loops."""
    job_id = job(ledger, "numbers", **fields)
    assert run_job(runtime, (job_id,), {}) in ("invalid", JobStatus.FAILED)
    assert status(ledger, job_id) == ("FAILED", "INVALID_REQUEST")
    assert not indexed(ledger, job_id)


def test_reads_stay_typed_on_broken_records(ledger: Ledger, own_redis: RedisServer,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Finding 3: status(), jobs(), stats() and the CLI answer, or raise CorruptRecord."""
    bogus = job(ledger, "bogus", status="BOGUS")
    stale = job(ledger, "stale", error="{not json", created_at="abc")
    bare = job(ledger, "bare", created_at=None, model=b"\xfe")
    with Producer(own_redis.url) as producer:
        with pytest.raises(CorruptRecord):
            producer.status(bogus)
        state = producer.status(stale)
        assert state.error is not None and state.error.code == "INVALID_REQUEST"
        assert state.created_at == 0.0
        assert producer.status(bare).model == "\ufffd"
        listed = {s.job_id for s in producer.jobs(limit=10_000)}
        assert stale in listed and bare in listed and bogus not in listed
        assert producer.stats()["jobs"]["QUEUED"] >= 3
    url = ["--redis-url", own_redis.url]
    assert cli.main([*url, "jobs", "--limit", "10000"]) == 0
    assert cli.main([*url, "status", bogus]) == 9
    assert "unreadable record" in capsys.readouterr().err


def test_an_unknown_status_is_quarantined_once(ledger: Ledger) -> None:
    job_id = job(ledger, "quarantine", status="BOGUS")
    ledger.redis.zadd(keys.RUNNING_INDEX, {job_id: 0})
    quarantined: list[str] = []
    sweep = sweeper(ledger, [], quarantined)
    sweep.sweep(time.time() + 60)
    sweep.sweep(time.time() + 120)
    assert quarantined.count(job_id) == 1  # in both indexes, logged and counted once
    assert not indexed(ledger, job_id)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(FIELDS), st.binary(max_size=12) | st.none(),
                       min_size=1, max_size=4))
def test_arbitrary_bytes_in_any_field_end_or_are_quarantined(
        ledger: Ledger, own_redis: RedisServer, runtime: Runtime,
        fields: dict[str, bytes | None]) -> None:
    job_id = job(ledger, "prop", **fields)
    ledger.redis.zadd(keys.RUNNING_INDEX, {job_id: 0})
    sent: list[str] = []
    sweeper(ledger, sent, []).sweep(time.time() + 60)  # never raises
    with Producer(own_redis.url) as producer:
        producer.jobs(limit=5)
        producer.stats()
        with contextlib.suppress(CorruptRecord):
            producer.status(job_id)
    run_job(runtime, (job_id,), {})  # never raises: the job runs, or ends unrun
    state = ledger.redis.hget(keys.job_key(job_id), "status")
    terminal = state in (b"SUCCEEDED", b"FAILED", b"CANCELLED", b"EXPIRED")
    assert terminal or not indexed(ledger, job_id), (fields, state)


def test_stream_entries_written_around_the_worker_are_passed_over(
        ledger: Ledger, own_redis: RedisServer) -> None:
    job_id = job(ledger, "stream-entries")
    stream = keys.stream_key(job_id)
    delta = stamp(event_body(job_id, "delta", delta="a cat"), 0, 2, 1.0)
    done = stamp(event_body(job_id, "done", finish_reason="stop"), 1, 2, 1.0)
    other = stamp(event_body("another-job", "done", finish_reason="stop"), 1, 2, 1.0)
    for fields in ({"seq": 0, "data": delta}, {"seq": 1, "data": "not json"},
                   {"seq": 1, "nodata": "x"}, {"seq": 1, "data": '{"seq": -1}'},
                   {"seq": 1, "data": other}, {"seq": 1, "data": done}):
        ledger.redis.xadd(stream, fields)  # type: ignore[arg-type]
    with Producer(own_redis.url) as producer:
        streamed = [(e.seq, e.type) for e in producer.stream(job_id, timeout=30)]
        resumed = [(e.seq, e.type) for e in producer.stream(job_id, after=0, timeout=30)]
    assert streamed == [(0, "delta"), (1, "done")] and resumed == [(1, "done")]
    assert [(e.seq, e.type) for e in ledger.events(job_id)] == streamed  # the worker's repair
    assert ledger.stream_so_far(job_id) == ("a cat", 2)
