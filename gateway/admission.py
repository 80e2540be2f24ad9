"""Admission control: refuse new jobs for a model whose queue is already too deep, or whose
oldest queued job has waited too long, instead of letting them wait without end.

Both answer 503 (the service, not the caller, is over capacity) with ``Retry-After``; the
reason (``queue_depth`` or ``queue_age``) is in the error code and in ``/metrics``.
"""

from __future__ import annotations

from gateway.errors import ApiError
from gateway.fleet import Fleet
from gateway.metrics import Metrics
from gateway.settings import GatewaySettings
from producer.broker import queue_for_model  # the queue the producer sends a model to


class Admission:
    def __init__(self, fleet: Fleet, settings: GatewaySettings, metrics: Metrics) -> None:
        self.fleet = fleet
        self.settings = settings
        self.metrics = metrics

    @property
    def enabled(self) -> bool:
        return self.settings.max_queue_depth > 0 or self.settings.max_queued_age_s > 0

    async def check(self, model: str | None) -> None:
        if not self.enabled:
            return
        queue = queue_for_model(model)
        load = await self.fleet.load(queue)
        self.metrics.queue_depth.labels(queue).set(load.depth)
        self.metrics.oldest_queued.labels(queue).set(load.oldest_age_s)
        limit, age = self.settings.max_queue_depth, self.settings.max_queued_age_s
        retry = self.settings.admission_retry_after_s
        if limit and load.depth >= limit:
            raise ApiError(503, f"queue {queue} holds {load.depth} jobs (limit {limit}); "
                           "try again later", code="queue_depth", retry_after=retry)
        if age and load.oldest_age_s > age:
            raise ApiError(503, f"the oldest job in queue {queue} has waited "
                           f"{load.oldest_age_s:.0f} s (limit {age:.0f} s); try again later",
                           code="queue_age", retry_after=retry)
