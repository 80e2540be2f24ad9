"""RabbitMQ as the Celery broker; the ledger and the token streams stay on Redis.

Needs a RabbitMQ (``VLMQ_TEST_AMQP_URL``, default amqp://guest:guest@127.0.0.1:5672//): skipped
with the reason when none answers, except under ``CI=true``, where that fails. Each test uses
queues of its own (quorum queues, as ``producer.client.broker_queue`` declares them) and deletes
them afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection

from tests.integration.cluster import (
    Cluster,
    amqp_url,
    assert_once,
    sigkill_mid_job_is_recovered,
)
from tests.integration.soak import SOAK_JOBS, check_soak, run_soak

pytestmark = pytest.mark.integration
# tokens: a job still running when the test acts on it (after its first 3), which the worker
# taking it over generates again in full; each of these tokens costs every such test once more
LONG = 600


@pytest.fixture(scope="module")
def rabbitmq() -> str:
    return amqp_url()  # skips (fails under CI=true) before any other fixture is built


@pytest.fixture(scope="module")
def cluster(rabbitmq: str, tiny_paths: dict[str, str], image_server: Any,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Shared by the module's tests: each asks for the live workers it needs
    (``ensure_workers``), so a worker process is started only where a test killed one."""
    built = Cluster(tiny_paths["qwen2_vl"], image_server, str(tmp_path_factory.mktemp("amqp")),
                    broker_url=rabbitmq, fsync="everysec")
    yield built
    built.close()


@pytest.fixture()
def idle_cluster(rabbitmq: str, tiny_paths: dict[str, str], image_server: Any,
                 tmp_path: Any) -> Iterator[Cluster]:
    """A cluster of the test's own, with no worker until the test starts one."""
    built = Cluster(tiny_paths["qwen2_vl"], image_server, str(tmp_path), broker_url=rabbitmq,
                    fsync="everysec")
    yield built
    built.close()


def _declare_classic(url: str, queue: str) -> None:
    with Connection(url) as conn:
        conn.channel().queue_declare(queue=queue, durable=True, auto_delete=False)


def test_job_end_to_end_over_rabbitmq(cluster: Cluster) -> None:
    worker = cluster.ensure_workers(1)[0]
    job_id = cluster.submit()
    assert_once(cluster, job_id, attempts=1)
    assert "Connected to amqp://" in worker.log()
    # the message went through RabbitMQ, not Redis: no broker list or unacked hash in Redis
    assert cluster.producer.redis.exists(cluster.queue, "unacked", "unacked_index") == 0
    # the queue is a quorum queue: declaring it again as a classic queue is refused
    assert cluster.broker_url
    with pytest.raises(Exception, match="x-queue-type"):
        _declare_classic(cluster.broker_url, cluster.queue)


def test_sigkill_mid_job_is_recovered_over_rabbitmq(cluster: Cluster) -> None:
    sigkill_mid_job_is_recovered(cluster, LONG)


def test_purged_rabbitmq_queue_is_sent_again_by_the_reconciler(idle_cluster: Cluster) -> None:
    cluster = idle_cluster
    jobs = [cluster.submit() for _ in range(20)]  # no worker yet: all wait in the queue
    assert cluster.broker_url
    with Connection(cluster.broker_url) as conn:
        assert conn.channel().queue_purge(cluster.queue) == 20  # the broker's copies are lost
    worker = cluster.start_worker()
    for job_id in jobs:
        assert_once(cluster, job_id, attempts=1)
    assert "'message_lost': " in worker.log()


@pytest.mark.chaos
@pytest.mark.timeout(300 + SOAK_JOBS)
def test_soak_sigkill_workers_rabbitmq_broker(cluster: Cluster) -> None:
    check_soak(run_soak(cluster, SOAK_JOBS), "rabbitmq broker")
