"""B1 queue overhead, B2 throughput, B3 latency under load: the service beside its baselines.

Models: the tiny idefics3 and a random model at SmolVLM-256M's real dimensions (no image
splitting), both built offline by worker/tiny.py.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.common import QUICK, Baseline, jobs, report, service, summary, timed
from worker.tiny import tiny_model_path


def b1_overhead(producer: Any, images: Any, base: Baseline, name: str, n: int,
                tokens: int) -> dict[str, Any]:
    service_s, baseline_s = [], []
    for request in jobs(images, n):
        conversation = base.conversation(request, images)
        elapsed, _ = timed(base.run, [conversation], tokens)
        baseline_s.append(elapsed)
        started = time.perf_counter()
        job_id = producer.submit(request["messages"], model=name, max_new_tokens=tokens)
        producer.result(job_id, timeout=600)
        service_s.append(time.perf_counter() - started)
    overhead_ms = [(s - b) * 1000 for s, b in zip(service_s, baseline_s, strict=True)]
    return {"jobs": n, "ratio": round(sum(service_s) / sum(baseline_s), 3),
            "overhead_ms": summary(overhead_ms),
            "baseline_ms": summary([b * 1000 for b in baseline_s])}


def burst(producer: Any, requests: list[dict[str, Any]], name: str, tokens: int) -> float:
    started = time.perf_counter()
    ids = [producer.submit(r["messages"], model=name, max_new_tokens=tokens) for r in requests]
    for job_id in ids:
        producer.result(job_id, timeout=900)
    return time.perf_counter() - started


def b2_throughput(producer: Any, images: Any, base: Baseline, name: str, size: int,
                  tokens: int, batch: int) -> dict[str, Any]:
    requests = jobs(images, size)
    conversations = [base.conversation(r, images) for r in requests]
    sequential = sum(timed(base.run, [c], tokens)[0] for c in conversations)
    batched = sum(timed(base.run, conversations[i:i + batch], tokens)[0]
                  for i in range(0, size, batch))
    served = burst(producer, requests, name, tokens)
    return {"jobs": size, "service_jobs_s": round(size / served, 3),
            "vs_sequential": round(sequential / served, 3),
            "vs_batched_ceiling": round(batched / served, 3)}


def poisson_latencies(producer: Any, requests: list[dict[str, Any]], name: str, rate: float,
                      tokens: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    latencies: list[float] = []
    lock = threading.Lock()

    def wait(job_id: str, submitted: float) -> None:
        producer.result(job_id, timeout=900)
        with lock:
            latencies.append((time.perf_counter() - submitted) * 1000)

    with ThreadPoolExecutor(max_workers=64) as pool:
        for request in requests:
            time.sleep(rng.expovariate(rate))
            submitted = time.perf_counter()
            job_id = producer.submit(request["messages"], model=name, max_new_tokens=tokens)
            pool.submit(wait, job_id, submitted)
    return latencies


def run_model(label: str, path: str, tokens: int) -> None:
    n1, sizes, n3 = (8, (8,), 12) if QUICK else (50, (8, 32), 40)
    name = f"bench-{label}"
    base = Baseline(path)
    with service(path, name, VLMQ_MAX_BATCH_SIZE="8", VLMQ_BATCH_WAIT_MS="5") as (p, im, _w):
        b1 = b1_overhead(p, im, base, name, n1, tokens)
        report(f"B1 queue overhead ({label})", b1, [
            ("service / in-process generate", f"{b1['ratio']}  (target <= 1.05)"),
            ("overhead ms p50 / p99", f"{b1['overhead_ms']['p50']} / {b1['overhead_ms']['p99']}"),
            ("in-process generate ms p50", str(b1["baseline_ms"]["p50"]))])
        b2 = {size: b2_throughput(p, im, base, name, size, tokens, 8) for size in sizes}
        report(f"B2 throughput ({label})", {"bursts": b2}, [
            (f"burst {s}: jobs/s, x sequential, x batched ceiling",
             f"{r['service_jobs_s']}, {r['vs_sequential']}x (target >= 1.5), "
             f"{r['vs_batched_ceiling']} (target >= 0.85)") for s, r in b2.items()])
        capacity = b2[sizes[0]]["service_jobs_s"]
        batched = {load: summary(poisson_latencies(p, jobs(im, n3), name, load * capacity,
                                                   tokens, 7)) for load in (0.5, 0.8)}
    with service(path, name, VLMQ_MAX_BATCH_SIZE="1") as (p, im, _w):
        single = {load: summary(poisson_latencies(p, jobs(im, n3), name, load * capacity,
                                                  tokens, 7)) for load in (0.5, 0.8)}
    report(f"B3 latency under load ({label})",
           {"capacity_jobs_s": capacity, "batched": batched, "one_at_a_time": single}, [
               (f"{int(load * 100)}% load p50/p99 ms: batched vs one-at-a-time",
                f"{batched[load]['p50']}/{batched[load]['p99']} vs "
                f"{single[load]['p50']}/{single[load]['p99']}") for load in (0.5, 0.8)])


def main() -> None:
    run_model("tiny-idefics3", str(tiny_model_path("idefics3")), 24)
    run_model("smolvlm-256m-size", str(tiny_model_path("idefics3", size="smolvlm-256m")), 16)


if __name__ == "__main__":
    main()
