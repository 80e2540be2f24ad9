"""Operator commands against the session's real Redis and workers: jobs, retry, purge, stats.

Jobs sent to a model no worker serves stay QUEUED with their message in the broker list."""

from __future__ import annotations

import io
import json
import time
import uuid
from typing import Any

import pytest
import redis

from producer import JobFailed, Producer
from producer.broker import queue_for_model
from producer.cli import main as vlmq
from producer.client import build_request
from producer.errors import JobNotFound, NotAllowed
from producer.keys import job_key

pytestmark = pytest.mark.integration
MODEL = "tiny-qwen2_vl"


def cli(redis_server: Any, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = vlmq(["--redis-url", redis_server.url, *args])
    return code, capsys.readouterr().out


def failed_job(producer: Producer, image_server: Any) -> tuple[str, str]:
    """A job that fails because its image is missing; the path can be filled in later."""
    path = f"/later-{uuid.uuid4().hex}.png"
    job_id = producer.submit(prompt="What is it?", images=[image_server.url(path)], model=MODEL,
                             max_new_tokens=3)
    with pytest.raises(JobFailed):
        producer.result(job_id, timeout=60)
    return job_id, path


def test_jobs_lists_failed_jobs_newest_first(any_producer: Any, workers: Any,
                                             image_server: Any, redis_server: Any,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    producer = any_producer  # Producer, then AsyncProducer
    older, _ = failed_job(producer, image_server)
    newer, _ = failed_job(producer, image_server)
    listed = [s.job_id for s in producer.jobs("FAILED", limit=2)]
    assert listed == [newer, older]
    assert all(s.status == "FAILED" for s in producer.jobs("FAILED", limit=20))
    assert producer.stats()["jobs"]["FAILED"] >= 2
    code, out = cli(redis_server, capsys, "jobs", "--status", "FAILED", "--limit", "1")
    states = json.loads(out)
    assert code == 0 and [s["job_id"] for s in states] == [newer]
    assert states[0]["error"]["code"] == "IMAGE_NOT_FOUND"


def test_retry_runs_a_failed_job_again_under_the_same_id(
        any_producer: Any, workers: Any, image_server: Any, redis_server: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    producer = any_producer  # Producer, then AsyncProducer
    job_id, path = failed_job(producer, image_server)
    image_server.put(path, image_server.files["/cats.png"][1])  # the image exists now
    code, out = cli(redis_server, capsys, "retry", job_id)
    assert code == 0 and json.loads(out)["job_id"] == job_id
    result = producer.result(job_id, timeout=60)
    state = producer.status(job_id)
    assert state.status == "SUCCEEDED" and state.attempts == 1 and state.error is None
    assert result.usage.completion_tokens == 3
    client = redis.Redis.from_url(redis_server.url)
    history = [json.loads(x) for x in client.lrange(job_key(job_id) + ":attempts", 0, -1)]
    assert [("retry" in h, h.get("attempt")) for h in history] == [
        (False, 1), (True, None), (False, 1)]
    assert history[1]["previous_status"] == "FAILED"
    assert history[1]["error"]["code"] == "IMAGE_NOT_FOUND"
    events = list(producer.stream(job_id, timeout=30))  # the new attempt's stream only
    assert [e.seq for e in events] == list(range(len(events)))
    assert events[-1].type == "done"

    with pytest.raises(NotAllowed, match="only FAILED or EXPIRED"):
        producer.retry(job_id)
    assert cli(redis_server, capsys, "retry", job_id)[0] == 6
    with pytest.raises(JobNotFound):
        producer.retry("no-such-job")


def test_retry_gives_an_expired_job_a_fresh_deadline(producer: Producer,
                                                     redis_server: Any) -> None:
    queue = queue_for_model(f"nobody-{uuid.uuid4().hex}")
    job_id = uuid.uuid4().hex
    producer.ledger.create(job_id, build_request(prompt="hi", ttl_s=0.05), queue)
    time.sleep(0.1)  # past its deadline: the claim expires it
    assert producer.ledger.claim(job_id, "w", lease_s=5, max_attempts=3).outcome == "expired"
    old_deadline = producer.status(job_id).deadline_at
    state = producer.retry(job_id)
    assert state.status == "QUEUED" and state.attempts == 0 and state.finish_reason is None
    assert state.deadline_at is not None and old_deadline is not None
    assert state.deadline_at > old_deadline
    assert producer.queue_depth(queue) == 1  # its task was sent again
    producer.purge(queue)


def test_purge_deletes_messages_and_cancels_queued_jobs_only(
        producer: Producer, redis_server: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    model = f"nobody-{uuid.uuid4().hex[:8]}"
    queue = queue_for_model(model)
    waiting = [producer.submit(prompt="hi", model=model, require_worker=False)
               for _ in range(2)]
    running = uuid.uuid4().hex  # a RUNNING job of the same queue is left alone
    producer.ledger.create(running, build_request(prompt="hi", model=model), queue)
    assert producer.ledger.claim(running, "w", lease_s=60, max_attempts=3).outcome == "claimed"
    assert producer.queue_depth(queue) == 2

    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    assert cli(redis_server, capsys, "purge", queue)[0] == 1  # not confirmed: nothing changes
    assert producer.queue_depth(queue) == 2
    assert {producer.status(j).status for j in waiting} == {"QUEUED"}

    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    code, out = cli(redis_server, capsys, "purge", queue)
    summary = json.loads(out)
    assert code == 0 and summary["messages_deleted"] == 2 and summary["jobs_cancelled"] == 2
    assert sorted(summary["job_ids"]) == sorted(waiting)
    assert producer.queue_depth(queue) == 0
    for job_id in waiting:
        state = producer.status(job_id)  # the record stays, CANCELLED
        assert state.status == "CANCELLED" and state.finish_reason == "cancelled"
    assert producer.status(running).status == "RUNNING"
    assert not producer.status(running).cancel_requested
    assert producer.purge(queue)["messages_deleted"] == 0  # --yes path, nothing left


def test_stats_show_depths_oldest_job_counts_and_workers(
        producer: Producer, workers: Any, redis_server: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    model = f"nobody-{uuid.uuid4().hex[:8]}"
    queue = queue_for_model(model)
    first = producer.submit(prompt="hi", model=model, require_worker=False)
    producer.submit(prompt="hi", model=model, require_worker=False)
    ok = producer.submit(prompt="hi", model=MODEL, max_new_tokens=2)
    producer.result(ok, timeout=60)
    try:
        code, out = cli(redis_server, capsys, "stats")
        stats = json.loads(out)
        assert code == 0
        assert stats["queues"][queue] == 2
        assert stats["queues"][f"q-{MODEL}"] == 0  # a live worker's queue, nothing waiting
        oldest = stats["oldest_queued"]
        assert oldest is not None and oldest["age_s"] >= 0
        assert producer.status(oldest["job_id"]).created_at <= producer.status(first).created_at
        assert stats["jobs"]["QUEUED"] >= 2 and stats["jobs"]["SUCCEEDED"] >= 1
        assert set(stats["jobs"]) == {"QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED",
                                      "EXPIRED"}
        live = {w["model"]: w for w in stats["workers"]}
        assert live[MODEL]["consuming"] is True
    finally:
        producer.purge(queue)
