"""The Celery app factory and its configuration (JSON only, late acks, one message at a time).

JSON only: a pickle, YAML or msgpack message is refused before its body is decoded and dropped
(``worker.security``); with signing configured, only Celery ``auth`` messages are accepted.

Pool: threads, concurrency = max_batch_size (static scheduler) or twice that (continuous: up to
max_batch_size jobs are claimed and prepared while the batch is full, and join it the step a
row leaves). The model lives once in this process and every task thread hands its job to the
same engine and waits; processes would each need a copy of the model.
"""

from __future__ import annotations

from celery import Celery

from producer import keys
from producer.broker import broker_queue, queue_for_model
from worker.ops import unacked
from worker.security import configure, signing_problems
from worker.settings import WorkerSettings

VISIBILITY_MARGIN_S = 300  # beyond the longest generation: fetching, preprocessing, commit


def visibility_timeout(settings: WorkerSettings) -> float:
    return settings.visibility_timeout_s or settings.max_generate_s + VISIBILITY_MARGIN_S


def check_config(settings: WorkerSettings) -> list[str]:
    """Reasons the Celery/ledger settings are inconsistent (empty when they are sound)."""
    problems = []
    longest = settings.max_generate_s + settings.fetch_total_timeout_s
    if visibility_timeout(settings) <= longest + 60:
        problems.append(
            f"visibility timeout {visibility_timeout(settings):.0f}s must exceed the longest job "
            f"(max_generate_s {settings.max_generate_s:.0f}s + fetch timeout "
            f"{settings.fetch_total_timeout_s:.0f}s) plus 60s, or Redis delivers running jobs "
            "again")
    if settings.lease_s < 3 * 0.2:
        problems.append("lease_s must be at least 0.6s (it is renewed every lease_s / 3)")
    if settings.requeue_grace_s < settings.lease_s:
        problems.append("requeue_grace_s must be at least lease_s")
    if settings.result_store == "s3" and not settings.s3_result_bucket:
        problems.append("VLMQ_RESULT_STORE=s3 needs VLMQ_S3_RESULT_BUCKET")
    return problems + signing_problems(settings)


def create_app(settings: WorkerSettings) -> Celery:
    unacked.install()  # a broker Redis lost with messages in hand: reconnect, not exit
    app = Celery("vlmq-worker", broker=settings.broker(), set_as_current=True)
    transport = {"visibility_timeout": int(visibility_timeout(settings))}
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
        # RabbitMQ: quorum queues (producer.broker.broker_queue) refuse global QoS; with this
        # Celery applies the prefetch per consumer (the 5.5+ default, stated to keep it so)
        worker_detect_quorum_queues=True,
        task_default_queue=keys.DEFAULT_QUEUE,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_time_limit=None,
        worker_soft_shutdown_timeout=settings.soft_shutdown_s,
        worker_enable_soft_shutdown_on_idle=True,
        task_queues=[broker_queue(name, settings.broker()) for name in queues_for(settings)],
    )
    configure(app, settings)  # TLS for a rediss:// broker; the auth serializer when signing
    return app



def queues_for(settings: WorkerSettings) -> list[str]:
    """The worker consumes its --queue and the queue named after the model it serves."""
    names = [settings.queue, queue_for_model(settings.served_model())]
    return list(dict.fromkeys(names))
