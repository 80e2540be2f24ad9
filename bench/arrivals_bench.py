"""Arrivals under load: Poisson arrivals at 50% and 80% of one-at-a-time capacity, three ways.

Models (``worker/tiny.py``, built offline): the tiny idefics3 (steps of a few ms and a cheap
prefill: the regime of a GPU) and a random model at SmolVLM-256M's real dimensions (on one CPU
thread its vision encoder makes the prefill about 3 s of a 5 s job, and a prefill costs the same
per image batched or not); ``BENCH_ARRIVALS_MODELS`` (default ``tiny,256m``) picks.
Torch is pinned to ``BENCH_THREADS`` threads (default 1) in the worker. The same jobs (one
image each, ``max_new_tokens`` drawn from 4-40, so output lengths vary 10:1) arrive at the same
seeded Poisson times at each of three services, run one after another:
- one-at-a-time: the static engine with ``VLMQ_MAX_BATCH_SIZE=1`` (one job at a time);
- static: the static engine (one ``generate`` per batch), batches of up to 8;
- continuous: the continuous engine, up to 8 rows.
Capacity is measured first on the one-at-a-time service: the first 20 jobs run one by one (each
waited for), capacity = jobs / seconds. Prints p50 / p99 latency (submit to result) and throughput
(jobs / seconds from the first submit to the last result) per service and load, and the ratios
continuous / one-at-a-time and continuous / static.
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

os.environ.setdefault("BENCH_THREADS", "1")

from bench.common import QUICK, jobs, report, service, summary  # noqa: E402
from worker.tiny import tiny_model_path  # noqa: E402

JOBS = int(os.environ.get("BENCH_ARRIVALS_JOBS", "16" if QUICK else "60"))
CALIBRATION = 20  # jobs run one by one to measure capacity
MODELS = {"tiny": ("tiny idefics3", "tiny"), "256m": ("SmolVLM-256M size", "smolvlm-256m")}
LOADS = (0.5, 0.8)
SERVICES = {"one-at-a-time": {"VLMQ_SCHEDULER": "static", "VLMQ_MAX_BATCH_SIZE": "1"},
            "static": {"VLMQ_SCHEDULER": "static", "VLMQ_MAX_BATCH_SIZE": "8"},
            "continuous": {"VLMQ_SCHEDULER": "continuous", "VLMQ_MAX_BATCH_SIZE": "8"}}


def workload(images: Any, seed: int = 11) -> list[tuple[dict[str, Any], int]]:
    """The jobs, each with its own max_new_tokens (4-40)."""
    rng = random.Random(seed)
    return [(request, rng.randint(4, 40)) for request in jobs(images, JOBS)]


def capacity(producer: Any, name: str, work: list[tuple[dict[str, Any], int]]) -> float:
    """Jobs per second, one by one, each waited for."""
    started = time.perf_counter()
    for request, tokens in work:
        producer.result(producer.submit(request["messages"], model=name,
                                        max_new_tokens=tokens), timeout=900)
    return len(work) / (time.perf_counter() - started)


def arrivals(producer: Any, name: str, work: list[tuple[dict[str, Any], int]],
             rate: float, seed: int) -> dict[str, Any]:
    """Submit at seeded Poisson times (``rate`` jobs/s); latencies and throughput."""
    rng = random.Random(seed)
    latencies: list[float] = []
    ends: list[float] = []
    lock = threading.Lock()

    def wait(job_id: str, submitted: float) -> None:
        producer.result(job_id, timeout=1800)
        done = time.perf_counter()
        with lock:
            latencies.append(done - submitted)
            ends.append(done)

    first = time.perf_counter()
    with ThreadPoolExecutor(max_workers=JOBS) as pool:
        for request, tokens in work:
            time.sleep(rng.expovariate(rate))
            submitted = time.perf_counter()
            job_id = producer.submit(request["messages"], model=name, max_new_tokens=tokens)
            pool.submit(wait, job_id, submitted)
    figures = summary([s * 1000 for s in latencies])
    figures["jobs_s"] = round(len(ends) / (max(ends) - first), 3)
    return figures


def run_model(label: str, size: str) -> None:
    path = str(tiny_model_path("idefics3", size=size))
    results: dict[str, dict[float, dict[str, Any]]] = {}
    cap = 0.0
    for kind, env in SERVICES.items():
        name = f"bench-{kind}"
        with service(path, name, **env) as (producer, images, _worker):
            work = workload(images)
            if kind == "one-at-a-time":
                cap = capacity(producer, name, work[:CALIBRATION])
            results[kind] = {load: arrivals(producer, name, work, load * cap, 7)
                              for load in LOADS}
    rows = [("one-at-a-time capacity",
             f"{cap:.3f} jobs/s (the first {min(JOBS, CALIBRATION)} jobs one by one)")]
    for load in LOADS:
        for kind in SERVICES:
            r = results[kind][load]
            rows.append((f"{int(load * 100)}% load, {kind}: p50 / p99 ms, jobs/s",
                         f"{r['p50']:.0f} / {r['p99']:.0f}, {r['jobs_s']}"))
        cont, one, static = (results[k][load] for k in ("continuous", "one-at-a-time", "static"))
        rows.append((f"{int(load * 100)}% load, continuous x one-at-a-time (p50, p99)",
                     f"{cont['p50'] / one['p50']:.2f}, {cont['p99'] / one['p99']:.2f} "
                     "(target <= 0.6)"))
        rows.append((f"{int(load * 100)}% load, continuous x static (p50, p99; jobs/s)",
                     f"{cont['p50'] / static['p50']:.2f}, {cont['p99'] / static['p99']:.2f} "
                     f"(target <= 0.8); {cont['jobs_s'] / static['jobs_s']:.2f} (target >= 1)"))
    report(f"Arrivals under load, {label}, {JOBS} jobs, max_new_tokens 4-40, "
           f"{os.environ['BENCH_THREADS']} torch thread(s)",
           {"capacity_jobs_s": cap, "latency_ms": {k: {str(load): v for load, v in r.items()}
                                                   for k, r in results.items()}}, rows)


def main() -> None:
    for key in os.environ.get("BENCH_ARRIVALS_MODELS", "tiny,256m").split(","):
        run_model(*MODELS[key.strip()])


if __name__ == "__main__":
    main()
