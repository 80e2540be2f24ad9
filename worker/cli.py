"""`vlmq-worker`: load one model, then serve jobs from its queues (also ``python -m worker``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
from typing import Any

from worker.settings import DEFAULT_MODEL, WorkerSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmq-worker",
        description="Serve vlmq jobs with one loaded vision-language model. Every option can "
                    "also be set in the environment as VLMQ_<NAME> (e.g. VLMQ_MODEL).")
    parser.add_argument("--model", help=f"hub id or local path (default {DEFAULT_MODEL})")
    parser.add_argument("--device", help="auto | cpu | cuda:N (default auto)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"],
                        help="default auto: bfloat16 on GPUs that support it, float32 on CPU")
    parser.add_argument("--queue", help="queue to consume besides the model's own (default vlmq)")
    parser.add_argument("--redis-url", help="ledger Redis (default redis://localhost:6379/0)")
    parser.add_argument("--broker-url", help="Celery broker, if not the ledger Redis")
    parser.add_argument("--max-batch-size", type=int, help="jobs in hand at once (default 8)")
    parser.add_argument("--hostname", help="worker id shown in results (default vlmq@host:pid)")
    parser.add_argument("--log-level", help="DEBUG | INFO | WARNING (default INFO)")
    parser.add_argument("--check", action="store_true",
                        help="load the model, run one tiny generation, print a report, exit")
    return parser


def _settings(args: argparse.Namespace) -> WorkerSettings:
    names = ("model", "device", "dtype", "queue", "redis_url", "broker_url", "max_batch_size",
             "hostname", "log_level")
    overrides: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    return WorkerSettings(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = _settings(args)
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("vlmq.worker")
    from worker.model import StartupError, load  # heavy: torch + transformers

    try:
        loaded = load(settings)
    except StartupError as error:
        print(f"vlmq-worker: cannot start: {error}", file=sys.stderr)
        return 2
    if args.check:
        from worker.check import smoke_generate

        try:
            report = {**loaded.describe(), **smoke_generate(loaded)}
        except Exception as error:
            print(f"vlmq-worker: loaded, but cannot generate: {error}", file=sys.stderr)
            return 3
        print(json.dumps(report, indent=2))
        return 0
    return serve(settings, loaded, log)


def serve(settings: WorkerSettings, loaded: Any, log: logging.Logger) -> int:
    import redis
    from celery.signals import worker_ready

    from producer.jobs import Ledger
    from producer.keys import TASK_GENERATE
    from worker.app import create_app, queues_for
    from worker.engine import Engine
    from worker.media import MediaLoader
    from worker.publisher import Publisher
    from worker.reconciler import Reconciler
    from worker.tasks import Runtime, register

    worker_id = settings.hostname or f"vlmq@{socket.gethostname()}:{os.getpid()}"
    client = redis.Redis.from_url(settings.redis_url)
    ledger = Ledger(client, retention_s=settings.retention_s, stream_maxlen=settings.stream_maxlen)
    engine = Engine(loaded, settings, MediaLoader(settings), Publisher(ledger))
    runtime = Runtime(settings=settings, ledger=ledger, engine=engine, worker_id=worker_id)
    app = create_app(settings)
    register(app, runtime)
    broker_redis = (redis.Redis.from_url(settings.broker())
                    if settings.broker().startswith(("redis://", "rediss://", "unix://")) else None)
    reconciler = Reconciler(
        ledger, lambda job_id, queue: app.send_task(TASK_GENERATE, args=[job_id], queue=queue,
                                                    task_id=job_id),
        worker_id=worker_id, interval_s=settings.reconcile_interval_s,
        grace_s=settings.requeue_grace_s, broker=broker_redis)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(min(settings.lease_s / 3, settings.reconcile_interval_s)):
            try:
                runtime.heartbeat_once()
                reconciler.maybe_sweep()
            except Exception:
                log.warning("heartbeat or sweep failed", exc_info=True)

    threading.Thread(target=beat, name="vlmq-heartbeat", daemon=True).start()
    queues = queues_for(settings)

    @worker_ready.connect(weak=False)
    def announce(**_kwargs: Any) -> None:  # printed whatever the log level: scripts wait on it
        print(f"vlmq-worker: ready: {worker_id} consuming {','.join(queues)}",
              file=sys.stderr, flush=True)

    worker = app.Worker(hostname=worker_id, pool="threads", concurrency=settings.max_batch_size,
                        queues=queues, loglevel=settings.log_level.upper(), quiet=True,
                        without_mingle=True, without_gossip=True)
    worker.start()
    stop.set()
    engine.close()
    return int(worker.exitcode or 0)


if __name__ == "__main__":
    raise SystemExit(main())
