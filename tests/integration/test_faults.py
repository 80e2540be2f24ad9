"""No job lost, none answered twice: real processes killed, stopped, cut off, restarted.

The module's cluster has its own redis-server (AOF, fsync always) and worker processes on a
queue of its own, with short leases so that recovery takes seconds. Its tests share it: each
starts from two live workers (``ensure_workers``: the survivors of the tests before, topped up),
so a worker process is started only where a test killed one. A test that needs the queue with
no worker consuming gets a cluster of its own."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.integration.cluster import (
    Cluster,
    assert_once,
    sigkill_mid_job_is_recovered,
    stream_events,
)
from tests.waiting import eventually

pytestmark = pytest.mark.integration
# tokens: a job still running when the test acts on it (after its first 3), which the worker
# taking it over generates again in full; each of these tokens costs every such test once more
LONG = 600


@pytest.fixture(scope="module")
def shared(tiny_paths: dict[str, str], image_server: Any,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    built = Cluster(tiny_paths["qwen2_vl"], image_server, str(tmp_path_factory.mktemp("faults")))
    yield built
    built.close()


@pytest.fixture()
def cluster(shared: Cluster) -> Cluster:
    """The module's cluster with two live, ready workers."""
    shared.ensure_workers(2)
    return shared


@pytest.fixture()
def idle_cluster(tiny_paths: dict[str, str], image_server: Any,
                 tmp_path: Any) -> Iterator[Cluster]:
    """A cluster of the test's own, with no worker until the test starts one."""
    built = Cluster(tiny_paths["qwen2_vl"], image_server, str(tmp_path))
    yield built
    built.close()


def test_sigkill_mid_generation_is_completed_by_another_worker(cluster: Cluster) -> None:
    sigkill_mid_job_is_recovered(cluster, LONG)


@pytest.mark.parametrize("seed", [None, 7])
def test_sampling_job_taken_over_restarts_its_stream_unless_seeded(
        cluster: Cluster, seed: int | None) -> None:
    job_id = cluster.submit(LONG, do_sample=True, seed=seed)
    for event in cluster.producer.stream(job_id, timeout=60):  # some text went out
        if event.delta or event.terminal:
            break
    assert not event.terminal
    cluster.holder(job_id).stop(signal.SIGKILL)
    result = assert_once(cluster, job_id, attempts=2)  # what the stream adds up to: the text
    events = stream_events(cluster, job_id)
    restarts = [e for e in events if e.type == "restart"]
    if seed is None:  # attempt 2 draws other tokens: it says so, then streams its own text
        assert [(e.attempt, e.from_seq) for e in restarts] == [(2, 0)]
        assert "".join(e.delta for e in events[events.index(restarts[0]):]) == result.text
        yielded = list(cluster.producer.stream(job_id, timeout=10))  # a reader from the start
        assert "".join(e.delta for e in yielded) == result.text
    else:  # the seed replays attempt 1's tokens: the text goes on, as for greedy jobs
        assert restarts == [] and "".join(e.delta for e in events) == result.text


def test_poison_job_fails_worker_lost_and_the_others_succeed(cluster: Cluster) -> None:
    replaced = {id(worker) for worker in cluster.workers if not worker.alive()}  # earlier tests'
    lost_before = len(replaced)
    box: dict[str, str] = {}

    def kill_fetcher(_handler: Any) -> None:  # the poison: fetching its image kills the worker
        eventually(lambda: "id" in box, timeout=30, interval=0.01)
        cluster.holder(box["id"]).proc.kill()

    normal = [cluster.submit() for _ in range(10)]
    url = cluster.image_server.route(f"/poison-{cluster.name}.png", kill_fetcher)
    box["id"] = cluster.producer.submit(prompt="boom", images=[url], model=cluster.name)
    normal += [cluster.submit() for _ in range(10)]

    def poison_settled() -> bool:  # and each worker it killed replaced meanwhile
        for worker in list(cluster.workers):
            if not worker.alive() and id(worker) not in replaced:
                replaced.add(id(worker))
                cluster.start_worker(wait=False)
        return cluster.producer.status(box["id"]).status.terminal

    eventually(poison_settled, timeout=150, interval=0.3)
    state = cluster.producer.status(box["id"])
    assert state.status == "FAILED" and state.error and state.error.code == "WORKER_LOST"
    assert state.attempts == 3 and len(replaced) - lost_before == 3
    for job_id in normal:
        assert_once(cluster, job_id)


def test_sigterm_hands_the_job_back_quickly(cluster: Cluster) -> None:
    job_id = cluster.submit(LONG)
    cluster.started(job_id)
    holder = cluster.holder(job_id)
    holder.stop(signal.SIGTERM, timeout=30)  # past 30 s: SIGKILLed (returncode -9)
    assert holder.proc.returncode == 0, holder.log()[-2000:]  # on its own, within the soft
    log = holder.log()  # shutdown time (5 s here) plus the drain
    assert "handed back" in log, log[-2000:]
    assert log.count(f"job {job_id} RUNNING") == 1, log[-2000:]  # never claimed again here
    result = assert_once(cluster, job_id, attempts=1)  # a hand-back is not a failed attempt
    assert not result.worker.endswith(f":{holder.proc.pid}")  # another worker finished it


def test_stale_worker_commit_is_refused_by_the_fence(cluster: Cluster) -> None:
    job_id = cluster.submit(LONG)
    cluster.started(job_id)
    stale = cluster.holder(job_id)
    os.kill(stale.proc.pid, signal.SIGSTOP)  # paused past its lease: another takes over
    try:
        eventually(lambda: cluster.producer.status(job_id).attempts >= 2, timeout=60,
                   what="another worker takes the job over")
    finally:
        os.kill(stale.proc.pid, signal.SIGCONT)
    assert_once(cluster, job_id, attempts=2)
    eventually(lambda: "fence" in stale.log(), timeout=30, what="the stale worker's commit")
    assert "is stale" in stale.log()


def test_duplicate_delivery_of_a_running_job_is_dropped(cluster: Cluster) -> None:
    job_id = cluster.submit(LONG)
    cluster.started(job_id)
    cluster.producer.enqueue(job_id, f"vlmq.{cluster.name}")
    assert_once(cluster, job_id, attempts=1)
    assert any(f"job {job_id} not run: busy" in w.log() for w in cluster.workers)


def test_redis_killed_and_restarted_with_aof_loses_nothing(cluster: Cluster) -> None:
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
    for worker in cluster.workers[-2:]:  # they reconnected and go on serving, model loaded
        assert worker.alive() and "Unrecoverable error" not in worker.log(), worker.log()[-3000:]


def test_lost_broker_messages_are_sent_again_by_the_reconciler(idle_cluster: Cluster) -> None:
    cluster = idle_cluster
    jobs = [cluster.submit() for _ in range(30)]  # no worker yet: all wait in the queue
    queue = f"vlmq.{cluster.name}"
    client = redis.Redis.from_url(cluster.redis.url)
    assert client.llen(queue) == 30
    client.delete(queue)  # the broker's copy is lost, the ledger survives
    cluster.start_worker()
    for job_id in jobs:
        assert_once(cluster, job_id, attempts=1)


def test_client_connections_killed_mid_job_lose_nothing(cluster: Cluster) -> None:
    job_id = cluster.submit(LONG)
    cluster.started(job_id)
    others = [cluster.submit() for _ in range(5)]
    redis.Redis.from_url(cluster.redis.url).client_kill_filter(_type="normal", skipme=True)
    for each in [job_id, *others]:
        assert_once(cluster, each)
