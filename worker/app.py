"""The Celery app factory and its configuration (JSON only, late acks, one message at a time).

Pool: threads, concurrency = max_batch_size. The model lives once in this process and every
task thread hands its job to the same engine and waits, so the engine sees up to
max_batch_size requests at once to batch; processes would each need a copy of the model.
"""

from __future__ import annotations

from celery import Celery

from producer import keys
from worker.settings import WorkerSettings

VISIBILITY_MARGIN_S = 300


def create_app(settings: WorkerSettings) -> Celery:
    app = Celery("vlmq-worker", broker=settings.broker(), set_as_current=True)
    visibility = int(settings.max_generate_s + VISIBILITY_MARGIN_S)
    transport = {"visibility_timeout": visibility}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=keys.DEFAULT_QUEUE,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_time_limit=None,
    )
    return app


def queues_for(settings: WorkerSettings) -> list[str]:
    """The worker consumes its --queue and the queue named after the model it serves."""
    names = [settings.queue, keys.queue_for_model(settings.served_model())]
    return list(dict.fromkeys(names))
