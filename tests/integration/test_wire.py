"""The worker takes JSON task messages only: a forged pickle or YAML message on the real broker
is refused before its body is decoded, logged, dropped (not redelivered), and the worker keeps
serving. The payloads are live: decoded the unsafe way, each creates its marker file."""

from __future__ import annotations

import os
import pickle
import shlex
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from celery import Celery
from kombu import Connection

from producer.broker import broker_queue
from tests.integration.test_failures import MODEL, assert_serving
from tests.waiting import eventually

pytestmark = pytest.mark.integration
QUEUE = f"q-{MODEL}"


class Touch:
    """Unpickling this runs ``os.system("touch <path>")``: what a pickle gadget does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.path))}",)


def pickle_body(marker: Path) -> tuple[bytes, str]:
    return pickle.dumps(((Touch(marker),), {}, {})), "application/x-python-serialize"


def yaml_body(marker: Path) -> tuple[bytes, str]:
    command = f"touch {shlex.quote(str(marker))}"
    return f"- !!python/object/apply:os.system [{command!r}]\n- {{}}\n- {{}}\n".encode(), \
        "application/x-yaml"


def forge(url: str, job_id: str, body: bytes, content_type: str) -> None:
    """Put a task message for ``vlmq.generate`` on the worker's queue as any Celery client would,
    with Celery's own protocol-2 headers, and ``body`` in ``content_type``."""
    headers = Celery(broker=url, set_as_current=False).amqp.as_task_v2(
        job_id, "vlmq.generate", args=[job_id]).headers
    queue = broker_queue(QUEUE, url)
    with Connection(url) as conn:
        conn.Producer().publish(body, exchange=queue.exchange, routing_key=QUEUE,
                                headers=headers, content_type=content_type,
                                content_encoding="binary", declare=[queue])


def refusals(log: str, content_type: str) -> int:
    """Refusals of ``content_type`` in a worker log (Celery's line names kombu's reason)."""
    name = {"application/x-python-serialize": "pickle", "application/x-yaml": "yaml"}
    return log.count("Received invalid task message: Refusing to deserialize untrusted content "
                     f"of type {name[content_type]} ({content_type})")


@pytest.mark.parametrize("build,unsafe_load", [
    (pickle_body, pickle.loads),
    (yaml_body, lambda body: yaml.unsafe_load(body.decode())),
], ids=["pickle", "yaml"])
def test_forged_message_is_refused_dropped_and_never_decoded(
        build: Any, unsafe_load: Any, workers: Any, producer: Any, image_server: Any,
        redis_server: Any, tmp_path: Path) -> None:
    control = tmp_path / "control"
    unsafe_load(build(control)[0])  # the gadget is live: decoded unsafely, it runs
    assert control.exists()

    worker = workers["qwen2_vl"]
    marker = tmp_path / "pwned"
    body, content_type = build(marker)
    job_id = uuid.uuid4().hex
    before = refusals(worker.log(), content_type)
    forge(redis_server.url, job_id, body, content_type)
    eventually(lambda: refusals(worker.log(), content_type) > before, timeout=30,
               what=f"the worker refuses the {content_type} message")
    log = worker.log()
    assert refusals(log, content_type) == before + 1, log[-3000:]

    client = redis.Redis.from_url(redis_server.url)
    time.sleep(1.0)  # a redelivery or a late decode would show by now
    assert not marker.exists()
    waiting = client.lrange(QUEUE, 0, -1) + client.hvals("unacked")
    assert not [m for m in waiting if job_id.encode() in m], "the message was not dropped"
    assert refusals(worker.log(), content_type) == before + 1  # refused once, not again
    assert_serving(producer, image_server)
    assert worker.alive() and not marker.exists()
