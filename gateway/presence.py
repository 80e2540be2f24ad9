"""Each gateway announces itself and its limits in Redis (``gateway.names.instance_key``, JSON,
kept for three beats), so ``vlmq-gateway stats`` shows every live replica's admission limits
and quotas beside the producer's view of the queues (depth, oldest queued job)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from typing import Any

import redis
import redis.asyncio as aioredis

from gateway import names
from gateway.settings import GatewaySettings

BEAT_S = 10.0


def announcement(settings: GatewaySettings, instance_id: str, started_at: float) -> dict[str, Any]:
    return {"gateway": instance_id, "host": socket.gethostname(), "pid": os.getpid(),
            "bind": f"{settings.host}:{settings.port}", "started_at": started_at,
            "ts": time.time(), "limits": {
                "max_queue_depth": settings.max_queue_depth,
                "max_queued_age_s": settings.max_queued_age_s,
                "requests_per_minute": settings.requests_per_minute,
                "concurrent_jobs": settings.concurrent_jobs,
                "max_body_bytes": settings.max_body_bytes, "max_batch": settings.max_batch}}


async def announce(client: aioredis.Redis, settings: GatewaySettings) -> None:
    """Write the announcement every beat until cancelled; then remove it."""
    instance_id, started_at = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}", time.time()
    key = names.instance_key(instance_id)
    try:
        while True:
            with contextlib.suppress(redis.RedisError):  # Redis away: /readyz says so
                body = json.dumps(announcement(settings, instance_id, started_at))
                await client.set(key, body, ex=int(BEAT_S * 3))
            await asyncio.sleep(BEAT_S)
    finally:
        with contextlib.suppress(redis.RedisError):
            await client.delete(key)


def live(client: redis.Redis) -> list[dict[str, Any]]:
    """Every live gateway's last announcement."""
    found = sorted(client.scan_iter(match=names.INSTANCE_PATTERN))
    return [json.loads(raw) for raw in (client.mget(found) if found else []) if raw]
