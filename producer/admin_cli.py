"""`vlmq stats | jobs | retry | purge | result-url`: the operator's subcommands of ``vlmq``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from producer.client import Producer
from producer.exposition import render
from producer.schema import JobStatus

COMMANDS = ("stats", "jobs", "retry", "purge", "result-url")


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def add_parsers(sub: Any) -> None:
    stats = sub.add_parser("stats", help="queue depths, oldest queued job, jobs by status, "
                                         "live workers")
    stats.add_argument("--prometheus", action="store_true",
                       help="print the per-model queue gauges in Prometheus' text format "
                            "(vlmq_queue_depth, vlmq_queued_jobs, "
                            "vlmq_oldest_queued_age_seconds)")
    jobs = sub.add_parser("jobs", help="list jobs (JSON), e.g. --status FAILED")
    jobs.add_argument("--status", choices=[s.value for s in JobStatus], default=None,
                      help="only jobs in this status (default: all)")
    jobs.add_argument("--limit", type=int, default=50, help="at most N jobs (default 50)")
    retry = sub.add_parser("retry", help="run a FAILED or EXPIRED job again (same id, attempts "
                                         "reset, history kept)")
    retry.add_argument("job_id")
    purge = sub.add_parser("purge", help="delete a queue's waiting messages and cancel their "
                                         "QUEUED jobs (records are kept, CANCELLED)")
    purge.add_argument("queue", help="queue name, e.g. vlmq or vlmq.<model>")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    url = sub.add_parser("result-url", help="print a presigned URL of a job's result in S3")
    url.add_argument("job_id")
    url.add_argument("--expires", type=int, default=3600, help="seconds (default 3600)")


def _confirm(producer: Producer, queue: str) -> bool:
    depth = producer.queue_depth(queue)
    waiting = "its" if depth is None else f"its {depth}"
    print(f"purge {queue!r}: delete {waiting} waiting message(s) and cancel their jobs and "
          "every QUEUED job of this queue? [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def run(producer: Producer, args: argparse.Namespace) -> int:
    """Run one of COMMANDS; the caller maps the producer's exceptions to exit codes."""
    if args.command == "stats":
        if args.prometheus:
            print(render(producer.backlog()), end="")
        else:
            found = producer.stats()
            _print(found)
            for line in found["redis"]["problems"] + found["redis"]["warnings"]:
                print(f"vlmq: warning: {line}", file=sys.stderr)
    elif args.command == "jobs":
        _print([s.model_dump(mode="json") for s in producer.jobs(args.status, args.limit)])
    elif args.command == "retry":
        _print(producer.retry(args.job_id).model_dump(mode="json"))
    elif args.command == "purge":
        if not args.yes and not _confirm(producer, args.queue):
            print("vlmq: purge not confirmed; nothing changed", file=sys.stderr)
            return 1
        _print(producer.purge(args.queue))
    elif args.command == "result-url":
        print(producer.result_url(args.job_id, args.expires))
    return 0
