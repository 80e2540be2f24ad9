"""A small vlmq cluster of real parts for fault tests: its own redis-server (AOF), worker
processes with short leases on queues of their own, a producer; optionally RabbitMQ as the
broker (the ledger and the streams stay on Redis)."""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from typing import Any

import pytest

from producer import Producer, keys
from producer.events import parse_event, text_of
from tests.proxy import Proxy
from tests.servers import RedisServer, WorkerProcess

FAST = {"VLMQ_LEASE_S": "1.5", "VLMQ_RECONCILE_INTERVAL_S": "0.5", "VLMQ_REQUEUE_GRACE_S": "2",
        "VLMQ_MAX_ATTEMPTS": "3", "VLMQ_SOFT_SHUTDOWN_S": "5"}
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


class Cluster:
    def __init__(self, path: str, image_server: Any, tmp: str, broker_url: str | None = None,
                 fsync: str = "always", proxied: bool = False) -> None:
        self.redis = RedisServer("--appendonly", "yes", "--appendfsync", fsync)
        # workers reach Redis through a loopback proxy that can cut their connections
        self.proxy = Proxy(self.redis.port) if proxied else None
        self.path, self.image_server, self.tmp = path, image_server, tmp
        self.broker_url = broker_url
        self.name = f"fault-{uuid.uuid4().hex[:6]}"
        self.serving_at_start: set[int] = set()  # worker pids alive when a soak began
        self.workers: list[WorkerProcess] = []
        self.producer = Producer(self.redis.url, broker_url=broker_url)

    @property
    def queue(self) -> str:
        """The queue this cluster's jobs go to (the model's queue)."""
        return f"vlmq.{self.name}"

    def start_worker(self, wait: bool = True, **env: str) -> WorkerProcess:
        broker = {"VLMQ_BROKER_URL": self.broker_url} if self.broker_url else {}
        url = self.proxy.url() if self.proxy is not None else self.redis.url
        worker = WorkerProcess(self.path, url, name=self.name, log_dir=self.tmp,
                               image_port=self.image_server.port,
                               env={**FAST, **broker, **env},
                               log_name=f"{self.name}-{len(self.workers)}")
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def ensure_workers(self, count: int) -> list[WorkerProcess]:
        """At least ``count`` live workers, all ready: the ones still alive from earlier tests of
        a shared cluster, and new ones for what is missing (started together, then awaited)."""
        live = [worker for worker in self.workers if worker.alive()]
        live += [self.start_worker(wait=False) for _ in range(count - len(live))]
        for worker in live:
            worker.wait_ready()
        return live

    def holder(self, job_id: str) -> WorkerProcess:
        worker_id = self.producer.status(job_id).worker or ""
        pid = int(worker_id.rsplit(":", 1)[1])
        return next(w for w in self.workers if w.proc.pid == pid)

    def submit(self, tokens: int = 8, **options: Any) -> str:
        options.setdefault("require_worker", False)  # idle clusters queue before a worker
        return str(self.producer.submit(prompt="What do we see?", model=self.name,
                                        images=[self.image_server.url("/cats.png")],
                                        max_new_tokens=tokens, **options))

    def started(self, job_id: str, tokens: int = 3) -> None:
        for event in self.producer.stream(job_id, timeout=60):
            if event.tokens >= tokens or event.terminal:
                return

    def close(self) -> None:
        WorkerProcess.stop_all(self.workers, signal.SIGKILL)
        if self.proxy is not None:
            self.proxy.close()
        self.producer.close()
        self.redis.stop()
        if self.broker_url:
            delete_amqp_queues(self.broker_url, [self.queue, f"q-{self.name}"])


def stream_events(cluster: Cluster, job_id: str) -> list[Any]:
    """Every event the job's stream holds (Producer.stream leaves out voided deltas)."""
    return [parse_event(fields) for _id, fields in
            cluster.producer.redis.xrange(keys.stream_key(job_id))]


def assert_once(cluster: Cluster, job_id: str, attempts: int | None = None) -> Any:
    """SUCCEEDED, one terminal event, deltas adding up to the text (nothing sent twice)."""
    result = cluster.producer.result(job_id, timeout=120)
    state = cluster.producer.status(job_id)
    assert state.status == "SUCCEEDED"
    if attempts is not None:
        assert state.attempts == attempts
    events = stream_events(cluster, job_id)
    assert [e.seq for e in events] == list(range(len(events)))
    assert sum(e.terminal for e in events) == 1 and events[-1].terminal
    assert text_of(events) == result.text  # restarts applied (none for greedy or seeded)
    return result


def sigkill_mid_job_is_recovered(cluster: Cluster, tokens: int) -> None:
    """Two workers; the one running a long job is SIGKILLed mid-generation; the other
    completes it: one result, attempts 2, both attempts in the history."""
    cluster.ensure_workers(2)
    job_id = cluster.submit(tokens)
    cluster.started(job_id)
    cluster.holder(job_id).stop(signal.SIGKILL)
    result = assert_once(cluster, job_id, attempts=2)
    assert result.usage.completion_tokens == tokens or result.finish_reason == "stop"
    assert len(cluster.producer.redis.lrange(f"vlmq:job:{job_id}:attempts", 0, -1)) == 2
    events = list(cluster.producer.stream(job_id, timeout=10))
    assert "".join(e.delta for e in events) == result.text  # greedy: the text went on
    assert not [e for e in events if e.type == "restart"]


def delete_amqp_queues(url: str, names: list[str]) -> None:
    """Delete this test's queues and their exchanges from RabbitMQ (they are durable)."""
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        channel = conn.channel()
        for name in names:
            with contextlib.suppress(Exception):
                channel.queue_delete(name)
            with contextlib.suppress(Exception):
                channel.exchange_delete(name)


def amqp_url() -> str:
    """The RabbitMQ to test against, or skip (fail under CI=true) when none answers."""
    from kombu import Connection

    url = os.environ.get("VLMQ_TEST_AMQP_URL", AMQP_URL)
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as error:
        reason = f"no RabbitMQ reachable at {url.split('@')[-1]} ({error})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires it")
        pytest.skip(reason)
    return url
