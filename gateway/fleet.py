"""What the gateway reads about the fleet, through the producer's admin views: live workers'
advertisements (``AsyncProducer.workers``), a queue's depth (``queue_depth``) and its oldest
queued job (``jobs``), each answer cached for ``ttl_s`` so a burst of requests costs one look.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from producer import JobStatus
from producer.aio import AsyncProducer

OLDEST_SCAN = 500  # queued jobs looked at (oldest first) to find the oldest of one queue


@dataclass(frozen=True)
class QueueLoad:
    depth: int  # messages waiting in the broker
    oldest_age_s: float  # age of the oldest QUEUED job of this queue (0 when none)


class Fleet:
    def __init__(self, producer: AsyncProducer, ttl_s: float = 1.0) -> None:
        self.producer = producer
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Any]] = {}

    async def _cached(self, name: str, fetch: Callable[[], Awaitable[Any]]) -> Any:
        hit = self._cache.get(name)
        if hit and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        value = await fetch()
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
            started = int(worker.get("started_at", 0))
            entry = found.setdefault(str(model), {"id": str(model), "workers": 0,
                                                  "created": started})
            entry["workers"] += 1
            entry["created"] = min(entry["created"], started)
        return sorted(found.values(), key=lambda m: m["id"])

    async def load(self, queue: str) -> QueueLoad:
        depth = await self._cached(f"depth:{queue}", lambda: self.producer.queue_depth(queue))
        oldest = await self._cached(f"oldest:{queue}", lambda: self._oldest(queue))
        return QueueLoad(int(depth or 0), float(oldest))

    async def _oldest(self, queue: str) -> float:
        for state in await self.producer.jobs(JobStatus.QUEUED, limit=OLDEST_SCAN):
            if state.queue == queue:  # oldest first
                return max(0.0, time.time() - state.created_at)
        return 0.0
