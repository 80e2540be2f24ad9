"""A worker survives its broker Redis dying while it holds unacknowledged messages.

When the broker connection drops, Celery restarts its consumer: it closes the task channel,
and kombu's Redis transport then puts the channel's unacknowledged messages back on their
queues (``QoS.restore_unacked``). With Redis down, or with the connection already closed
(kombu's ``Connection`` clears ``transport.client``, and ``Channel._connparams`` then reads
``None.hostname``), that raises ``AttributeError: 'NoneType' object has no attribute
'hostname'`` (or a connection error). Celery only ignores connection errors there, so the
AttributeError became "Unrecoverable error" and the worker exited 1. Upstream reports of the
same path: https://github.com/celery/kombu/issues/582 and
https://github.com/celery/kombu/issues/970.

The same torn-down channel fails a task's late ``ack`` (``'NoneType' object has no attribute
'client'``, from the event loop: unrecoverable too). ``install`` wraps ``ack`` and ``reject``
(the message is left to redelivery, and a redelivered message of an ended job is dropped at
its claim) and ``restore_unacked``: when it cannot reach Redis, the messages are left where
kombu keeps them (the broker's unacked hash: Redis redelivers them after the visibility timeout)
and, sooner, the reconciler re-sends their jobs once their leases run out; the consumer then
reconnects as after any connection loss, with the model still loaded."""

from __future__ import annotations

import logging
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

log = logging.getLogger("vlmq.broker")
_UNREACHABLE = (AttributeError, redis.ConnectionError, redis.TimeoutError, OSError)


def install() -> None:
    """Guard kombu's Redis ``QoS.restore_unacked``, ``ack`` and ``reject`` (once per process)."""
    qos: Any = kombu_redis.QoS
    if getattr(qos.restore_unacked, "vlmq_guarded", False):
        return
    restore, ack, reject = qos.restore_unacked, qos.ack, qos.reject

    def restore_unacked(self: Any, client: Any = None) -> Any:
        try:
            return restore(self, client)
        except _UNREACHABLE as error:
            log.warning("could not put %d unacknowledged message(s) back (%s: %s): Redis "
                        "redelivers them after the visibility timeout, and the reconciler "
                        "re-sends their jobs once their leases run out", len(self._delivered),
                        type(error).__name__, error)
            self._delivered.clear()
            return None

    def guarded(original: Any, what: str) -> Any:
        # a task that ends after its channel's connection was torn down acks on that channel:
        # the message stays in the broker's unacked hash; redelivered after the visibility
        # timeout, its claim finds the job ended and drops it
        def call(self: Any, delivery_tag: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return original(self, delivery_tag, *args, **kwargs)
            except _UNREACHABLE as error:
                log.warning("could not %s message %s on a lost broker connection (%s: %s); "
                            "left to redelivery, which the ledger drops", what, delivery_tag,
                            type(error).__name__, error)
                virtual.QoS.ack(self, delivery_tag)  # forget it here
                return None
        return call

    restore_unacked.vlmq_guarded = True  # type: ignore[attr-defined]
    qos.restore_unacked = restore_unacked
    qos.ack = guarded(ack, "acknowledge")
    qos.reject = guarded(reject, "reject")
