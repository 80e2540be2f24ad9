"""The serving process, composed: ``Service.build`` wires the parts from the settings and the
loaded model (ledger, media, engine, publisher, results, metrics, reconciler, health, heartbeat,
Celery app and task); ``run`` consumes until a signal stops it. Nothing here decides a job's
fate: that is ``worker.tasks`` (one job) and the engine (many rows)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down

from producer.admin import AdminCore
from producer.broker import Broker
from producer.jobs import Ledger, connect
from worker.app import create_app, queues_for
from worker.engine.continuous import create_engine
from worker.engine.publisher import Publisher
from worker.media.loader import MediaLoader
from worker.model.load import LoadedModel
from worker.model.memory import RECYCLE_EXIT
from worker.ops.health import HealthReporter
from worker.ops.heartbeat import Heartbeat
from worker.ops.logs import ANNOUNCE
from worker.ops.metrics import Metrics
from worker.ops.probes import Probes
from worker.ops.reconciler import Reconciler, amqp_depth
from worker.results import ResultStore
from worker.security import only_generate, record_check
from worker.settings import WorkerSettings
from worker.tasks import Runtime, register

log = logging.getLogger("vlmq.worker")


def _vlmq_threads() -> set[str]:
    """The long-lived threads of this process (engine loop, publisher or streamer, heartbeat,
    metrics); the prep pool's come and go."""
    return {thread.name for thread in threading.enumerate()
            if thread.is_alive() and thread.name.startswith("vlmq-")
            and not thread.name.startswith("vlmq-prep")}


@dataclass
class Service:
    settings: WorkerSettings
    runtime: Runtime
    app: Celery
    queues: list[str]
    health: HealthReporter
    heartbeat: Heartbeat
    celery_worker: dict[str, Any]  # "worker": Celery's WorkController once ``run`` builds it
    serving: set[str]  # the threads /livez checks

    @classmethod
    def build(cls, settings: WorkerSettings, loaded: LoadedModel) -> Service:
        worker_id = settings.hostname or f"vlmq@{socket.gethostname()}:{os.getpid()}"
        client = connect(settings.redis_url)
        ledger = Ledger(client, retention_s=settings.retention_s,
                        stream_maxlen=settings.stream_maxlen)
        media = MediaLoader(settings)
        engine = create_engine(loaded, settings, media, Publisher(ledger))
        metrics = Metrics(settings.served_model())
        runtime = Runtime(settings=settings, ledger=ledger, engine=engine, worker_id=worker_id,
                          results=ResultStore(settings), metrics=metrics,
                          check_record=record_check(settings))
        log.info("worker %s: ledger %s, broker %s", worker_id, settings.redis_url,
                 settings.broker())
        app = create_app(settings)
        register(app, runtime)
        only_generate(app, metrics.refused_message)  # celery.map and the like: refused
        broker = Broker(app, settings.broker())  # sends vlmq.generate, reads queue depths
        broker_redis = broker.redis  # None unless the broker is Redis
        reconciler = Reconciler(
            ledger, broker.send, worker_id=worker_id, interval_s=settings.reconcile_interval_s,
            grace_s=settings.requeue_grace_s, broker=broker_redis,
            depth=None if broker_redis is not None else amqp_depth(app.connection_for_read),
            on_quarantine=lambda _job_id: metrics.quarantined.inc())
        runtime.resend = reconciler.send
        admin = AdminCore(ledger.config, broker)
        metrics.bind(loaded, media, lambda: list(runtime.active.values()),
                     lambda: ledger.run(admin.backlog()))
        queues = queues_for(settings)
        interval = min(settings.lease_s / 3, settings.reconcile_interval_s)
        celery_worker: dict[str, Any] = {}
        health = HealthReporter(
            path=settings.health_file, worker_id=worker_id, model=settings.served_model(),
            queues=queues, interval_s=interval, redis=client, broker=broker_redis,
            consumer=lambda: getattr(celery_worker.get("worker"), "consumer", None),
            allow_eviction=settings.allow_eviction)
        heartbeat = Heartbeat(settings, interval, health,
                              [runtime.heartbeat_once, reconciler.maybe_sweep])
        serving: set[str] = set()  # filled by ``run`` once every thread has started
        Probes(metrics.registry, health,
               lambda: {name: name in _vlmq_threads() for name in sorted(serving)}).serve(
            settings.metrics_port, settings.metrics_addr)
        return cls(settings, runtime, app, queues, health, heartbeat, celery_worker, serving)

    def run(self) -> int:
        """Consume until stopped; the exit code says whether to start a fresh process."""
        self.health.report()
        self.heartbeat.start()
        self.serving.update(_vlmq_threads())
        worker_shutting_down.connect(self._shutting_down, weak=False)
        worker_ready.connect(self._ready, weak=False)
        settings = self.settings
        # continuous: twice the rows in hand, so jobs are claimed and prepared while the batch
        # is full and join it the step a row leaves (worker/app.py)
        threads = settings.max_batch_size * (2 if settings.scheduler == "continuous" else 1)
        worker = self.app.Worker(
            hostname=self.runtime.worker_id, pool="threads", concurrency=threads,
            queues=self.queues,
            loglevel=settings.log_level.upper(), quiet=True, without_mingle=True,
            without_gossip=True)
        self.celery_worker["worker"] = worker
        worker.start()
        self.heartbeat.stop()
        self.health.stopping = True
        self.health.report()
        self.runtime.engine.close()
        return RECYCLE_EXIT if self.heartbeat.recycled else int(worker.exitcode or 0)

    def _shutting_down(self, **_kwargs: Any) -> None:
        self.health.stopping = True
        self.runtime.drain()  # SIGTERM: hand the jobs in hand back at their next step

    def _ready(self, **_kwargs: Any) -> None:  # logged whatever the log level: scripts wait
        logging.getLogger(ANNOUNCE).info(
            "vlmq-worker: ready: %s consuming %s", self.runtime.worker_id, ",".join(self.queues),
            extra={"worker": self.runtime.worker_id})
        self.health.ready = True
        self.health.report()
