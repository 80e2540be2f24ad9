"""Streaming: delivery latency of events to subscribers, and throughput with streams on vs off.

8 concurrent streaming jobs; each subscriber follows ``Producer.stream``; latency is the
subscriber's receipt time minus the worker's event ``ts`` (same machine, same clock). The
on/off ratio runs two workers side by side (one with ``VLMQ_STREAM_EVENTS=false``) and
alternates bursts between them, on the tiny model (steps of a few ms: the worst case for a
per-step cost) and at SmolVLM-256M size. Torch pinned to ``BENCH_THREADS`` threads (default 1)
in both workers.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any

os.environ.setdefault("BENCH_THREADS", "1")

from bench.common import QUICK, jobs, report, service, summary, worker_env  # noqa: E402
from bench.engine_bench import burst  # noqa: E402
from tests.servers import WorkerProcess  # noqa: E402
from worker.tiny import tiny_model_path  # noqa: E402

INTERVAL_MS = 20  # the workers' VLMQ_STREAM_INTERVAL_MS (the default)

CONCURRENT = 8


def delivery(producer: Any, images: Any, name: str, tokens: int) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()

    def follow(job_id: str) -> None:
        for event in producer.stream(job_id, timeout=600):
            received = time.time()
            if event.type == "delta":
                with lock:
                    latencies.append((received - event.ts) * 1000)

    ids = [producer.submit(r["messages"], model=name, max_new_tokens=tokens)
           for r in jobs(images, CONCURRENT)]
    threads = [threading.Thread(target=follow, args=(job_id,)) for job_id in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def on_off_ratio(producer: Any, images: Any, tokens: int, rounds: int) -> float:
    """Throughput with streaming on / off: bursts alternate between the two workers, so both
    see the same machine; the median of the per-round ratios."""
    ratios = []
    for _ in range(rounds):
        on = burst(producer, jobs(images, CONCURRENT), "bench-stream-on", tokens)
        off = burst(producer, jobs(images, CONCURRENT), "bench-stream-off", tokens)
        ratios.append(off / on)
    return round(statistics.median(ratios), 3)


def run_model(label: str, path: str, tokens: int, rounds: int) -> None:
    with service(path, "bench-stream-on") as (producer, images, worker):
        off_worker = WorkerProcess(path, worker.env["VLMQ_REDIS_URL"], name="bench-stream-off",
                                   image_port=images.port,
                                   env=worker_env(VLMQ_STREAM_EVENTS="false"))
        try:
            off_worker.wait_ready()
            burst(producer, jobs(images, 2), "bench-stream-off", 2)  # warm up
            latency = summary(delivery(producer, images, "bench-stream-on", tokens))
            ratio = on_off_ratio(producer, images, tokens, rounds)
        finally:
            off_worker.stop()
    report(f"Streaming ({label}, {CONCURRENT} concurrent jobs, {tokens} tokens)",
           {"delivery_ms": latency, "throughput_on_over_off": ratio, "rounds": rounds},
           [("delivery latency ms p50 / p99",
             f"{latency['p50']} / {latency['p99']}  (target p99 <= {INTERVAL_MS + 5})"),
            ("throughput streaming on / off", f"{ratio}  (target >= 0.97)")])


def main() -> None:
    run_model("tiny idefics3", str(tiny_model_path("idefics3")), 32 if QUICK else 64,
              3 if QUICK else 7)
    run_model("smolvlm-256m-size", str(tiny_model_path("idefics3", size="smolvlm-256m")),
              8 if QUICK else 16, 2 if QUICK else 3)


if __name__ == "__main__":
    main()
