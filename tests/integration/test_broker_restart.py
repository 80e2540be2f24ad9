"""kombu's path that made a worker exit when its broker Redis died with messages in hand:
closing a channel whose connection is gone raised AttributeError (worker/ops/unacked.py).
A real redis-server and kombu; the worker-level test is in test_faults (Redis SIGKILLed under
load, restarted: every job ends, every worker is still alive)."""

from __future__ import annotations

from typing import Any

import pytest
from kombu import Connection, Exchange, Queue

from tests.servers import RedisServer
from worker.ops import unacked

pytestmark = pytest.mark.integration


def test_closing_a_channel_with_unacked_messages_after_redis_died_does_not_raise(
        caplog: pytest.LogCaptureFixture) -> None:
    unacked.install()
    server = RedisServer()
    connection = Connection(server.url)
    try:
        channel: Any = connection.channel()
        queue = Queue("q-unacked", Exchange("q-unacked"), "q-unacked", channel=channel)
        queue.declare()
        connection.Producer(channel).publish({"job": 1}, exchange="q-unacked",
                                              routing_key="q-unacked")
        received: list[Any] = []
        connection.Consumer(queue, callbacks=[lambda _body, m: received.append(m)],
                            channel=channel).consume()
        connection.drain_events(timeout=5)
        assert len(received) == 1 and len(channel.qos._delivered) == 1  # in hand, unacked
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait(10)
        channel._disconnect_pools()
        channel.connection.client = None  # what kombu's Connection._close leaves behind
        channel.close()  # raised AttributeError: 'NoneType' object has no attribute 'hostname'
        assert "could not put 1 unacknowledged message(s) back" in caplog.text
        assert channel.qos._delivered == {}
    finally:
        server.stop()


def test_acking_on_a_channel_whose_connection_is_gone_does_not_raise(
        caplog: pytest.LogCaptureFixture) -> None:
    unacked.install()
    server = RedisServer()
    connection = Connection(server.url)
    try:
        channel: Any = connection.channel()
        queue = Queue("q-late-ack", Exchange("q-late-ack"), "q-late-ack", channel=channel)
        queue.declare()
        connection.Producer(channel).publish({"job": 2}, exchange="q-late-ack",
                                              routing_key="q-late-ack")
        received: list[Any] = []
        connection.Consumer(queue, callbacks=[lambda _body, m: received.append(m)],
                            channel=channel).consume()
        connection.drain_events(timeout=5)
        channel._disconnect_pools()
        channel.connection = None  # the transport let go of the channel (connection lost)
        received[0].ack()  # the task ended after that: raised AttributeError ('client')
        assert "could not acknowledge message" in caplog.text
        channel.qos._flush()  # forgotten here (kombu drops acked tags at its next flush)
        assert channel.qos._delivered == {}
    finally:
        server.stop()
