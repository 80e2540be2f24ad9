"""A submit whose outcome is unknown names its job; a submit with an idempotency key is safe to
send again. Real Redis behind a loopback proxy that loses the replies (the write is done)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from producer import Producer, SubmitUncertain
from tests.proxy import Proxy
from tests.servers import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture()
def cut() -> Iterator[tuple[Producer, Proxy]]:
    server = RedisServer()
    proxy = Proxy(server.port)
    producer = Producer(proxy.url(), broker_url=server.url)
    yield producer, proxy
    producer.close()
    proxy.close()
    server.stop()


def test_a_submit_whose_reply_is_lost_names_its_job_and_retries_safely(
        cut: tuple[Producer, Proxy]) -> None:
    producer, proxy = cut
    producer.submit(prompt="hi", model="nobody", require_worker=False)  # script loaded
    proxy.mode = "lose_replies"  # Redis writes the record; the producer never hears back
    with pytest.raises(SubmitUncertain) as raised:
        producer.submit(prompt="hi", model="nobody", idempotency_key="order-17",
                        require_worker=False)
    job_id = raised.value.job_id
    assert job_id in str(raised.value) and "idempotency_key" in str(raised.value)
    proxy.mode = "pass"
    assert producer.status(job_id).status == "QUEUED"  # it was accepted after all
    again = producer.submit(prompt="hi", model="nobody", idempotency_key="order-17",
                            require_worker=False)
    assert again == job_id  # the documented retry: the same job, not a second one


def test_a_model_no_live_worker_serves_is_refused_unless_asked(
        cut: tuple[Producer, Proxy]) -> None:
    import os
    import subprocess
    import sys

    from producer import NoWorkerForModel, keys
    from producer.broker import queue_for_model

    producer, proxy = cut
    with pytest.raises(NoWorkerForModel, match="require_worker=False"):
        producer.submit(prompt="hi", model="nobody")
    assert producer.redis.zcard(keys.QUEUED_INDEX) == 0  # nothing was written
    cli = subprocess.run([sys.executable, "-m", "producer", "submit", "--prompt", "hi",
                          "--model", "nobody"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, VLMQ_REDIS_URL=proxy.url()))
    assert cli.returncode == 12 and "no live worker serves model nobody" in cli.stderr
    queued = producer.submit(prompt="hi", model="nobody", require_worker=False)
    assert producer.status(queued).status == "QUEUED"
    producer.redis.set(keys.serving_key(queue_for_model("nobody")), "w", ex=60)  # a worker's
    assert producer.status(producer.submit(prompt="hi", model="nobody")).status == "QUEUED"
