"""kombu's path that made a worker exit when its broker Redis died with messages in hand:
closing a channel whose connection is gone raised AttributeError (worker/ops/unacked.py).
A real redis-server and kombu; the worker-level test is in test_faults (Redis SIGKILLed under
load, restarted: every job ends, every worker is still alive)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue

from tests.servers import RedisServer
from worker.ops import unacked

pytestmark = pytest.mark.integration


@pytest.fixture
def in_hand() -> Iterator[tuple[RedisServer, Any, list[Any]]]:
    """A real Redis, a kombu channel on it, and the one message it delivered, unacked."""
    unacked.install()
    server = RedisServer()
    connection = Connection(server.url)
    try:
        channel: Any = connection.channel()
        queue = Queue("q-in-hand", Exchange("q-in-hand"), "q-in-hand", channel=channel)
        queue.declare()
        connection.Producer(channel).publish({"job": 1}, exchange="q-in-hand",
                                              routing_key="q-in-hand")
        received: list[Any] = []
        connection.Consumer(queue, callbacks=[lambda _body, m: received.append(m)],
                            channel=channel).consume()
        connection.drain_events(timeout=5)
        assert len(received) == 1 and len(channel.qos._delivered) == 1  # in hand, unacked
        yield server, channel, received
    finally:
        server.stop()


def test_closing_a_channel_with_unacked_messages_after_redis_died_does_not_raise(
        in_hand: tuple[RedisServer, Any, list[Any]], caplog: pytest.LogCaptureFixture) -> None:
    server, channel, _received = in_hand
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait(10)
    channel._disconnect_pools()
    channel.connection.client = None  # what kombu's Connection._close leaves behind
    channel.close()  # raised AttributeError: 'NoneType' object has no attribute 'hostname'
    assert "could not put 1 unacknowledged message(s) back" in caplog.text
    assert channel.qos._delivered == {}


def test_acking_on_a_channel_whose_connection_is_gone_does_not_raise(
        in_hand: tuple[RedisServer, Any, list[Any]], caplog: pytest.LogCaptureFixture) -> None:
    _server, channel, received = in_hand
    channel._disconnect_pools()
    channel.connection = None  # the transport let go of the channel (connection lost)
    received[0].ack()  # the task ended after that: raised AttributeError ('client')
    assert "could not acknowledge message" in caplog.text
    channel.qos._flush()  # forgotten here (kombu drops acked tags at its next flush)
    assert channel.qos._delivered == {}
