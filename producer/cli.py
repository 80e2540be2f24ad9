"""`vlmq`: submit jobs and read them back from a shell (also ``python -m producer``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import kombu.exceptions
import redis

from producer import admin_cli, contract, keys
from producer.client import Producer
from producer.errors import (
    CorruptRecord,
    IdempotencyConflict,
    InvalidRequestError,
    JobFailed,
    JobNotFound,
    JobTimeout,
    NotAllowed,
    NoWorkerForModel,
    ResultUnavailable,
    SubmitUncertain,
)
from producer.records import DEFAULT_QUEUED_RETENTION_S as DEFAULT_QUEUED
from producer.s3 import S3Config
from producer.signing import SigningError


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmq", description="Submit vision-language jobs to vlmq workers and read results.",
        epilog="Results stored in S3 are read with VLMQ_S3_ENDPOINT_URL, VLMQ_S3_REGION, "
               "VLMQ_S3_ACCESS_KEY_ID, VLMQ_S3_SECRET_ACCESS_KEY (else the AWS chain). "
               "VLMQ_SECURITY_KEY and VLMQ_SECURITY_CERTIFICATE (VLMQ_SECURITY_KEY_PASSWORD) "
               "sign task messages and job records for workers that require signing. Exit "
               "codes: 2 invalid request, 3 unknown job or timeout, 4 job failed, 5 Redis "
               "unreachable or refusing the credentials or the TLS certificate, 6 not allowed "
               "in the job's status, 7 result store unreadable, 8 signing key or certificate "
               "unusable, 9 a record that is not a job, 10 idempotency key used for another "
               "request, 11 submit uncertain (the job id is printed), 12 no live worker serves "
               "the model (submit --no-require-worker queues it anyway).")
    parser.add_argument("--redis-url", default=None,
                        help=f"ledger Redis (env VLMQ_REDIS_URL, default {keys.DEFAULT_REDIS_URL})")
    parser.add_argument("--broker-url", default=None,
                        help="Celery broker if not the ledger Redis (env VLMQ_BROKER_URL)")
    sub = parser.add_subparsers(dest="command", required=True)

    submit = sub.add_parser("submit", help="submit a job; prints its id (or its result)")
    submit.add_argument("--prompt", help="the question (with --image: one user message)")
    submit.add_argument("--image", action="append", default=[], metavar="URL",
                        help="image source: http(s) URL, s3://bucket/key or data: URI; repeatable")
    submit.add_argument("--messages", metavar="FILE",
                        help="JSON file ('-' for stdin) with a chat conversation (messages list)")
    submit.add_argument("--parts", metavar="FILE",
                        help="JSON file ('-' for stdin) with a completion prompt (prompt_parts: "
                             "text strings and image parts, no chat template)")
    submit.add_argument("--max-new-tokens", type=int, default=None)
    submit.add_argument("--temperature", type=float, default=None)
    submit.add_argument("--do-sample", action="store_true", default=None)
    submit.add_argument("--seed", type=int, default=None)
    submit.add_argument("--stop", action="append", default=None, help="stop string; repeatable")
    submit.add_argument("--bad-word", action="append", default=None, dest="bad_words",
                        help="string the answer may not contain (as tokens); repeatable")
    submit.add_argument("--end-token", action="append", default=None, dest="end_tokens",
                        help="one token of the model that ends the answer; repeatable")
    submit.add_argument("--num-beams", type=int, default=None, help="beam search when > 1")
    submit.add_argument("--model", default=None, help="route to this model's queue")
    submit.add_argument("--ttl", type=float, default=None, dest="ttl_s",
                        help="seconds before an unfinished job expires")
    submit.add_argument("--idempotency-key", default=None,
                        help="same key and same request: the first job's id, enqueued once; "
                             "same key, another request: exit 10")
    submit.add_argument("--idempotency-scope", default=None,
                        help="namespace for --idempotency-key (e.g. this producer's name)")
    submit.add_argument("--no-require-worker", action="store_false", dest="require_worker",
                        help="queue the job even if no live worker serves its model (exit 12 "
                             "otherwise)")
    submit.add_argument("--wait", action="store_true", help="wait and print the result")
    submit.add_argument("--stream", action="store_true",
                        help="print tokens as they arrive, then the final status line")
    submit.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait with --wait/--stream (default 600)")

    for name, text in (("status", "print a job's state"), ("cancel", "cancel a job")):
        sub.add_parser(name, help=text).add_argument("job_id")
    result = sub.add_parser("result", help="wait for a job and print its result")
    result.add_argument("job_id")
    result.add_argument("--timeout", type=float, default=600.0)
    stream = sub.add_parser("stream", help="print a job's tokens (replayed, then live)")
    stream.add_argument("job_id")
    stream.add_argument("--after", type=int, default=None, help="start after this seq")
    stream.add_argument("--json", action="store_true", help="print each event as JSON")
    stream.add_argument("--timeout", type=float, default=600.0)
    schema = sub.add_parser("schema", help="print the wire contract: JSON Schemas (JobRequest "
                            "as workers accept it), job id syntax, record fields, error codes")
    schema.add_argument("--cancel-lua", action="store_true",
                        help="print the cancel script instead (docs/cancel.lua)")
    admin_cli.add_parsers(sub)
    return parser


def _follow(producer: Producer, job_id: str, after: int | None, as_json: bool,
            timeout: float) -> int:
    last = None
    for event in producer.stream(job_id, after=after, timeout=timeout):
        last = event
        if as_json:
            print(event.model_dump_json(), flush=True)
        elif event.type == "restart":  # attempt n's text replaces everything printed so far
            print(f"\n[{job_id}] attempt {event.attempt} restarted the text", file=sys.stderr)
            print(event.delta, end="", flush=True)
        elif event.delta:
            print(event.delta, end="", flush=True)
    if not as_json:
        print()
        state = producer.status(job_id)
        reason = state.finish_reason or (state.error.code if state.error else "")
        print(f"[{job_id}] {state.status} {reason}".rstrip(), file=sys.stderr)
    return 0 if last is not None and last.type in ("done", "cancelled") else 1


def _read_json(name: str | None) -> Any:
    if not name:
        return None
    if name == "-":
        return json.load(sys.stdin)
    with open(name, encoding="utf-8") as handle:
        return json.load(handle)


def _submit(producer: Producer, args: argparse.Namespace) -> int:
    messages = _read_json(args.messages)
    options: dict[str, Any] = {name: getattr(args, name) for name in (
        "max_new_tokens", "temperature", "do_sample", "seed", "stop", "model", "ttl_s",
        "idempotency_key", "idempotency_scope") if getattr(args, name) is not None}
    params = {name: getattr(args, name) for name in ("bad_words", "end_tokens", "num_beams")
              if getattr(args, name) is not None}
    if params:
        options["params"] = params
    if args.parts:
        options["prompt_parts"] = _read_json(args.parts)
    job_id = producer.submit(messages, prompt=args.prompt,
                             images=args.image or None if args.prompt else None,
                             require_worker=args.require_worker, **options)
    if args.stream:
        print(f"[{job_id}]", file=sys.stderr)
        return _follow(producer, job_id, None, False, args.timeout)
    if args.wait:
        _print(producer.result(job_id, timeout=args.timeout).model_dump(mode="json"))
        return 0
    print(job_id)
    return 0


# what each error prints and the exit code it gives (README: exit codes), most specific first
_EXITS: list[tuple[type[BaseException] | tuple[type[BaseException], ...], int, str]] = [
    (InvalidRequestError, 2, ""),
    ((JobNotFound, JobTimeout), 3, ""),
    (JobFailed, 4, ""),
    (NotAllowed, 6, ""),
    (ResultUnavailable, 7, ""),
    (CorruptRecord, 9, ""),
    (IdempotencyConflict, 10, ""),
    (SigningError, 8, "cannot sign: "),
    (SubmitUncertain, 11, ""),
    (NoWorkerForModel, 12, ""),
    (redis.exceptions.AuthenticationError, 5,
     "Redis refused the credentials (authentication failed): "),
    ((OSError, redis.exceptions.ConnectionError, kombu.exceptions.OperationalError), 5,
     "cannot reach Redis/broker: "),
]


def _run(producer: Producer, args: argparse.Namespace) -> int:
    if args.command == "submit":
        return _submit(producer, args)
    if args.command in admin_cli.COMMANDS:
        return admin_cli.run(producer, args)
    if args.command == "stream":
        return _follow(producer, args.job_id, args.after, args.json, args.timeout)
    if args.command == "status":
        _print(producer.status(args.job_id).model_dump(mode="json"))
    elif args.command == "result":
        _print(producer.result(args.job_id, timeout=args.timeout).model_dump(mode="json"))
    elif args.command == "cancel":
        _print({"job_id": args.job_id, "answer": producer.cancel(args.job_id)})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "schema":
        if args.cancel_lua:
            print(contract.cancel_lua(), end="")
        else:
            _print(contract.document())
        return 0
    env = os.environ.get
    try:
        with Producer(args.redis_url or env("VLMQ_REDIS_URL", keys.DEFAULT_REDIS_URL),
                      broker_url=args.broker_url or env("VLMQ_BROKER_URL"),
                      s3=S3Config.from_env(os.environ),  # only for results stored in S3
                      queued_retention_s=int(env("VLMQ_QUEUED_RETENTION_S", DEFAULT_QUEUED)),
                      security_key=env("VLMQ_SECURITY_KEY"),
                      security_certificate=env("VLMQ_SECURITY_CERTIFICATE"),
                      security_key_password=env("VLMQ_SECURITY_KEY_PASSWORD")) as producer:
            return _run(producer, args)
    except Exception as error:
        for kinds, code, prefix in _EXITS:
            if isinstance(error, kinds):
                if isinstance(error, JobFailed):
                    _print(error.state.model_dump(mode="json"))
                print(f"vlmq: {prefix}{error}", file=sys.stderr)
                return code
        raise


if __name__ == "__main__":
    raise SystemExit(main())
