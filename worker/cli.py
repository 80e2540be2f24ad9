"""`vlmq-worker`: load one model, then serve jobs from its queues (also ``python -m worker``).

``vlmq-worker health [--max-age S]`` answers (exit 0/1) whether the worker on this host is
consuming, from the health file its heartbeat writes (``worker/ops/health.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pydantic import ValidationError

from worker.settings import DEFAULT_MODEL, WorkerSettings, problems


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


def _settings(args: argparse.Namespace) -> WorkerSettings | None:
    """The settings from the environment and the options; None after printing one line per
    bad value."""
    names = ("model", "device", "dtype", "queue", "redis_url", "broker_url", "max_batch_size",
             "hostname", "log_level", "quantize", "attn", "gpus", "scheduler")
    overrides: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    try:
        return WorkerSettings(**overrides)
    except ValidationError as error:
        for line in problems(error, names):
            print(f"vlmq-worker: cannot start: {line}", file=sys.stderr)
        return None


def _health(settings: WorkerSettings, max_age: float | None) -> int:
    from worker.ops.health import check

    healthy, report = check(settings.health_file, max_age)
    print(json.dumps({"healthy": healthy, **report}))
    return 0 if healthy else 1


def _refusals(settings: WorkerSettings, check: bool) -> list[str]:
    """What stops this worker before its model loads: inconsistent settings, and (when it
    will serve) refused credentials, TLS or signing files."""
    from worker.app import check_config

    problems = [f"inconsistent settings: {problem}" for problem in check_config(settings)]
    if problems or check or settings.gpus:
        return problems
    from worker.security import preflight

    return preflight(settings)


def _check(settings: WorkerSettings, loaded: Any) -> int:
    """``--check``: one tiny generation and a report of what was loaded."""
    from worker.model.check import smoke_generate
    from worker.model.memory import over_watermark

    try:
        report = {**loaded.describe(), **smoke_generate(loaded)}
    except Exception as error:
        print(f"vlmq-worker: loaded, but cannot generate: {error}", file=sys.stderr)
        return 3
    print(json.dumps(report, indent=2))
    over = over_watermark(settings)
    if over:
        print(f"vlmq-worker: loaded, but would recycle at once: {over}", file=sys.stderr)
        return 4
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = _settings(args)
    if settings is None:
        return 2
    if args.command == "health":
        return _health(settings, args.max_age)
    from worker.ops.logs import setup

    setup(settings)
    refusals = _refusals(settings, args.check)
    for problem in refusals:
        print(f"vlmq-worker: cannot start: {problem}", file=sys.stderr)
    if refusals:
        return 2
    if settings.gpus:  # one child process per GPU; the supervisor never imports torch
        from worker.ops.supervisor import supervise

        return supervise(settings, sys.argv[1:] if argv is None else argv, check=args.check)
    from worker.model.load import StartupError, load  # heavy: torch + transformers

    try:
        loaded = load(settings)
    except StartupError as error:
        print(f"vlmq-worker: cannot start: {error}", file=sys.stderr)
        return 2
    if args.check:
        return _check(settings, loaded)
    from worker.service import Service

    return Service.build(settings, loaded).run()


if __name__ == "__main__":
    raise SystemExit(main())
