"""No job lost, none answered twice: real processes killed, stopped, cut off, restarted.

Each test has its own redis-server (AOF, fsync always) and its own worker processes on a
queue of its own, with short leases so that recovery takes seconds."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from demo.servers import RedisServer, WorkerProcess
from producer import Producer
from producer.keys import job_key

pytestmark = pytest.mark.integration
LONG = 1200
FAST = {"VLMQ_LEASE_S": "1.5", "VLMQ_RECONCILE_INTERVAL_S": "0.5", "VLMQ_REQUEUE_GRACE_S": "2",
        "VLMQ_MAX_ATTEMPTS": "3", "VLMQ_SOFT_SHUTDOWN_S": "5"}


class Cluster:
    def __init__(self, path: str, image_server: Any, tmp: str) -> None:
        self.redis = RedisServer("--appendonly", "yes", "--appendfsync", "always")
        self.path, self.image_server, self.tmp = path, image_server, tmp
        self.name = f"fault-{uuid.uuid4().hex[:6]}"
        self.workers: list[WorkerProcess] = []
        self.producer = Producer(self.redis.url)

    def start_worker(self, wait: bool = True, **env: str) -> WorkerProcess:
        worker = WorkerProcess(self.path, self.redis.url, name=self.name, log_dir=self.tmp,
                               image_port=self.image_server.port, env={**FAST, **env},
                               log_name=f"{self.name}-{len(self.workers)}")
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def holder(self, job_id: str) -> WorkerProcess:
        worker_id = self.producer.status(job_id).worker or ""
        pid = int(worker_id.rsplit(":", 1)[1])
        return next(w for w in self.workers if w.proc.pid == pid)

    def submit(self, tokens: int = 8, **options: Any) -> str:
        return str(self.producer.submit(prompt="What do we see?", model=self.name,
                                        images=[self.image_server.url("/cats.png")],
                                        max_new_tokens=tokens, **options))

    def started(self, job_id: str, tokens: int = 3) -> None:
        for event in self.producer.stream(job_id, timeout=60):
            if event.tokens >= tokens or event.terminal:
                return

    def close(self) -> None:
        for worker in self.workers:
            worker.stop(signal.SIGKILL)
        self.producer.close()
        self.redis.stop()


@pytest.fixture()
def cluster(tiny_paths: dict[str, str], image_server: Any,
            tmp_path: Any) -> Iterator[Cluster]:
    built = Cluster(tiny_paths["qwen2_vl"], image_server, str(tmp_path))
    yield built
    built.close()


def assert_once(cluster: Cluster, job_id: str, attempts: int | None = None) -> Any:
    """SUCCEEDED, one terminal event, deltas adding up to the text (nothing sent twice)."""
    result = cluster.producer.result(job_id, timeout=120)
    state = cluster.producer.status(job_id)
    assert state.status == "SUCCEEDED"
    if attempts is not None:
        assert state.attempts == attempts
    events = list(cluster.producer.stream(job_id, timeout=10))
    assert [e.seq for e in events] == list(range(len(events)))
    assert sum(e.terminal for e in events) == 1 and events[-1].terminal
    assert "".join(e.delta for e in events) == result.text
    return result


def test_sigkill_mid_generation_is_completed_by_another_worker(cluster: Cluster) -> None:
    cluster.start_worker()
    cluster.start_worker()
    job_id = cluster.submit(LONG)
    cluster.started(job_id)
    cluster.holder(job_id).stop(signal.SIGKILL)
    result = assert_once(cluster, job_id, attempts=2)
    assert result.usage.completion_tokens == LONG or result.finish_reason == "stop"
    history = cluster.producer.redis.lrange(job_key(job_id) + ":attempts", 0, -1)
    assert len(history) == 2


def test_poison_job_fails_worker_lost_and_the_others_succeed(cluster: Cluster) -> None:
    box: dict[str, str] = {}

    def kill_fetcher(_handler: Any) -> None:  # the poison: fetching its image kills the worker
        while "id" not in box:
            time.sleep(0.01)
        cluster.holder(box["id"]).proc.kill()

    cluster.start_worker()
    cluster.start_worker()
    normal = [cluster.submit() for _ in range(10)]
    url = cluster.image_server.route(f"/poison-{cluster.name}.png", kill_fetcher)
    box["id"] = cluster.producer.submit(prompt="boom", images=[url], model=cluster.name)
    normal += [cluster.submit() for _ in range(10)]
    replaced: set[int] = set()
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and not cluster.producer.status(box["id"]).status.terminal:
        for worker in list(cluster.workers):
            if not worker.alive() and id(worker) not in replaced:
                replaced.add(id(worker))
                cluster.start_worker(wait=False)
        time.sleep(0.3)
    state = cluster.producer.status(box["id"])
    assert state.status == "FAILED" and state.error and state.error.code == "WORKER_LOST"
    assert state.attempts == 3 and len(replaced) == 3
    for job_id in normal:
        assert_once(cluster, job_id)


def test_sigterm_hands_the_job_back_quickly(cluster: Cluster) -> None:
    cluster.start_worker()
    cluster.start_worker()
    job_id = cluster.submit(LONG * 3)
    cluster.started(job_id)
    holder = cluster.holder(job_id)
    started = time.monotonic()
    holder.stop(signal.SIGTERM, timeout=30)
    stopped_in = time.monotonic() - started
    assert holder.proc.returncode is not None
    assert "handed back" in holder.log(), holder.log()[-2000:]
    assert_once(cluster, job_id, attempts=1)  # a hand-back is not a failed attempt
    assert stopped_in < 30


def test_stale_worker_commit_is_refused_by_the_fence(cluster: Cluster) -> None:
    cluster.start_worker()
    cluster.start_worker()
    job_id = cluster.submit(LONG)
    cluster.started(job_id)
    stale = cluster.holder(job_id)
    os.kill(stale.proc.pid, signal.SIGSTOP)  # paused past its lease: another takes over
    try:
        deadline = time.monotonic() + 60
        while cluster.producer.status(job_id).attempts < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.kill(stale.proc.pid, signal.SIGCONT)
    assert_once(cluster, job_id, attempts=2)
    deadline = time.monotonic() + 30
    while "fence" not in stale.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "is stale" in stale.log()


def test_duplicate_delivery_of_a_running_job_is_dropped(cluster: Cluster) -> None:
    cluster.start_worker()
    cluster.start_worker()
    job_id = cluster.submit(LONG)
    cluster.started(job_id)
    cluster.producer.enqueue(job_id, f"vlmq.{cluster.name}")
    assert_once(cluster, job_id, attempts=1)
    assert any(f"job {job_id} not run: busy" in w.log() for w in cluster.workers)


def test_redis_killed_and_restarted_with_aof_loses_nothing(cluster: Cluster) -> None:
    cluster.start_worker()
    cluster.start_worker()
    running = cluster.submit(LONG)
    cluster.started(running)
    backlog = [cluster.submit() for _ in range(50)]
    assert cluster.redis.proc is not None
    cluster.redis.proc.send_signal(signal.SIGKILL)
    cluster.redis.proc.wait(10)
    time.sleep(1.0)
    cluster.redis.start()
    for job_id in [running, *backlog]:
        assert_once(cluster, job_id)


def test_lost_broker_messages_are_sent_again_by_the_reconciler(cluster: Cluster) -> None:
    jobs = [cluster.submit() for _ in range(30)]  # no worker yet: all wait in the queue
    queue = f"vlmq.{cluster.name}"
    client = redis.Redis.from_url(cluster.redis.url)
    assert client.llen(queue) == 30
    client.delete(queue)  # the broker's copy is lost, the ledger survives
    cluster.start_worker()
    for job_id in jobs:
        assert_once(cluster, job_id, attempts=1)


def test_client_connections_killed_mid_job_lose_nothing(cluster: Cluster) -> None:
    cluster.start_worker()
    job_id = cluster.submit(LONG)
    cluster.started(job_id)
    others = [cluster.submit() for _ in range(5)]
    redis.Redis.from_url(cluster.redis.url).client_kill_filter(_type="normal", skipme=True)
    for each in [job_id, *others]:
        assert_once(cluster, each)
