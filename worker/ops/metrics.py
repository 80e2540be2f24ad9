"""Prometheus metrics of one worker, served with the probes on ``VLMQ_METRICS_PORT`` (0: off).

Every series carries a ``model`` label (the model this worker serves). Job series are fed at the
task level (``worker.tasks``) from what the engine recorded on each Work; nothing here reads
Redis except the queue gauges, read from the ledger at scrape time (cached a few seconds).
``_created`` series are off.

- ``vlmq_jobs_total{status}``: jobs ended here (succeeded, failed, cancelled, expired);
  ``vlmq_job_failures_total{code}``; ``vlmq_image_fetch_failures_total{reason}``
- ``vlmq_queue_time_seconds``: submission to claim
- ``vlmq_time_to_first_token_seconds``: the start of the job's prefill to its first token
- ``vlmq_time_per_output_token_seconds``: after the first token, per further token
- ``vlmq_e2e_seconds``: submission to the end of generation
- ``vlmq_prefill_seconds``, ``vlmq_fetch_seconds``, ``vlmq_preprocess_seconds``
- ``vlmq_prompt_tokens_total``, ``vlmq_generation_tokens_total``
- ``vlmq_batch_size``: rows in the batch a job ran in (once per batch)
- ``vlmq_running_rows``, ``vlmq_waiting_jobs``: jobs in hand generating / not yet
- ``vlmq_queue_depth``, ``vlmq_queued_jobs``, ``vlmq_oldest_queued_age_seconds``: per model,
  from the ledger and the broker (every worker exports them: aggregate with ``max by (model)``;
  ``vlmq stats --prometheus`` prints the same)
- ``vlmq_images_fetched_total``, ``vlmq_image_cache_hits_total``, ``vlmq_model_weight_bytes``,
  ``vlmq_gpu_memory_allocated_bytes``, ``vlmq_gpu_memory_reserved_bytes``, ``process_*``
"""

from __future__ import annotations

import collections
import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from producer.exposition import samples
from worker.engine.work import Outcome, Work

log = logging.getLogger("vlmq.metrics")
disable_created_metrics()

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)
_BACKLOG_TTL_S = 5.0


class _MediaCollector:
    """The media loader's own ``fetches`` / ``cache_hits`` counters."""

    def __init__(self, media: Any, model: str) -> None:
        self.media = media
        self.model = model

    def collect(self) -> Iterator[Metric]:
        for name, attr, text in (("vlmq_images_fetched", "fetches", "Images fetched"),
                                 ("vlmq_image_cache_hits", "cache_hits",
                                  "Image loads answered from the cache")):
            value = getattr(self.media, attr, None)
            if isinstance(value, int | float):
                family = CounterMetricFamily(name, text, labels=["model"])
                family.add_metric([self.model], float(value))
                yield family


class _BacklogCollector:
    """Per-model queue gauges from ``backlog()`` (``producer.admin``), cached briefly."""

    def __init__(self, backlog: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.backlog = backlog
        self._cached: tuple[float, dict[str, dict[str, Any]]] = (0.0, {})
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            at, found = self._cached
            if time.monotonic() - at > _BACKLOG_TTL_S:
                try:
                    found = self.backlog()
                except Exception as error:  # Redis away: the gauges are absent, not stale
                    log.debug("queue gauges unavailable: %s", error)
                    found = {}
                self._cached = (time.monotonic(), found)
        families: dict[str, GaugeMetricFamily] = {}
        for name, text, model, value in samples(found):
            family = families.setdefault(name, GaugeMetricFamily(name, text, labels=["model"]))
            family.add_metric([model], value)
        yield from families.values()


def _gpu_bytes(device: Any, kind: str) -> float:
    torch = sys.modules.get("torch")  # loaded by the model already; never imported from here
    if torch is None or getattr(device, "type", "cpu") != "cuda":
        return 0.0
    read = torch.cuda.memory_allocated if kind == "allocated" else torch.cuda.memory_reserved
    return float(read(device))


class Metrics:
    def __init__(self, model: str = "", registry: CollectorRegistry | None = None) -> None:
        self.model = model
        self.registry = registry or CollectorRegistry()
        r, m = self.registry, ["model"]

        def seconds(name: str, text: str, buckets: tuple[float, ...] = _SECONDS) -> Any:
            return Histogram(name, text, m, buckets=buckets, registry=r).labels(model)

        self.jobs = Counter("vlmq_jobs", "Jobs ended by this worker, by final status",
                            ["model", "status"], registry=r)
        self.failures = Counter("vlmq_job_failures", "Failed jobs by error code",
                                ["model", "code"], registry=r)
        self.fetch_failures = Counter("vlmq_image_fetch_failures",
                                      "Jobs failed on an image, by reason", ["model", "reason"],
                                      registry=r)
        self.queue_time = seconds("vlmq_queue_time_seconds", "Submission to claim")
        self.ttft = seconds("vlmq_time_to_first_token_seconds",
                            "Start of the job's prefill to its first token")
        self.tpot = seconds("vlmq_time_per_output_token_seconds",
                            "Time per output token after the first", _FAST)
        self.e2e = seconds("vlmq_e2e_seconds", "Submission to the end of generation")
        self.prefill = seconds("vlmq_prefill_seconds", "The job's prefill")
        self.fetch = seconds("vlmq_fetch_seconds", "Fetching and decoding the job's images")
        self.preprocess = seconds("vlmq_preprocess_seconds", "The processor, per job")
        self.prompt_tokens = Counter("vlmq_prompt_tokens", "Prompt tokens (images included)",
                                     m, registry=r).labels(model)
        self.generation_tokens = Counter("vlmq_generation_tokens", "Generated tokens", m,
                                         registry=r).labels(model)
        self.batch_size = Histogram("vlmq_batch_size", "Rows in the batch a job ran in", m,
                                    buckets=_BATCH, registry=r).labels(model)
        self.weight_bytes = Gauge("vlmq_model_weight_bytes", "Bytes of model weights", m,
                                  registry=r).labels(model)
        self._seen_batches: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=4096)
        self.quarantined = Counter("vlmq_records_quarantined", "Job records the reconciler "
                                   "took out of the indexes: not readable as a job", m,
                                   registry=r).labels(model)
        self.refused = Counter("vlmq_messages_refused", "Broker messages refused unrun, by "
                               "reason (unknown_task, callbacks, malformed, rejected)",
                               ["model", "reason"], registry=r)
        self._lock = threading.Lock()
        ProcessCollector(registry=r)

    def bind(self, loaded: Any, media: Any, in_hand: Callable[[], list[Work]],
             backlog: Callable[[], dict[str, dict[str, Any]]] | None = None) -> None:
        """Attach the gauges that read the model, the GPU, the jobs in hand, the media loader
        and (``backlog``) the queues."""
        self.weight_bytes.set(float(getattr(loaded, "weight_bytes", 0)))
        device = getattr(loaded, "device", None)
        for kind in ("allocated", "reserved"):
            gauge = Gauge(f"vlmq_gpu_memory_{kind}_bytes", f"GPU memory {kind} by torch",
                          ["model"], registry=self.registry).labels(self.model)
            gauge.set_function(functools.partial(_gpu_bytes, device, kind))
        running = Gauge("vlmq_running_rows", "Jobs in hand that are generating", ["model"],
                        registry=self.registry).labels(self.model)
        running.set_function(lambda: float(sum(1 for w in in_hand() if w.gen_started)))
        waiting = Gauge("vlmq_waiting_jobs", "Jobs in hand not yet generating (fetching, "
                        "preprocessing, waiting for a batch)", ["model"],
                        registry=self.registry).labels(self.model)
        waiting.set_function(lambda: float(sum(1 for w in in_hand() if not w.gen_started)))
        self.registry.register(_MediaCollector(media, self.model))
        if backlog is not None:
            self.registry.register(_BacklogCollector(backlog))

    # -- hooks called by worker.tasks -------------------------------------------------------

    def refused_message(self, reason: str) -> None:
        self.refused.labels(self.model, reason).inc()

    def job_ended(self, status: str, code: str | None = None) -> None:
        self.jobs.labels(self.model, status.lower()).inc()
        if code:
            self.failures.labels(self.model, code).inc()
            if code.startswith("IMAGE_"):
                self.fetch_failures.labels(self.model,
                                           code.removeprefix("IMAGE_").lower()).inc()

    def job_finished(self, work: Work, outcome: Outcome) -> None:
        """Timings of a job that generated (whatever its final status), from its Outcome and
        what the engine recorded on its Work."""
        timings = outcome.timings
        self.queue_time.observe(max(0.0, timings.queued_ms / 1000))
        self.e2e.observe(max(0.0, timings.total_ms / 1000))
        self.fetch.observe(max(0.0, work.fetch_ms / 1000))
        self.preprocess.observe(max(0.0, work.preprocess_ms / 1000))
        self.prompt_tokens.inc(outcome.usage.prompt_tokens)
        tokens = outcome.usage.completion_tokens
        self.generation_tokens.inc(tokens)
        if work.first_token_at and work.gen_started:
            first = max(0.0, work.first_token_at - work.gen_started)
            self.ttft.observe(first)
            self.prefill.observe(work.prefill_ms / 1000 if work.prefill_ms else first)
            rest = timings.generate_ms / 1000 - first
            if tokens > 1 and rest > 0:
                self.tpot.observe(rest / (tokens - 1))
        self._observe_batch(work)

    def _observe_batch(self, work: Work) -> None:
        """Once per batch: the rows of one batch share ``gen_started`` and its size."""
        if not work.gen_started or not work.batch_size:
            return
        key = (work.gen_started, work.batch_size)
        with self._lock:
            if key in self._seen_batches:
                return
            self._seen_batches.append(key)
        self.batch_size.observe(work.batch_size)
