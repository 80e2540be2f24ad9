"""The reconciler's decisions against a real Redis ledger, at chosen times (``sweep(now)``).

The broker is represented by what the reconciler asks of it: the messages it sends are recorded
and, for a broker that is not Redis, ``depth`` answers a queue's ready messages."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from producer.client import build_request
from producer.jobs import Ledger, connect
from tests.servers import RedisServer
from worker.ops.reconciler import Depth, Reconciler

pytestmark = pytest.mark.integration
GRACE = 10.0


@pytest.fixture()
def ledger() -> Iterator[Ledger]:
    server = RedisServer()
    client = connect(server.url)
    yield Ledger(client)
    client.close()
    server.stop()


def reconciler(ledger: Ledger, sent: list[tuple[str, str]], depth: Depth | None) -> Reconciler:
    return Reconciler(ledger, lambda job_id, queue: sent.append((job_id, queue)),
                      worker_id="w-test", interval_s=1, grace_s=GRACE, broker=None, depth=depth)


def create(ledger: Ledger, job_id: str, queue: str = "vlmq.a") -> str:
    created, _ = ledger.create(job_id, build_request(prompt="hi"), queue)
    assert created
    return job_id


def test_a_lease_expired_job_is_sent_once_then_once_per_grace_period(ledger: Ledger) -> None:
    sent: list[tuple[str, str]] = []
    sweeper = reconciler(ledger, sent, depth=None)
    create(ledger, "job1")
    start = time.time()
    assert ledger.claim("job1", "w-dead", lease_s=1, max_attempts=3).outcome == "claimed"
    sweeper.sweep(start + 0.5)  # lease still holds
    assert sent == []
    sweeper.sweep(start + 2)  # lease ran out: sent at once
    assert sent == [("job1", "vlmq.a")]
    for later in (2.5, 5, 11):  # not again within the grace period
        sweeper.sweep(start + later)
    assert len(sent) == 1
    sweeper.sweep(start + 2 + GRACE + 0.1)  # still unclaimed a grace period later: again
    assert len(sent) == 2


def test_amqp_count_resends_only_as_many_as_are_missing_oldest_first(ledger: Ledger) -> None:
    ids = [create(ledger, f"job{i}") for i in range(5)]
    create(ledger, "other", queue="vlmq.b")
    answers = {"vlmq.a": 3, "vlmq.b": 1}
    sent: list[tuple[str, str]] = []
    sweeper = reconciler(ledger, sent, depth=answers.get)
    later = time.time() + GRACE + 1
    sweeper.sweep(later)  # 5 QUEUED for vlmq.a, 3 messages waiting: the 2 oldest are missing
    assert sent == [(ids[0], "vlmq.a"), (ids[1], "vlmq.a")]
    answers["vlmq.a"] = 5  # their new messages are in the queue now
    sweeper.sweep(later + GRACE + 1)
    assert len(sent) == 2


def test_amqp_depth_unknown_resends_every_stale_job(ledger: Ledger) -> None:
    ids = [create(ledger, f"job{i}") for i in range(3)]
    sent: list[tuple[str, str]] = []
    reconciler(ledger, sent, depth=lambda _queue: None).sweep(time.time() + GRACE + 1)
    assert sorted(job_id for job_id, _queue in sent) == ids


def test_a_record_with_garbage_times_does_not_stop_the_sweep(ledger: Ledger) -> None:
    bad, good = create(ledger, "bad"), create(ledger, "good")
    ledger.redis.hset(f"vlmq:job:{bad}", "sent_at", "soon")  # written around the producer
    create(ledger, "running")
    assert ledger.claim("running", "w-dead", lease_s=1, max_attempts=3).outcome == "claimed"
    ledger.redis.hset("vlmq:job:running", "sent_at", "later")
    sent: list[tuple[str, str]] = []
    reconciler(ledger, sent, depth=None).sweep(time.time() + GRACE + 1)
    assert sent == [(good, "vlmq.a")]  # the others end unrun: their records are unreadable
    state = ledger.state(bad)  # ("running" is failed once its lease really runs out)
    assert state is not None and state.status == "FAILED"
    assert state.error is not None and state.error.code == "INVALID_REQUEST"


def test_a_queued_job_past_its_deadline_is_expired_not_sent(ledger: Ledger) -> None:
    from producer import keys
    from tests.waiting import eventually

    sent: list[tuple[str, str]] = []
    sweeper = reconciler(ledger, sent, depth=None)
    created, _ = ledger.create("late", build_request(prompt="hi", ttl_s=0.2), "vlmq.nobody")
    waiting = create(ledger, "waiting")
    assert created and 0 < ledger.redis.ttl(keys.job_key("late")) <= 7 * 86_400  # retention
    deadline = ledger.state("late").deadline_at  # type: ignore[union-attr]
    eventually(lambda: time.time() > deadline, what="the deadline passes")
    counts = sweeper.sweep(time.time() + GRACE)  # no worker serves the queue
    assert counts["expired"] == 1 and sent == [(waiting, "vlmq.a")]  # only the other re-sent
    state = ledger.state("late")
    assert state is not None and state.status == "EXPIRED" and state.finish_reason == "deadline"
    events = ledger.events("late")
    assert [(e.seq, e.type, e.finish_reason) for e in events] == [(0, "cancelled", "deadline")]
    assert ledger.claim("late", "w", 5, 3).outcome == "terminal"  # a late message: dropped
