"""Prometheus metrics of one gateway process (``GET /metrics``), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.settings import GatewaySettings

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, settings: GatewaySettings) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("vlmq_gateway_requests", "HTTP requests by route and status",
                                ["route", "method", "status", "tenant"], registry=registry)
        self.latency = Histogram("vlmq_gateway_request_seconds",
                                 "Time to the response's headers (streams: to their start)",
                                 ["route", "method"], registry=registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.open_streams = Gauge("vlmq_gateway_open_streams", "SSE responses in progress",
                                  ["route"], registry=registry)
        self.rejected = Counter("vlmq_gateway_rejected", "Requests refused, by reason",
                                ["reason"], registry=registry)
        self.jobs = Counter("vlmq_gateway_jobs_submitted", "Jobs submitted, by tenant",
                            ["tenant"], registry=registry)
        self.disconnect_cancels = Counter("vlmq_gateway_disconnect_cancels",
                                          "Jobs cancelled because their client went away",
                                          registry=registry)
        self.queue_depth = Gauge("vlmq_gateway_queue_depth",
                                 "Messages waiting in a model's queue, at the last admission "
                                 "check", ["queue"], registry=registry)
        self.oldest_queued = Gauge("vlmq_gateway_oldest_queued_seconds",
                                   "Age of the oldest queued job, at the last admission check",
                                   ["queue"], registry=registry)
        limits = Gauge("vlmq_gateway_limit", "Configured limits (0 = off)", ["limit"],
                       registry=registry)
        limits.labels("max_queue_depth").set(settings.max_queue_depth)
        limits.labels("max_queued_age_seconds").set(settings.max_queued_age_s)
        limits.labels("requests_per_minute").set(settings.requests_per_minute)
        limits.labels("concurrent_jobs").set(settings.concurrent_jobs)
        limits.labels("max_body_bytes").set(settings.max_body_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
