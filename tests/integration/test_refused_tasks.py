"""The worker runs only ``vlmq.generate`` with one job id: raw kombu messages on the real broker
for ``celery.map`` and for ``vlmq.generate`` with callbacks, errbacks, a chain or a chord, or
with other arguments, are refused unrun, dropped, counted, and the worker keeps serving."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection

from producer.broker import broker_queue
from tests.integration.test_failures import MODEL, assert_serving
from tests.integration.test_ops import scrape
from tests.waiting import eventually

pytestmark = pytest.mark.integration
QUEUE = f"q-{MODEL}"


def send_raw(url: str, name: str, args: list[Any], **options: Any) -> str:
    """A protocol-2 JSON task message as any Celery client would put it on the worker's queue."""
    task_id = uuid.uuid4().hex
    message = Celery(broker=url, set_as_current=False).amqp.as_task_v2(
        task_id, name, args=args, **options)
    queue = broker_queue(QUEUE, url)
    with Connection(url) as conn:
        conn.Producer().publish(json.dumps(message.body), exchange=queue.exchange,
                                routing_key=QUEUE, headers=message.headers,
                                content_type="application/json", content_encoding="utf-8",
                                declare=[queue])
    return task_id


def generate(job_id: str) -> dict[str, Any]:
    """A signature of ``vlmq.generate`` for ``job_id`` (what a callback or a map would run)."""
    return {"task": "vlmq.generate", "args": [job_id], "kwargs": {}, "options": {},
            "subtask_type": None, "immutable": False}


def refused(port: int) -> dict[str, float]:
    return {dict(labels).get("reason", ""): value for (name, labels), value in scrape(port).items()
            if name == "vlmq_messages_refused_total"}


@pytest.mark.parametrize("case", ["map", "callbacks", "errbacks", "chain", "chord", "kwargs"])
def test_messages_other_than_one_job_id_are_refused_unrun(
        case: str, workers: Any, producer: Any, image_server: Any, redis_server: Any) -> None:
    worker = workers["qwen2_vl"]
    ran = [f"never{i}x{uuid.uuid4().hex[:8]}" for i in range(3)]  # no records: a run logs them
    first, other = ran[0], generate(ran[1])
    name, args, options, reason = {
        "map": ("celery.map", [generate(first), [[i] for i in ran]], {}, "unknown_task"),
        "callbacks": ("vlmq.generate", [first], {"callbacks": [other]}, "callbacks"),
        "errbacks": ("vlmq.generate", [first], {"errbacks": [other]}, "callbacks"),
        "chain": ("vlmq.generate", [first], {"chain": [other]}, "callbacks"),
        "chord": ("vlmq.generate", [first], {"chord": other}, "callbacks"),
        "kwargs": ("vlmq.generate", [first], {"kwargs": {"job_id": ran[2]}}, "malformed"),
    }[case]
    before = refused(worker.metrics_port).get(reason, 0.0)
    task_id = send_raw(redis_server.url, name, args, **options)
    eventually(lambda: refused(worker.metrics_port).get(reason, 0.0) == before + 1, timeout=30,
               what=f"the worker refuses and counts the {case} message")
    time.sleep(1.0)  # a callback, a redelivery or an inline run would show by now
    log = worker.log()
    assert not [job_id for job_id in ran if f"job {job_id}" in log], log[-3000:]
    client = redis.Redis.from_url(redis_server.url)
    waiting = client.lrange(QUEUE, 0, -1) + client.hvals("unacked")
    assert not [m for m in waiting if task_id.encode() in m], "the message was not dropped"
    assert refused(worker.metrics_port).get(reason, 0.0) == before + 1
    assert_serving(producer, image_server)
