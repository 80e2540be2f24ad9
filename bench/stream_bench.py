"""Streaming: delivery latency of events to subscribers, and throughput with streams on vs off.

8 concurrent streaming jobs; each subscriber follows ``Producer.stream``; latency is the
subscriber's receipt time minus the worker's event ``ts`` (same machine, same clock).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from bench.common import QUICK, jobs, report, service, summary
from bench.engine_bench import burst
from worker.tiny import tiny_model_path

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


def main() -> None:
    path, name = str(tiny_model_path("idefics3")), "bench-stream"
    tokens, rounds = (32, 2) if QUICK else (64, 4)
    with service(path, name) as (producer, images, _worker):
        latency = summary(delivery(producer, images, name, tokens))
        on = min(burst(producer, jobs(images, CONCURRENT), name, tokens) for _ in range(rounds))
    with service(path, name, VLMQ_STREAM_EVENTS="false") as (producer, images, _worker):
        off = min(burst(producer, jobs(images, CONCURRENT), name, tokens) for _ in range(rounds))
    ratio = round(off / on, 3)  # throughput on / throughput off
    report("Streaming (tiny idefics3, 8 concurrent jobs)",
           {"delivery_ms": latency, "throughput_on_over_off": ratio},
           [("delivery latency ms p50 / p99", f"{latency['p50']} / {latency['p99']}"),
            ("throughput streaming on / off", f"{ratio}  (target >= 0.95)")])


if __name__ == "__main__":
    main()
