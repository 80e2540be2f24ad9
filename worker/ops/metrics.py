"""Prometheus metrics of one worker, served over HTTP on ``VLMQ_METRICS_PORT`` (0: off).

Hooked in at the task level (``worker.tasks``): every job that ends here is counted by final
status and error code; finished jobs feed the latency histograms from their Outcome timings.

- ``vlmq_jobs_total{status,code}``: jobs ended by this worker (code ``none`` unless FAILED)
- ``vlmq_queue_wait_seconds``: submission to claim
- ``vlmq_time_to_first_token_seconds``: submission to the first generated token
- ``vlmq_job_latency_seconds``: submission to the end of generation
- ``vlmq_generation_tokens_per_second``: completion tokens / generation time, per job
- ``vlmq_batch_size``: rows in each generation batch (observed once per batch)

What a job's Work carries is all they read (the engine records its first-token time and batch
size there); metrics never read Redis.
- ``vlmq_images_fetched_total``, ``vlmq_image_cache_hits_total``: from the media loader
- ``vlmq_model_weight_bytes``, ``vlmq_gpu_memory_allocated_bytes``,
  ``vlmq_gpu_memory_reserved_bytes``, ``vlmq_jobs_in_hand``
"""

from __future__ import annotations

import collections
import functools
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from worker.engine.work import Outcome, Work

log = logging.getLogger("vlmq.metrics")

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_RATES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)


class _MediaCollector:
    """Reads the media loader's own ``fetches`` / ``cache_hits`` counters when it has them;
    without ``fetches``, counts the images of the jobs this worker finished."""

    def __init__(self, media: Any, fallback: Callable[[], float]) -> None:
        self.media = media
        self.fallback = fallback

    def collect(self) -> Iterator[Metric]:
        fetched = getattr(self.media, "fetches", None)
        value = fetched if isinstance(fetched, int | float) else self.fallback()
        yield CounterMetricFamily("vlmq_images_fetched", "Images fetched and decoded",
                                  value=float(value))
        hits = getattr(self.media, "cache_hits", None)
        if isinstance(hits, int | float):
            yield CounterMetricFamily("vlmq_image_cache_hits",
                                      "Image fetches answered from the cache", value=float(hits))


def _gpu_bytes(device: Any, kind: str) -> float:
    torch = sys.modules.get("torch")  # loaded by the model already; never imported from here
    if torch is None or getattr(device, "type", "cpu") != "cuda":
        return 0.0
    read = torch.cuda.memory_allocated if kind == "allocated" else torch.cuda.memory_reserved
    return float(read(device))


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Counter("vlmq_jobs", "Jobs ended by this worker, by final status and error "
                            "code", ["status", "code"], registry=r)
        self.quarantined = Counter("vlmq_records_quarantined", "Job records the reconciler "
                                   "took out of the indexes: not readable as a job", registry=r)
        self.refused = Counter("vlmq_messages_refused", "Broker messages refused unrun, by "
                               "reason (unknown_task, callbacks, malformed, rejected)",
                               ["reason"], registry=r)
        self.queue_wait = Histogram("vlmq_queue_wait_seconds", "Submission to claim",
                                    buckets=_SECONDS, registry=r)
        self.ttft = Histogram("vlmq_time_to_first_token_seconds",
                              "Submission to the first generated token", buckets=_SECONDS,
                              registry=r)
        self.latency = Histogram("vlmq_job_latency_seconds", "Submission to end of generation",
                                 buckets=_SECONDS, registry=r)
        self.tokens_per_s = Histogram("vlmq_generation_tokens_per_second",
                                      "Completion tokens per second of generation, per job",
                                      buckets=_RATES, registry=r)
        self.batch_size = Histogram("vlmq_batch_size", "Rows in a generation batch",
                                    buckets=_BATCH, registry=r)
        self.weight_bytes = Gauge("vlmq_model_weight_bytes", "Bytes of model weights",
                                  registry=r)
        self._images = 0
        self._seen_batches: collections.deque[float] = collections.deque(maxlen=4096)
        self._lock = threading.Lock()
        ProcessCollector(registry=r)

    def bind(self, loaded: Any, media: Any, in_hand: Callable[[], int]) -> None:
        """Attach the gauges that read the model, the GPU and the media loader."""
        self.weight_bytes.set(float(getattr(loaded, "weight_bytes", 0)))
        device = getattr(loaded, "device", None)
        for kind in ("allocated", "reserved"):
            gauge = Gauge(f"vlmq_gpu_memory_{kind}_bytes", f"GPU memory {kind} by torch",
                          registry=self.registry)
            gauge.set_function(functools.partial(_gpu_bytes, device, kind))
        Gauge("vlmq_jobs_in_hand", "Jobs claimed by this worker and not yet finished",
              registry=self.registry).set_function(lambda: float(in_hand()))
        self.registry.register(_MediaCollector(media, lambda: float(self._images)))

    def serve(self, port: int, addr: str) -> bool:
        if not port:
            return False
        try:
            start_http_server(port, addr=addr, registry=self.registry)
        except OSError as error:
            log.warning("metrics endpoint not started on %s:%d: %s", addr, port, error)
            return False
        log.info("metrics on http://%s:%d/metrics", addr, port)
        return True

    # -- hooks called by worker.tasks -------------------------------------------------------

    def refused_message(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def job_ended(self, status: str, code: str | None = None) -> None:
        self.jobs.labels(status=status, code=code or "none").inc()

    def job_finished(self, work: Work, outcome: Outcome) -> None:
        """Timings of a job that generated (whatever its final status), from its Outcome and
        what the engine recorded on its Work (first token time, batch size)."""
        timings = outcome.timings
        self.queue_wait.observe(max(0.0, timings.queued_ms / 1000))
        self.latency.observe(max(0.0, timings.total_ms / 1000))
        if work.first_token_at and work.created_at:
            self.ttft.observe(max(0.0, work.first_token_at - work.created_at))
        tokens = outcome.usage.completion_tokens
        if tokens and timings.generate_ms > 0:
            self.tokens_per_s.observe(tokens / (timings.generate_ms / 1000))
        with self._lock:
            self._images += len(work.request.image_sources())
        self._observe_batch(work)

    def _observe_batch(self, work: Work) -> None:
        """Once per batch: the rows of one batch share ``gen_started``."""
        if not work.gen_started or not work.batch_size:
            return
        with self._lock:
            if work.gen_started in self._seen_batches:
                return
            self._seen_batches.append(work.gen_started)
        self.batch_size.observe(work.batch_size)
