"""Everything Celery and kombu: the send-only app, queue names and declarations, TLS options,
sending ``vlmq.generate``, and what a broker holds (depth, task ids, purge) on Redis or AMQP.

Producers and workers both use it; nothing else imports celery or kombu on the producer side.
On a Redis broker kombu keeps a queue as a list named after it, messages of priority > 0 in
sibling lists ``<queue>\\x06\\x16<priority>``, and delivered-but-unacked messages in the
``unacked`` hash (indexed by delivery time in ``unacked_index``).
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery
from kombu import Exchange, Queue

from producer.keys import DEFAULT_QUEUE, TASK_GENERATE

if TYPE_CHECKING:
    from producer.signing import Signer

log = logging.getLogger("vlmq.broker")
PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: <queue><SEP><priority> holds priority > 0
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def queue_for_model(model: str | None) -> str:
    """The Celery queue serving ``model``; ``vlmq`` when no model is named."""
    if not model:
        return DEFAULT_QUEUE
    return f"{DEFAULT_QUEUE}.{re.sub(r'[^A-Za-z0-9._-]+', '_', model)}"


def is_queue_list(name: str) -> bool:
    """Whether a broker key is a vlmq queue list: ``vlmq`` or ``vlmq.<model>``, or one of
    their priority siblings."""
    base = name.split(PRIORITY_SEP, 1)[0]
    return base == DEFAULT_QUEUE or (base.startswith(f"{DEFAULT_QUEUE}.") and ":" not in base)


def queue_lists(queue: str) -> list[str]:
    """The Redis lists holding ``queue``'s messages, priority 0 to 9."""
    return [queue] + [f"{queue}{PRIORITY_SEP}{priority}" for priority in range(1, 10)]


def task_id(payload: Any) -> str | None:
    """The task id of a kombu message on a Redis broker (an ``unacked`` entry is
    ``[message, exchange, routing key]``); None for anything else."""
    try:
        message = json.loads(payload)
        if isinstance(message, list):
            message = message[0]
        return str(message["headers"]["id"])
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def broker_ssl(broker_url: str) -> dict[str, Any] | None:
    """Celery's ``broker_use_ssl`` for a ``rediss://`` broker: verify the server certificate.

    kombu reads ``ssl_*`` options from the URL's query (``ssl_ca_certs``, ``ssl_cert_reqs``,
    ``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``), and they replace this; a
    ``rediss://`` URL without any would otherwise connect WITHOUT checking the certificate
    (kombu's default, with a warning), while redis-py (ledger, streams) checks it against the
    system CAs. With this both check it the same way."""
    if broker_url.startswith("rediss://"):
        return {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return None


def broker_queue(name: str, broker_url: str) -> Queue:
    """The queue as producers and workers both declare it: durable quorum queues on RabbitMQ."""
    if broker_url.startswith(("amqp://", "amqps://", "pyamqp://")):
        return Queue(name, Exchange(name), routing_key=name, durable=True,
                     queue_arguments={"x-queue-type": "quorum"})
    return Queue(name, Exchange(name), routing_key=name)


def make_celery(broker_url: str, signer: Signer | None = None) -> Celery:
    """A send-only Celery app: JSON (signed with Celery's ``auth`` format when ``signer``),
    tasks sent by name."""
    app = Celery("vlmq-producer", broker=broker_url, set_as_current=False)
    app.conf.update(task_serializer=signer.serializer() if signer else "json",
                    accept_content=["json"], result_backend=None,
                    broker_use_ssl=broker_ssl(broker_url),
                    broker_connection_retry_on_startup=True)
    return app


def redis_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in ``queue`` on a Redis broker, every priority."""
    pipe = client.pipeline(transaction=False)
    for name in queue_lists(queue):
        pipe.llen(name)
    return int(sum(pipe.execute()))


def amqp_depth(connect: Callable[[], Any], queue: str) -> int | None:
    """Ready messages in ``queue`` on AMQP (a passive declare; not those delivered and
    unacked); 0 when the queue does not exist, None when the broker cannot say. ``connect``
    gives a kombu connection (``app.connection_for_read``)."""
    try:
        with connect() as conn:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True)
                       .message_count)
    except Exception as error:
        if getattr(error, "code", None) == 404:  # NOT_FOUND: no such queue, no messages
            return 0
        log.warning("cannot read the depth of queue %s: %s", queue, error)
        return None


def waiting_ids(client: redis.Redis, recent_s: float) -> set[str]:
    """Task ids waiting in a Redis broker's vlmq queues, or delivered and unacked within the
    last ``recent_s`` seconds (an older delivery whose job is still QUEUED sits with a consumer
    that died; Redis gives it back after the visibility timeout, far later)."""
    payloads: list[Any] = []
    for name in client.scan_iter(match=f"{DEFAULT_QUEUE}*", _type="list"):
        payloads.extend(client.lrange(name, 0, -1))
    recent = client.zrangebyscore("unacked_index", time.time() - recent_s, "+inf")
    if recent:
        payloads.extend(p for p in client.hmget("unacked", recent) if p)
    return {found for found in map(task_id, payloads) if found}


def redis_purge(client: redis.Redis, queue: str) -> tuple[int, set[str]]:
    """Delete ``queue``'s waiting messages atomically: how many, and the task ids."""
    names = queue_lists(queue)
    pipe = client.pipeline(transaction=True)
    for name in names:
        pipe.lrange(name, 0, -1)
    for name in names:
        pipe.delete(name)
    payloads = [p for answer in pipe.execute()[: len(names)] for p in answer]
    return len(payloads), {found for found in map(task_id, payloads) if found}


class Broker:
    """One broker as vlmq uses it. Blocking (the async producer calls it in a thread)."""

    def __init__(self, app: Celery, broker_url: str) -> None:
        self.app = app
        self.url = broker_url
        self._redis: redis.Redis | None = None

    @property
    def redis(self) -> redis.Redis | None:
        """The broker's Redis when the broker is Redis (built on first use), else None."""
        if self._redis is None and self.url.startswith(REDIS_SCHEMES):
            self._redis = redis.Redis.from_url(self.url)
        return self._redis

    def send(self, job_id: str, queue: str = DEFAULT_QUEUE) -> None:
        """Send ``vlmq.generate`` with only the job id (also to re-send a lost message)."""
        self.app.send_task(TASK_GENERATE, args=[job_id], task_id=job_id,
                           queue=broker_queue(queue, self.url))

    def depth(self, queue: str) -> int | None:
        """Messages waiting in ``queue``; None when the broker cannot say."""
        client = self.redis
        if client is not None:
            return redis_depth(client, queue)
        return amqp_depth(self.app.connection_for_read, queue)

    def queue_names(self) -> set[str]:
        """The vlmq queues a Redis broker holds messages for (empty on AMQP)."""
        client = self.redis
        if client is None:
            return set()
        names = (name.decode() for name in client.scan_iter(match=f"{DEFAULT_QUEUE}*",
                                                             _type="list"))
        return {name.split(PRIORITY_SEP, 1)[0] for name in names if is_queue_list(name)}

    def purge(self, queue: str) -> tuple[int, set[str]]:
        """Delete the messages waiting in ``queue``: how many, and the task ids they carried
        (known on a Redis broker only)."""
        client = self.redis
        if client is not None:
            return redis_purge(client, queue)
        with self.app.connection_for_write() as conn:
            return int(conn.default_channel.queue_purge(queue) or 0), set()

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
