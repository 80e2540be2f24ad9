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
    producer.submit(prompt="hi", model="nobody")  # a connection open, the script loaded
    proxy.mode = "lose_replies"  # Redis writes the record; the producer never hears back
    with pytest.raises(SubmitUncertain) as raised:
        producer.submit(prompt="hi", model="nobody", idempotency_key="order-17")
    job_id = raised.value.job_id
    assert job_id in str(raised.value) and "idempotency_key" in str(raised.value)
    proxy.mode = "pass"
    assert producer.status(job_id).status == "QUEUED"  # it was accepted after all
    again = producer.submit(prompt="hi", model="nobody", idempotency_key="order-17")
    assert again == job_id  # the documented retry: the same job, not a second one
