"""What the gateway reads about the fleet that ``AsyncProducer`` does not offer (yet): live
workers' advertisements, a queue's depth and its oldest queued job.

THE ONE PLACE that reaches past ``AsyncProducer``: it calls the blocking ``Producer``'s admin
views (``workers``, ``queue_depth``; today they read the ``vlmq:worker:{id}`` health keys and
the broker's lists) and reads the queued index (``producer.keys``) itself, in a thread, and
caches each answer for ``ttl_s`` so a burst of requests costs one look. Move this behind an
async producer API when there is one; nothing else in the gateway needs to change.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from producer import Producer, keys

CHUNK = 200
SCAN_LIMIT = 2000  # queued jobs looked at, oldest first, to find one of the queue


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class QueueLoad:
    depth: int  # messages waiting in the broker
    oldest_age_s: float  # age of the oldest QUEUED job of this queue (0 when none)


class Fleet:
    def __init__(self, producer: Producer, ttl_s: float = 1.0) -> None:
        self.producer = producer
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Any]] = {}

    async def _cached(self, name: str, fn: Any, *args: Any) -> Any:
        hit = self._cache.get(name)
        if hit and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        value = await asyncio.to_thread(fn, *args)
        self._cache[name] = (time.monotonic(), value)
        return value

    async def workers(self) -> list[dict[str, Any]]:
        """Live workers' last health reports (model, queues, consuming, ts, ...)."""
        return list(await self._cached("workers", self.producer.workers))

    async def models(self) -> list[dict[str, Any]]:
        """One entry per model some live, consuming worker serves: id, first seen, workers."""
        found: dict[str, dict[str, Any]] = {}
        for worker in await self.workers():
            model = worker.get("model")
            if not model or not worker.get("consuming"):
                continue
            entry = found.setdefault(str(model), {"id": str(model), "workers": 0,
                                                  "created": int(worker.get("started_at", 0))})
            entry["workers"] += 1
            entry["created"] = min(entry["created"], int(worker.get("started_at", 0)))
        return sorted(found.values(), key=lambda m: m["id"])

    async def load(self, queue: str) -> QueueLoad:
        depth = await self._cached(f"depth:{queue}", self.producer.queue_depth, queue)
        oldest = await self._cached(f"oldest:{queue}", self._oldest, queue)
        return QueueLoad(int(depth or 0), oldest)

    def _oldest(self, queue: str) -> float:
        """Age of the oldest QUEUED job of ``queue``: the queued index oldest first, in chunks,
        reading only each record's ``queue`` field (not the whole request)."""
        client = self.producer.redis
        for start in range(0, SCAN_LIMIT, CHUNK):
            found = client.zrange(keys.QUEUED_INDEX, start, start + CHUNK - 1, withscores=True)
            if not found:
                break
            pipe = client.pipeline(transaction=False)
            for job_id, _created in found:
                pipe.hget(keys.job_key(_text(job_id)), "queue")
            for (_job_id, created), owner in zip(found, pipe.execute(), strict=True):
                if owner is not None and _text(owner) == queue:
                    return max(0.0, time.time() - float(created))
        return 0.0

    def close(self) -> None:
        self.producer.close()
