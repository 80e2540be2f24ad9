"""`vlmq-worker`: load one model, then serve jobs from its queues (also ``python -m worker``).

``vlmq-worker health [--max-age S]`` answers (exit 0/1) whether the worker on this host is
consuming, from the health file its heartbeat writes (``worker/ops/health.py``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
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
    parser.add_argument("command", nargs="?", choices=["serve", "health"], default="serve",
                        help="serve (default): load the model and serve jobs; health: exit 0 "
                             "if the worker writing VLMQ_HEALTH_FILE is consuming, else 1")
    parser.add_argument("--max-age", type=float, default=None, metavar="S",
                        help="health: oldest acceptable heartbeat in seconds (default: three "
                             "heartbeat intervals, at least 30)")
    parser.add_argument("--model", help=f"hub id or local path (default {DEFAULT_MODEL})")
    parser.add_argument("--device", help="auto | cpu | cuda:N (default auto)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"],
                        help="default auto: bfloat16 on GPUs that support it, float32 on CPU")
    parser.add_argument("--quantize", choices=["none", "int8", "int8-bnb", "nf4-bnb"],
                        help="weights: none (default), int8 (optimum-quanto), int8-bnb / "
                             "nf4-bnb (bitsandbytes 8-bit / 4-bit NF4)")
    parser.add_argument("--attn", choices=["auto", "flash_attention_2", "sdpa", "eager"],
                        help="attention (default auto: flash_attention_2 where it can run, "
                             "else sdpa)")
    parser.add_argument("--gpus", help="0,1,... or all: supervise one worker process per GPU, "
                                       "each pinned with CUDA_VISIBLE_DEVICES")
    parser.add_argument("--queue", help="queue to consume besides the model's own (default vlmq)")
    parser.add_argument("--redis-url", help="ledger Redis (default redis://localhost:6379/0)")
    parser.add_argument("--broker-url", help="Celery broker, if not the ledger Redis")
    parser.add_argument("--max-batch-size", type=int, help="jobs in hand at once (default 8)")
    parser.add_argument("--scheduler", choices=["static", "continuous"],
                        help="continuous (default): jobs join and leave the running batch at "
                             "every decode step; static: one generate per batch")
    parser.add_argument("--hostname", help="worker id shown in results (default vlmq@host:pid)")
    parser.add_argument("--log-level", help="DEBUG | INFO | WARNING (default INFO)")
    parser.add_argument("--check", action="store_true",
                        help="load the model, run one tiny generation, print a report, exit")
    return parser


def _settings(args: argparse.Namespace) -> WorkerSettings:
    names = ("model", "device", "dtype", "queue", "redis_url", "broker_url", "max_batch_size",
             "hostname", "log_level", "quantize", "attn", "gpus", "scheduler")
    overrides: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    return WorkerSettings(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = _settings(args)
    if args.command == "health":
        from worker.ops.health import check

        healthy, report = check(settings.health_file, args.max_age)
        print(json.dumps({"healthy": healthy, **report}))
        return 0 if healthy else 1
    from worker.ops.logs import setup

    setup(settings)
    log = logging.getLogger("vlmq.worker")
    from worker.app import check_config

    problems = check_config(settings)
    for problem in problems:
        print(f"vlmq-worker: cannot start: inconsistent settings: {problem}", file=sys.stderr)
    if problems:
        return 2
    if settings.gpus:  # one child process per GPU; the supervisor never imports torch
        from worker.ops.supervisor import supervise

        return supervise(settings, sys.argv[1:] if argv is None else argv, check=args.check)
    if not args.check:  # refused credentials, TLS or signing files: say so before loading
        from worker.security import preflight

        refusals = preflight(settings)
        for problem in refusals:
            print(f"vlmq-worker: cannot start: {problem}", file=sys.stderr)
        if refusals:
            return 2
    from worker.model.load import StartupError, load  # heavy: torch + transformers

    try:
        loaded = load(settings)
    except StartupError as error:
        print(f"vlmq-worker: cannot start: {error}", file=sys.stderr)
        return 2
    if args.check:
        from worker.model.check import smoke_generate

        try:
            report = {**loaded.describe(), **smoke_generate(loaded)}
        except Exception as error:
            print(f"vlmq-worker: loaded, but cannot generate: {error}", file=sys.stderr)
            return 3
        print(json.dumps(report, indent=2))
        from worker.model.memory import over_watermark

        over = over_watermark(settings)
        if over:
            print(f"vlmq-worker: loaded, but would recycle at once: {over}", file=sys.stderr)
            return 4
        return 0
    return serve(settings, loaded, log)


def serve(settings: WorkerSettings, loaded: Any, log: logging.Logger) -> int:
    import redis
    from celery.signals import worker_ready, worker_shutting_down

    from producer.client import broker_queue
    from producer.jobs import Ledger, connect
    from producer.keys import TASK_GENERATE
    from worker.app import create_app, queues_for
    from worker.engine.continuous import create_engine
    from worker.engine.publisher import Publisher
    from worker.media.loader import MediaLoader
    from worker.ops.health import HealthReporter
    from worker.ops.metrics import Metrics
    from worker.ops.reconciler import Reconciler, amqp_depth
    from worker.results import ResultStore
    from worker.security import record_check
    from worker.tasks import Runtime, register

    if settings.result_store == "s3" and not settings.s3_result_bucket:
        print("vlmq-worker: cannot start: VLMQ_RESULT_STORE=s3 needs VLMQ_S3_RESULT_BUCKET",
              file=sys.stderr)
        return 2

    worker_id = settings.hostname or f"vlmq@{socket.gethostname()}:{os.getpid()}"
    client = connect(settings.redis_url)
    ledger = Ledger(client, retention_s=settings.retention_s, stream_maxlen=settings.stream_maxlen)
    media = MediaLoader(settings)
    engine = create_engine(loaded, settings, media, Publisher(ledger))
    metrics = Metrics()
    runtime = Runtime(settings=settings, ledger=ledger, engine=engine, worker_id=worker_id,
                      results=ResultStore(settings), metrics=metrics,
                      check_record=record_check(settings))
    metrics.bind(loaded, media, lambda: len(runtime.active))
    metrics.serve(settings.metrics_port, settings.metrics_addr)
    log.info("worker %s: ledger %s, broker %s", worker_id, settings.redis_url, settings.broker())
    app = create_app(settings)
    register(app, runtime)
    broker_redis = (redis.Redis.from_url(settings.broker())
                    if settings.broker().startswith(("redis://", "rediss://", "unix://")) else None)
    reconciler = Reconciler(
        ledger, lambda job_id, queue: app.send_task(
            TASK_GENERATE, args=[job_id], task_id=job_id,
            queue=broker_queue(queue, settings.broker())),
        worker_id=worker_id, interval_s=settings.reconcile_interval_s,
        grace_s=settings.requeue_grace_s, broker=broker_redis,
        depth=None if broker_redis is not None else amqp_depth(app.connection_for_read))
    runtime.resend = reconciler.send
    stop = threading.Event()
    queues = queues_for(settings)
    interval = min(settings.lease_s / 3, settings.reconcile_interval_s)
    celery_worker: dict[str, Any] = {}
    health = HealthReporter(
        path=settings.health_file, worker_id=worker_id, model=settings.served_model(),
        queues=queues, interval_s=interval, redis=client, broker=broker_redis,
        consumer=lambda: getattr(celery_worker.get("w"), "consumer", None))
    health.report()

    from worker.model.memory import RECYCLE_EXIT, over_watermark

    recycled: list[str] = []

    def beat() -> None:
        while not stop.wait(interval):
            try:
                runtime.heartbeat_once()
                reconciler.maybe_sweep()
            except Exception:
                log.warning("heartbeat or sweep failed", exc_info=True)
            health.report()
            over = None if recycled or not health.ready else over_watermark(settings)
            if over:  # warm shutdown: jobs in hand are handed back, a fresh process follows
                log.warning("recycling this worker: %s", over)
                recycled.append(over)
                os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=beat, name="vlmq-heartbeat", daemon=True).start()

    @worker_shutting_down.connect(weak=False)
    def shutting_down(**_kwargs: Any) -> None:
        health.stopping = True
        runtime.drain()  # SIGTERM: hand the jobs in hand back at their next step

    @worker_ready.connect(weak=False)
    def announce(**_kwargs: Any) -> None:  # printed whatever the log level: scripts wait on it
        print(f"vlmq-worker: ready: {worker_id} consuming {','.join(queues)}",
              file=sys.stderr, flush=True)
        health.ready = True
        health.report()

    # continuous: twice the rows in hand, so jobs are claimed and prepared while the batch is
    # full and join it the step a row leaves (worker/app.py)
    threads = settings.max_batch_size * (2 if settings.scheduler == "continuous" else 1)
    worker = app.Worker(hostname=worker_id, pool="threads", concurrency=threads,
                        queues=queues, loglevel=settings.log_level.upper(), quiet=True,
                        without_mingle=True, without_gossip=True)
    celery_worker["w"] = worker
    worker.start()
    stop.set()
    health.stopping = True
    health.report()
    engine.close()
    return RECYCLE_EXIT if recycled else int(worker.exitcode or 0)


if __name__ == "__main__":
    raise SystemExit(main())
