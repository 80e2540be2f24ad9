"""``vlmq-gateway``: serve the HTTP gateway, or manage its API keys.

    vlmq-gateway serve [--host 127.0.0.1] [--port 8000] [limits...]
    vlmq-gateway keys create NAME [--requests-per-minute N] [--concurrent-jobs N]
    vlmq-gateway keys list | keys revoke NAME
    vlmq-gateway stats      # live gateways and their limits, queue depths, oldest queued job

(The key commands live here, not in ``vlmq``, so that the producer never depends on the
gateway.) Bound to a non-loopback address with no API key created, ``serve`` refuses to start
unless ``--insecure-no-auth``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import redis

from gateway import presence
from gateway.auth import KeyAdmin
from gateway.settings import GatewaySettings, is_loopback
from producer import keys
from producer.s3 import S3Config


def _parser(env: dict[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmq-gateway", description="HTTP gateway to vlmq: OpenAI chat completions, a job "
        "API with resumable event streams, API keys, quotas, admission control, a test page.",
        epilog="Like vlmq: results stored in S3 are read with VLMQ_S3_ENDPOINT_URL, "
        "VLMQ_S3_REGION, VLMQ_S3_ACCESS_KEY_ID, VLMQ_S3_SECRET_ACCESS_KEY (else the AWS chain); "
        "VLMQ_SECURITY_KEY and VLMQ_SECURITY_CERTIFICATE (VLMQ_SECURITY_KEY_PASSWORD) sign jobs "
        "for workers that require it. Exit codes: 2 refused (bad key name, public bind without "
        "a key), 3 no such key, 5 Redis unreachable.")
    parser.add_argument("--redis-url", default=env.get("VLMQ_REDIS_URL", keys.DEFAULT_REDIS_URL),
                        help="ledger Redis (env VLMQ_REDIS_URL); the gateway's keys live there")
    parser.add_argument("--broker-url", default=env.get("VLMQ_BROKER_URL"),
                        help="Celery broker if not the ledger Redis (env VLMQ_BROKER_URL)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1; others need a key to exist)")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="allow a non-loopback bind while no API key exists")
    serve.add_argument("--requests-per-minute", type=int, default=0,
                       help="per key, unless the key sets its own (0: unlimited)")
    serve.add_argument("--concurrent-jobs", type=int, default=0,
                       help="unfinished jobs per key, unless the key sets its own (0: unlimited)")
    serve.add_argument("--max-queue-depth", type=int, default=0,
                       help="refuse new jobs (503) while the model's queue holds this many")
    serve.add_argument("--max-queued-age", type=float, default=0.0, metavar="SECONDS",
                       help="refuse new jobs (503) while the oldest queued job is older")
    serve.add_argument("--require-worker", action="store_true",
                       help="refuse new jobs (503) for a model no live worker serves (default: "
                            "queue them; a worker started later takes them)")
    serve.add_argument("--retry-after", type=int, default=5, metavar="SECONDS",
                       help="Retry-After sent with admission refusals (default 5)")
    serve.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024,
                       help="larger request bodies get 413 (default 16 MiB)")
    serve.add_argument("--max-json-depth", type=int, default=32,
                       help="deeper JSON gets 400 (default 32)")
    serve.add_argument("--max-batch", type=int, default=64,
                       help="job requests per POST /v1/jobs:batch (default 64)")
    serve.add_argument("--cors-origin", action="append", default=[],
                       help="allow this browser origin (repeatable); CORS is off without it")
    serve.add_argument("--log-level", default="info",
                       help="one line per request at info, with its tenant (default info)")
    sub.add_parser("stats", help="live gateways and their limits, with the queues' depths and "
                   "oldest queued job (the producer's stats) as JSON")
    key_cmd = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action",
                                                                            required=True)
    create = key_cmd.add_parser("create", help="create a key; prints it once")
    create.add_argument("name", help="the tenant name its jobs carry")
    create.add_argument("--requests-per-minute", type=int, default=None)
    create.add_argument("--concurrent-jobs", type=int, default=None)
    key_cmd.add_parser("list", help="list keys (names and prefixes, never the keys)")
    key_cmd.add_parser("revoke", help="revoke a key by name").add_argument("name")
    return parser


def _keys(args: argparse.Namespace) -> int:
    admin = KeyAdmin(redis.Redis.from_url(args.redis_url))
    if args.action == "create":
        try:
            key = admin.create(args.name, args.requests_per_minute, args.concurrent_jobs)
        except ValueError as error:
            print(f"vlmq-gateway: {error}", file=sys.stderr)
            return 2
        print(json.dumps({"name": args.name, "key": key}))
        return 0
    if args.action == "list":
        print(json.dumps(admin.list(), indent=2))
        return 0
    if admin.revoke(args.name):
        print(json.dumps({"revoked": args.name}))
        return 0
    print(f"vlmq-gateway: no key named {args.name!r}", file=sys.stderr)
    return 3


def settings_from(args: argparse.Namespace, env: dict[str, str]) -> GatewaySettings:
    return GatewaySettings(
        s3=S3Config.from_env(env), security_key=env.get("VLMQ_SECURITY_KEY") or None,
        security_certificate=env.get("VLMQ_SECURITY_CERTIFICATE") or None,
        security_key_password=env.get("VLMQ_SECURITY_KEY_PASSWORD") or None,
        redis_url=args.redis_url, broker_url=args.broker_url, host=args.host, port=args.port,
        insecure_no_auth=args.insecure_no_auth, requests_per_minute=args.requests_per_minute,
        concurrent_jobs=args.concurrent_jobs, max_queue_depth=args.max_queue_depth,
        max_queued_age_s=args.max_queued_age, admission_retry_after_s=args.retry_after,
        max_body_bytes=args.max_body_bytes, max_json_depth=args.max_json_depth,
        max_batch=args.max_batch, cors_origins=tuple(args.cors_origin),
        require_worker=args.require_worker)


def _serve(args: argparse.Namespace, env: dict[str, str]) -> int:
    settings = settings_from(args, env)
    if not is_loopback(settings.host) and not settings.insecure_no_auth \
            and not KeyAdmin(redis.Redis.from_url(settings.redis_url)).list():
        print(f"vlmq-gateway: refusing to serve {settings.host} with no API key: create one "
              "(vlmq-gateway keys create NAME) or pass --insecure-no-auth", file=sys.stderr)
        return 2
    import uvicorn

    from gateway.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=args.log_level, access_log=False, timeout_graceful_shutdown=5)
    return 0


def _stats(args: argparse.Namespace) -> int:
    from producer import Producer

    with Producer(args.redis_url, broker_url=args.broker_url) as producer:
        found = producer.stats()
    print(json.dumps({"gateways": presence.live(redis.Redis.from_url(args.redis_url)), **found},
                     indent=2))
    return 0


COMMANDS = {"keys": _keys, "stats": _stats}


def main(argv: list[str] | None = None) -> None:
    env = dict(os.environ)
    args = _parser(env).parse_args(argv)
    try:
        code = COMMANDS[args.command](args) if args.command in COMMANDS else _serve(args, env)
    except redis.RedisError as error:
        print(f"vlmq-gateway: Redis: {error}", file=sys.stderr)
        code = 5
    sys.exit(code)
